"""``mta reload`` and SIGHUP against a relay process, under load (issue 11 §1).

Two policies take turns: they differ in the ``[[domain]]`` policy for dest.test (its
next hop: one receiver or another) and in the listener's certificate. While four
client threads send 200 messages, one connection each, the test reloads five times and
checks, after each reload, that ``mta check`` and a delivery follow the new policy and
that the listener serves the new certificate. No connection may be refused and no
message lost. A broken policy is refused with one line and changes nothing.
"""

from __future__ import annotations

import signal
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, client_tls, free_port, wait_until

SENDER = "alice@sender.test"
THREADS = 4
PER_THREAD = 50  # 200 messages in all
LOAD_DEADLINE = 90.0  # seconds: the load stops by then, whatever happened
RELOADS = 5
PACE = 0.15  # seconds between one thread's messages: the load outlasts the reloads


def _message(subject: str) -> str:
    return f"From: {SENDER}\r\nTo: bob@dest.test\r\nSubject: {subject}\r\n\r\nbody\r\n"


def _subjects(receiver: Receiver) -> set[str]:
    found = set()
    for got in list(receiver.messages):
        for line in got.content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                found.add(line[9:].decode())
    return found


class _Certs:
    """Two listener certificates (A and B) as files, and their DER to compare."""

    def __init__(self, tmp_path: Path, ca: trustme.CA) -> None:
        self.files: dict[str, tuple[Path, Path]] = {}
        self.smtps_port = free_port()
        self.der: dict[str, bytes] = {}
        for name in ("a", "b"):
            leaf = ca.issue_cert(f"{name}.relay.test")
            cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            key.chmod(0o600)
            self.files[name] = (cert, key)
            self.der[name] = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def _policy(receiver: Receiver, certs: _Certs, name: str, *, extra: str = "") -> str:
    cert, key = certs.files[name]
    return (
        f'tls_cert = ["{cert}"]\ntls_key = ["{key}"]\n\n'
        f'[[listener]]\naddress = "127.0.0.1"\nport = {certs.smtps_port}\nmode = "smtps"\n'
        f'tls_cert = ["{cert}"]\ntls_key = ["{key}"]\n\n'
        '[outbound]\ndefault_level = "encrypt"\nretry_min = "1s"\nretry_max = "2s"\n\n'
        "[dane]\nenabled = false\n\n[mta_sts]\nenabled = false\n\n"
        f'[[domain]]\nname = "dest.test"\nlevel = "encrypt"\n'
        f'nexthop = "[{receiver.host}]:{receiver.port}"\n{extra}'
    )


def _write(relay: RelayProcess, text: str) -> None:
    # The listener's tls_cert/tls_key go into our [[listener]] table (first lines of text).
    relay.listener = text.split("\n\n", 1)[0]
    relay.write_policy(text.split("\n\n", 1)[1])


def _served_certificate(relay: RelayProcess) -> bytes:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test", timeout=20) as smtp:
        smtp.starttls(context=client_tls())
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return der


def _served_certificate_smtps(certs: _Certs) -> bytes:
    with smtplib.SMTP_SSL(
        "127.0.0.1", certs.smtps_port, local_hostname="client.test", context=client_tls()
    ) as smtp:
        der = smtp.sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def _checked_nexthop(relay: RelayProcess) -> str:
    import json

    checked = relay.mta("check", "dest.test", "--json")
    assert checked.returncode == 0, checked.stderr
    doc = json.loads(checked.stdout)
    return f"{doc['nexthop']}:{doc['port']}"


@pytest.fixture
def receivers(tls_ca: trustme.CA) -> Iterator[tuple[Receiver, Receiver]]:
    with (
        Receiver("127.0.0.2", tls="fs", ca=tls_ca) as first,
        Receiver("127.0.0.3", tls="fs", ca=tls_ca) as second,
    ):
        yield first, second


@pytest.fixture
def relay_proc(tmp_path: Path) -> Iterator[RelayProcess]:
    relay = RelayProcess(tmp_path, "")
    yield relay
    relay.stop()


class _Load:
    """THREADS clients sending PER_THREAD messages each, a new connection per message."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.sent: list[str] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + LOAD_DEADLINE
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(THREADS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(LOAD_DEADLINE + 30)

    @property
    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self, number: int) -> None:
        for index in range(PER_THREAD):
            if time.monotonic() > self._deadline:
                return
            subject = f"load-{number}-{index}"
            try:
                self.relay.send(SENDER, ["bob@dest.test"], _message(subject))
            except (OSError, smtplib.SMTPException) as err:
                with self._lock:
                    self.refused.append(f"{subject}: {err!r}")
                continue
            with self._lock:
                self.sent.append(subject)
            time.sleep(PACE)


def test_reloads_under_load_lose_nothing_and_switch_policy_and_certificate(
    tmp_path: Path,
    tls_ca: trustme.CA,
    receivers: tuple[Receiver, Receiver],
    relay_proc: RelayProcess,
) -> None:
    certs = _Certs(tmp_path, trustme.CA())
    first, second = receivers
    policies = {
        "a": (_policy(first, certs, "a"), first),
        "b": (_policy(second, certs, "b"), second),
    }
    relay = relay_proc
    _write(relay, policies["a"][0])
    relay.start()
    assert _served_certificate(relay) == certs.der["a"]
    assert _served_certificate_smtps(certs) == certs.der["a"]

    load = _Load(relay)
    load.start()
    name = "a"
    during: list[int] = []  # messages sent when each reload had been checked
    for turn in range(RELOADS):
        time.sleep(0.3)
        name = "b" if name == "a" else "a"
        text, receiver = policies[name]
        _write(relay, text)
        if turn == RELOADS - 1:  # the last one by signal: the same as mta reload
            mark = len(relay.log)
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda mark=mark: "mta.reloaded" in relay.log[mark:], 20, "the SIGHUP reload"
            )
        else:
            reloaded = relay.mta("reload")
            assert reloaded.returncode == 0, reloaded.stderr
            assert reloaded.stdout.startswith("reloaded"), reloaded.stdout
            assert "listeners_kept=2 listeners_added=0 listeners_removed=0" in reloaded.stdout
        # Right after the reload: the new certificate (STARTTLS and smtps), policy, next hop.
        assert _served_certificate(relay) == certs.der[name]
        assert _served_certificate_smtps(certs) == certs.der[name]
        assert _checked_nexthop(relay) == f"{receiver.host}:{receiver.port}"
        probe = f"probe-{turn}-{uuid.uuid4().hex[:8]}"
        relay.send(SENDER, ["bob@dest.test"], _message(probe))
        wait_until(
            lambda probe=probe, receiver=receiver: probe in _subjects(receiver),
            20,
            f"{probe} at {receiver.host}",
        )
        during.append(len(load.sent))
    load.join()
    assert load.done
    # The load ran through every reload: messages were sent before and after the last.
    assert 0 < during[-1] < THREADS * PER_THREAD, during
    assert load.refused == []
    assert len(load.sent) == THREADS * PER_THREAD, "the load ran out of time"
    wait_until(
        lambda: set(load.sent) <= _subjects(first) | _subjects(second),
        60,
        "every message of the load to be delivered",
    )
    wait_until(lambda: not relay.queue(), 30, "the queue to empty")
    assert relay.log.count("mta.reloaded") == RELOADS


def test_a_broken_policy_is_refused_in_one_line_and_the_old_one_serves_on(
    tmp_path: Path,
    receivers: tuple[Receiver, Receiver],
    relay_proc: RelayProcess,
) -> None:
    certs = _Certs(tmp_path, trustme.CA())
    first, second = receivers
    relay = relay_proc
    good = _policy(first, certs, "a")
    _write(relay, good)
    relay.start()

    # Wrong in the policy file itself: the command says so, the relay is not asked.
    _write(
        relay,
        _policy(second, certs, "b").replace(
            'level = "encrypt"\nnexthop', 'level = "sometimes"\nnexthop'
        ),
    )
    refused = relay.mta("reload")
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert str(relay.policy_file) in line
    assert "domain[0].level" in line

    # Wrong only where the relay looks (a certificate it cannot load): refused by it.
    missing = tmp_path / "missing.pem"
    broken = _policy(second, certs, "b").replace(str(certs.files["b"][0]), str(missing))
    _write(relay, broken)
    mark = len(relay.log)
    refused = relay.mta("reload")
    assert refused.returncode == 1, refused.stdout
    (line,) = refused.stderr.splitlines()
    assert str(missing) in line
    assert "tls_cert" in line
    assert "mta.reload_refused" in relay.log[mark:]
    assert "mta.reloaded" not in relay.log[mark:]

    # SIGHUP with the same broken file: the same one line in the log, nothing changes.
    mark = len(relay.log)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "mta.reload_refused" in relay.log[mark:], 20, "the refused SIGHUP")
    assert str(missing) in relay.log[mark:]

    # The old policy serves on: its certificate, its next hop.
    assert _served_certificate(relay) == certs.der["a"]
    relay.send(SENDER, ["bob@dest.test"], _message("after-refusal"))
    wait_until(lambda: "after-refusal" in _subjects(first), 20, "delivery by the old policy")
    assert "after-refusal" not in _subjects(second)


def test_a_changed_spool_path_needs_a_restart(
    tmp_path: Path, receivers: tuple[Receiver, Receiver], relay_proc: RelayProcess
) -> None:
    certs = _Certs(tmp_path, trustme.CA())
    first, second = receivers
    relay = relay_proc
    _write(relay, _policy(first, certs, "a"))
    relay.start()
    # By signal: ``mta reload`` would look for the relay in the new spool.
    moved = f'\n[spool]\npath = "{tmp_path / "elsewhere"}"\n'
    _write(relay, _policy(second, certs, "b", extra=moved))
    mark = len(relay.log)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "mta.reload_refused" in relay.log[mark:], 20, "the refused SIGHUP")
    (line,) = [line for line in relay.log[mark:].splitlines() if "mta.reload_refused" in line]
    assert "spool.path" in line
    assert "restart" in line
    assert _served_certificate(relay) == certs.der["a"]
    assert _checked_nexthop(relay) == f"{second.host}:{second.port}"  # the file's, not the relay's
    relay.send(SENDER, ["bob@dest.test"], _message("still-old"))
    wait_until(lambda: "still-old" in _subjects(first), 20, "delivery by the old policy")
