"""End to end: SMTP client -> relay process (real TLS, real spool) -> receiving server.

Each test runs ``python -m mta run`` as an operator would, with receivers on other
127.0.0.x addresses reached through ``[[route]]``.
"""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, policy, run_mta, wait_until

SENDER = "alice@sender.test"


def message(subject: str = "hello", body: str = "hello world", rcpt: str = "bob@dest.test") -> str:
    return f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n{body}\r\n"


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.stop()


def make_relay(
    relays: list[RelayProcess], tmp_path: Path, text: str, workers: int = 1
) -> RelayProcess:
    relay = RelayProcess(tmp_path, text, workers=workers)
    relays.append(relay)
    return relay


# The guarantees hold for a relay group too (``[server] workers = 2``, ``mta.group``).
BOTH = pytest.mark.parametrize("workers", [1, 2], ids=["relay", "group"])


@BOTH
def test_relays_over_tls_with_received_line(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as receiver:
        relay = make_relay(relays, tmp_path, policy(f"[127.0.0.2]:{receiver.port}"), workers)
        relay.start()
        relay.send(SENDER, ["bob@dest.test"], message())
        (got,) = receiver.wait_for(1, timeout=20)
    assert got.rcpt_tos == ["bob@dest.test"]
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert b"hello world" in got.content
    received = got.content.split(b"\r\n\r\n", 1)[0]
    assert b"Received: from client.test" in received
    assert b"using TLSv1.3" in received
    wait_until(lambda: not relay.queue(), 10, "the queue to empty")


def test_swaks_relays_a_message(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is a test dependency (scripts/system-deps.sh installs it)"
    with Receiver("127.0.0.3", tls="fs", ca=tls_ca) as receiver:
        relay = make_relay(relays, tmp_path, policy(f"[127.0.0.3]:{receiver.port}")).start()
        done = subprocess.run(
            [
                swaks,
                "--server",
                f"127.0.0.1:{relay.port}",
                "--tls",
                "--from",
                SENDER,
                "--to",
                "carol@dest.test",
                "--header",
                "Subject: via swaks",
                "--body",
                "swaks body",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (got,) = receiver.wait_for(1, timeout=20)
    assert b"swaks body" in got.content
    assert got.tls_version is not None


@pytest.mark.parametrize("tls", ["none", "non-fs"])
def test_encrypt_defers_without_forward_secret_tls(
    tls: str, tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    with Receiver("127.0.0.4", tls=tls, ca=tls_ca) as receiver:
        relay = make_relay(relays, tmp_path, policy(f"[127.0.0.4]:{receiver.port}")).start()
        relay.send(SENDER, ["bob@dest.test"], message())
        wait_until(lambda: any(e["last_error"] for e in relay.queue()), 20, "a deferral")
        assert receiver.messages == []
    (entry,) = relay.queue()
    expected = "starttls-not-supported" if tls == "none" else "no-forward-secrecy"
    assert expected in str(entry["last_error"])
    assert entry["domains"] == ["dest.test"]


def test_may_sends_in_clear_only_without_starttls(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    with (
        Receiver("127.0.0.5", tls="none", ca=tls_ca) as plain,
        Receiver("127.0.0.6", tls="fs", ca=tls_ca) as tls,
    ):
        extra = f'[[route]]\ndomain = "tls.test"\nnexthop = "[127.0.0.6]:{tls.port}"\n'
        text = policy(f"[127.0.0.5]:{plain.port}", level="may", extra=extra)
        relay = make_relay(relays, tmp_path, text).start()
        relay.send(SENDER, ["bob@plain.test", "dave@tls.test"], message())
        (clear,) = plain.wait_for(1, timeout=20)
        (secure,) = tls.wait_for(1, timeout=20)
    assert clear.tls_version is None
    assert clear.rcpt_tos == ["bob@plain.test"]
    assert secure.tls_version is not None
    assert secure.rcpt_tos == ["dave@tls.test"]


@BOTH
def test_no_plaintext_on_disk_or_in_logs(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    token = uuid.uuid4().hex
    with Receiver("127.0.0.7", tls="none", ca=tls_ca) as receiver:
        relay = make_relay(relays, tmp_path, policy(f"[127.0.0.7]:{receiver.port}"), workers)
        relay.start()
        sender, rcpt = f"s{token}@sender.test", f"r{token}@dest.test"
        relay.send(
            sender, [rcpt], message(subject=f"subj {token}", body=f"body {token}", rcpt=rcpt)
        )
        wait_until(
            lambda: any(e["last_error"] for e in relay.queue()), 20, "a deferral (state written)"
        )
    files = relay.spool_files()
    assert any(p.parent.name == "msg" for p in files)
    assert any(p.parent.name == "state" for p in files)
    for path in [*files, *(relay.home / "spool").rglob("*")]:
        assert token not in str(path)
        if path.is_file() and not stat.S_ISSOCK(path.stat().st_mode):
            assert token.encode() not in path.read_bytes(), path
    assert token not in relay.log


def test_flipped_byte_quarantines_one_message_and_delivers_others(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    port = free_port("127.0.0.8")
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.8]:{port}")).start()
    for n in range(3):
        relay.send(SENDER, [f"bob{n}@dest.test"], message(body=f"message {n}"))
    assert relay.terminate() == 0
    messages = sorted((relay.home / "spool" / "msg").iterdir())
    assert len(messages) == 3
    victim = messages[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with Receiver("127.0.0.8", port=port, tls="fs", ca=tls_ca) as receiver:
        relay.start()
        assert relay.mta("queue", "flush").returncode == 0  # they were deferred before the stop
        got = receiver.wait_for(2, timeout=20)
        wait_until(
            lambda: (
                not (relay.home / "spool" / "msg").exists()
                or not any((relay.home / "spool" / "msg").iterdir())
            ),
            10,
            "spool to drain",
        )
    assert len(got) == 2
    assert (relay.home / "spool" / "quarantine" / victim.name).exists() or any(
        victim.name in p.name for p in (relay.home / "spool" / "quarantine").rglob("*")
    )
    assert "quarantine" in relay.log


@BOTH
def test_kill9_after_250_loses_nothing(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    # First life: the next hop accepts TCP but never answers, so delivery is in flight at the kill.
    import socket

    tarpit = socket.socket()
    tarpit.bind(("127.0.0.9", 0))
    tarpit.listen(8)
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.9]:{tarpit.getsockname()[1]}"), workers)
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], message(body="survives kill -9"))
    relay.kill9_all()  # a group's workers too (their supervisor alone: test_fault_kill9)
    tarpit.close()
    with Receiver("127.0.0.9", tls="fs", ca=tls_ca) as receiver:
        relay.write_policy(policy(f"[127.0.0.9]:{receiver.port}"))
        relay.start()
        (got,) = receiver.wait_for(1, timeout=20)
    assert b"survives kill -9" in got.content


def test_flush_retries_deferred_mail_while_running(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    port = free_port("127.0.0.10")
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.10]:{port}")).start()
    relay.send(SENDER, ["bob@dest.test"], message())
    wait_until(lambda: any(e["last_error"] for e in relay.queue()), 20, "a deferral")
    with Receiver("127.0.0.10", port=port, tls="fs", ca=tls_ca) as receiver:
        flushed = relay.mta("queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
        assert "flushed: 1" in flushed.stdout
        receiver.wait_for(1, timeout=20)
    wait_until(lambda: not relay.queue(), 10, "the queue to empty")


@BOTH
def test_sigterm_exits_cleanly_and_keeps_the_queue(
    tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.11]:{free_port('127.0.0.11')}"), workers)
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], message())
    assert relay.terminate() == 0
    assert "mta.stopped" in relay.log
    (entry,) = relay.queue()
    assert entry["domains"] == ["dest.test"]


def test_first_start_creates_key_and_certificate(
    tmp_path: Path, relays: list[RelayProcess]
) -> None:
    relay = make_relay(relays, tmp_path, "").start()
    init = [line for line in relay.log.splitlines() if "mta.init" in line]
    assert len(init) == 1
    key_file = relay.home / "keys" / "spool.key"
    assert str(key_file) in init[0]
    assert str(relay.home / "tls") in init[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    relay.terminate()
    relay.start()
    assert len([line for line in relay.log.splitlines() if "mta.init" in line]) == 1


@BOTH
def test_key_rotation_while_running(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.12]:{free_port('127.0.0.12')}"), workers)
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], message())
    rotated = relay.mta("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "reloaded" in rotated.stdout
    relay.send(SENDER, ["bob@dest.test"], message())
    listed = relay.mta("keys", "list").stdout.splitlines()
    counts = {line.split()[1]: int(line.split()[2]) for line in listed}
    assert counts["active"] >= 1  # the second message is sealed under the new key
    assert counts["old"] >= 1  # the first still needs the old one, which stays


@BOTH
def test_missing_key_with_spooled_mail_refuses_to_start(
    tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    relay = make_relay(relays, tmp_path, policy(f"[127.0.0.13]:{free_port('127.0.0.13')}"), workers)
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], message())
    relay.terminate()
    (relay.home / "keys" / "spool.key").unlink()
    before = relay.spool_files()
    result = run_mta("run", "--config", str(relay.policy_file), home=relay.home)
    assert result.returncode == 1
    assert "spool.key" in result.stderr
    assert "missing" in result.stderr
    assert relay.spool_files() == before


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[outbound]\ndefault_levle = "may"\n', "outbound.default_levle", "unknown key"),
        ('[outbound]\ndefault_level = "sometimes"\n', "outbound.default_level", "expected one of"),
        ("[[listener]]\nport = 70000\n", "listener[0].port", "port"),
        ('[spool]\nmax_age = "forever"\n', "spool.max_age", "duration"),
    ],
)
def test_bad_policy_exits_2_with_one_line(
    text: str, key: str, problem: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    result = run_mta("run", "--config", str(bad), home=tmp_path / "var")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0]
    assert key in lines[0]
    assert problem in lines[0]
    assert not (tmp_path / "var").exists()


def test_a_listener_that_cannot_bind_fails_start_with_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen(1)
    port = taken.getsockname()[1]
    relay = RelayProcess(tmp_path, policy("[127.0.0.31]:25"), port=port)
    try:
        result = run_mta("run", "--config", str(relay.policy_file), home=relay.home)
    finally:
        taken.close()
    assert result.returncode == 2
    # The log lines of start-up come first; the error is one line, the last.
    assert result.stderr.strip().splitlines()[-1] == (
        f"mta: {relay.policy_file}: listener[0]: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )


@BOTH
def test_a_second_relay_on_the_same_spool_refuses_to_start(
    tmp_path: Path, relays: list[RelayProcess], workers: int
) -> None:
    """Two relays on one spool would try every message twice: the second one stops at
    start, with one line, and the first carries on."""
    text = policy(f"[127.0.0.14]:{free_port('127.0.0.14')}")
    first = make_relay(relays, tmp_path, text, workers).start()
    (tmp_path / "second").mkdir()
    second = RelayProcess(tmp_path / "second", text)  # its own port, the same MTA_HOME
    result = run_mta("run", "--config", str(second.policy_file), home=first.home)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"mta: {first.home / 'spool'}: in use by another mta run (one relay per spool)"
    )
    first.send(SENDER, ["bob@dest.test"], message())  # still serving
    assert first.terminate() == 0


@pytest.mark.parametrize(
    ("flags", "accepted"),
    [
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], True),
        (["-tls1_3"], True),
        (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], False),
        (["-tls1_2", "-cipher", "AES128-GCM-SHA256:AES256-SHA"], False),
    ],
)
def test_listener_tls_floor_with_openssl(
    flags: list[str], accepted: bool, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is a test dependency (scripts/system-deps.sh installs it)"
    relay = make_relay(relays, tmp_path, "").start()
    done = subprocess.run(
        [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{relay.port}", *flags],
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    handshake_ok = "Cipher is (NONE)" not in done.stdout and "New, " in done.stdout
    assert handshake_ok is accepted, done.stdout[-2000:] + done.stderr[-2000:]


def test_rejected_recipient_bounces_to_the_sender_with_a_dsn(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    reject = {"nobody@dest.test": "550 5.1.1 No such user"}
    with Receiver("127.0.0.14", tls="fs", ca=tls_ca, rcpt_reply=reject) as receiver:
        relay = make_relay(relays, tmp_path, policy(f"[127.0.0.14]:{receiver.port}")).start()
        relay.send(SENDER, ["nobody@dest.test", "bob@dest.test"], message(subject="will bounce"))
        got = receiver.wait_for(2, timeout=20)
    original, dsn = sorted(got, key=lambda m: m.mail_from != SENDER)
    assert original.rcpt_tos == ["bob@dest.test"]
    assert dsn.mail_from in ("", "<>")  # the null sender, however the receiver spells it
    assert dsn.rcpt_tos == [SENDER]
    assert b"multipart/report" in dsn.content
    assert b"Final-Recipient: rfc822; nobody@dest.test" in dsn.content
    assert b"Status: 5.1.1" in dsn.content
    assert b"Subject: will bounce" in dsn.content  # the original's headers ride along
