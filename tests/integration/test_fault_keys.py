"""Fault: restart with the spool key missing, wrong or unsafe -> refuse to start, spool untouched.

A relay with mail in its spool is stopped; its key file is then replaced by one that
must not be used, and ``mta run`` must exit non-zero with one line on stderr that names
the key file and the problem, before it listens or touches the spool: every file name
and every byte in the spool stay as they were. Putting the right key back must bring
the queued message out, delivered, so the spool was really left intact.

(The key file simply missing is ``test_relay.test_missing_key_with_spooled_mail_refuses_to_start``.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from mta import control
from mta.model import Envelope
from mta.spool.envelope import encode_message
from mta.spool.keys import KeyRing
from mta.spool.record import MAGIC, RecordKind, read_header, seal
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, policy, run_mta, wait_until

SENDER = "alice@sender.test"
HOST = "127.0.0.153"


def snapshot(root: Path) -> dict[str, str]:
    """Every name under ``root`` with the digest of its bytes (or what else it is)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        name = str(path.relative_to(root))
        if stat.S_ISREG(mode):
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[name] = "dir" if stat.S_ISDIR(mode) else f"mode {stat.S_IFMT(mode):o}"
    return out


def other_key_file(key_file: Path, tmp_path: Path) -> None:
    """A valid key file of another relay: its own, different key id."""
    other = tmp_path / "other" / "spool.key"
    KeyRing.create(other)
    key_file.unlink()
    shutil.copy2(other, key_file)
    os.chmod(key_file, 0o600)


def same_id_other_key(key_file: Path, tmp_path: Path) -> None:
    """The right key id with other key bytes (a mixed-up backup, an edited file)."""
    lines = key_file.read_text().splitlines()
    key_id = next(line.split()[0] for line in lines if line and not line.startswith("#"))
    other = base64.b64encode(os.urandom(32)).decode()
    key_file.write_text(f"{key_id} {other}\n")
    os.chmod(key_file, 0o600)


def loose_mode(key_file: Path, tmp_path: Path) -> None:
    os.chmod(key_file, 0o644)


def symlink(key_file: Path, tmp_path: Path) -> None:
    """The right key, but reached through a symbolic link."""
    real = tmp_path / "elsewhere" / "spool.key"
    real.parent.mkdir()
    shutil.copy2(key_file, real)
    os.chmod(real, 0o600)
    key_file.unlink()
    key_file.symlink_to(real)


def open_directory(mode: int) -> Callable[[Path, Path], None]:
    """The right key file, in a directory others could swap it in."""

    def loosen(key_file: Path, tmp_path: Path) -> None:
        os.chmod(key_file.parent, mode)

    return loosen


def symlinked_directory(key_file: Path, tmp_path: Path) -> None:
    """The right key file, but its directory is a symbolic link to another one."""
    real = tmp_path / "elsewhere-keys"
    key_file.parent.rename(real)
    key_file.parent.symlink_to(real)


# case -> (how it breaks, what the one line says, whether it names the directory)
BREAKS: dict[str, tuple[Callable[[Path, Path], None], str, bool]] = {
    "other-key-file": (other_key_file, "does not hold", False),
    "same-id-other-key": (same_id_other_key, "opens none of the spooled records", False),
    "loose-permissions": (loose_mode, "lets group or others access it", False),
    "symlink": (symlink, "symbolic link", False),
    "group-writable-dir": (open_directory(0o770), "mode 0770 lets group or others", True),
    "world-writable-dir": (open_directory(0o777), "mode 0777 lets group or others", True),
    "sticky-world-writable-dir": (open_directory(0o1777), "mode 1777 lets group", True),
    "symlinked-dir": (symlinked_directory, "key directory is a symbolic link", True),
}


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.stop()


@pytest.mark.parametrize("case", BREAKS)
def test_bad_key_file_refuses_to_start_and_leaves_the_spool_untouched(
    case: str, tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    breaks, problem, names_directory = BREAKS[case]
    port = free_port(HOST)  # nothing listens there yet: the message stays queued
    relay = RelayProcess(tmp_path, policy(f"[{HOST}]:{port}"))
    relays.append(relay)
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], "Subject: keep me\r\n\r\nqueued while keys change\r\n")
    spool = relay.home / "spool"
    # The queue manager takes the message over from the receiver and tries it once.
    wait_until(lambda: any((spool / "state").iterdir()), 20, "the first attempt's state")
    assert relay.terminate() == 0
    key_file = relay.home / "keys" / "spool.key"
    good_key = key_file.read_bytes()
    before = snapshot(spool)
    assert any(name.startswith("msg/") for name in before)
    assert any(name.startswith("state/") for name in before)

    breaks(key_file, tmp_path)
    result = run_mta("run", "--config", str(relay.policy_file), home=relay.home)

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    named = key_file.parent if names_directory else key_file
    assert lines[0].startswith(f"mta: {named}: "), lines[0]
    assert problem in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(spool) == before
    with socket.socket() as probe:  # it never listened
        assert probe.connect_ex(("127.0.0.1", relay.port)) != 0

    # The right key back: the message was there all along, and goes out.
    if key_file.parent.is_symlink():
        key_file.parent.unlink()
        key_file.parent.mkdir(mode=0o700)
    os.chmod(key_file.parent, 0o700)
    key_file.unlink(missing_ok=True)
    key_file.write_bytes(good_key)
    os.chmod(key_file, 0o600)
    with Receiver(HOST, port=port, tls="fs", ca=tls_ca) as receiver:
        relay.start()
        assert relay.mta("queue", "flush").returncode == 0
        (got,) = receiver.wait_for(1, timeout=20)
    assert b"queued while keys change" in got.content
    assert "quarantine" not in relay.log


# --- a record the ring cannot open is not a wrong key file ---


def key_ids(spool: Path) -> dict[str, str]:
    """``msg/<qid>`` and ``state/<qid>`` -> the key id in the record's header."""
    return {
        f"{path.parent.name}/{path.name}": read_header(path.read_bytes()).key_id
        for directory in ("msg", "state")
        for path in sorted((spool / directory).iterdir())
    }


def active_key(key_file: Path) -> str:
    lines = [line for line in key_file.read_text().splitlines() if line and line[0] != "#"]
    return lines[-1].split()[0]


def queued_relay(
    tmp_path: Path, relays: list[RelayProcess], count: int
) -> tuple[RelayProcess, int]:
    """A running relay with ``count`` messages deferred (nothing listens on the port
    returned) and their first attempt's state written."""
    port = free_port(HOST)
    relay = RelayProcess(tmp_path, policy(f"[{HOST}]:{port}"))
    relays.append(relay)
    relay.start()
    for number in range(count):
        relay.send(SENDER, ["bob@dest.test"], f"Subject: m{number}\r\n\r\nmessage {number}\r\n")
    state = relay.home / "spool" / "state"
    wait_until(lambda: len(list(state.iterdir())) == count, 20, "the first attempts' states")
    return relay, port


def foreign_record(tmp_path: Path, qid: str) -> tuple[bytes, str]:
    """A message record sealed by another relay (its own key file): (record, key id)."""
    other = KeyRing.create(tmp_path / "other-relay" / "spool.key")
    kek = other.get(other.active_id)
    assert kek is not None
    envelope = Envelope(SENDER, ("carol@dest.test",), 1.0, "127.0.0.1")
    payload = encode_message(envelope, b"Subject: not ours\r\n\r\nfrom elsewhere\r\n")
    record = seal(
        payload,
        kind=RecordKind.MESSAGE,
        qid=qid,
        key_id=other.active_id,
        kek=kek,
        random=os.urandom,
    )
    return record, other.active_id


def flip_key_id_bit(path: Path) -> str:
    """Flip one bit of the record's key id (still a valid id); return the new id."""
    data = bytearray(path.read_bytes())
    key_id = read_header(bytes(data)).key_id
    index = next(i for i, char in enumerate(key_id) if char != "a")  # 'a' ^ 1 is '`'
    data[len(MAGIC) + 3 + index] ^= 1  # magic, version, kind, length byte
    path.write_bytes(bytes(data))
    flipped = read_header(bytes(data)).key_id
    assert flipped != key_id
    return flipped


@pytest.mark.parametrize("case", ["copied-from-another-relay", "flipped-bit-in-key-id"])
def test_one_foreign_record_is_quarantined_and_mail_flows(
    case: str, tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    relay, port = queued_relay(tmp_path, relays, 2)
    assert relay.terminate() == 0
    spool = relay.home / "spool"
    if case == "copied-from-another-relay":
        stray = "z" * 20
        record, stray_key = foreign_record(tmp_path, stray)
        (spool / "msg" / stray).write_bytes(record)
        os.chmod(spool / "msg" / stray, 0o600)
        expected = 2
    else:
        victim = sorted((spool / "msg").iterdir())[0]
        stray, stray_key = victim.name, flip_key_id_bit(victim)
        expected = 1

    with Receiver(HOST, port=port, tls="fs", ca=tls_ca) as receiver:
        relay.start()  # it starts: one stray record must not stop all mail
        assert relay.mta("queue", "flush").returncode == 0
        receiver.wait_for(expected, timeout=20)
    alerts = [line for line in relay.log.splitlines() if "spool.foreign_record" in line]
    assert len(alerts) == 1, alerts
    assert stray in alerts[0], alerts[0]
    assert stray_key in alerts[0], alerts[0]
    assert "ERROR" in alerts[0]
    assert (spool / "quarantine" / f"{stray}.msg").exists()
    assert not (spool / "msg" / stray).exists()
    # And the quarantined record, under a key the ring lacks, never stops a start.
    assert relay.terminate() == 0
    relay.start()


def test_quarantined_records_never_block_start(tmp_path: Path, relays: list[RelayProcess]) -> None:
    relay = RelayProcess(tmp_path, policy(f"[{HOST}]:{free_port(HOST)}"))
    relays.append(relay)
    relay.start()
    relay.kill9()  # an empty spool: nothing to lose
    record, _ = foreign_record(tmp_path, "q" * 20)
    quarantined = relay.home / "spool" / "quarantine" / f"{'q' * 20}.msg"
    quarantined.write_bytes(record)
    os.chmod(quarantined, 0o600)
    relay.start()
    assert quarantined.exists()
    listed = relay.mta("keys", "list")
    assert listed.returncode == 0, listed.stderr


# --- only `mta keys prune` drops a key ---


def test_a_ring_that_drops_a_needed_key_is_refused_at_run_time(
    tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    relay, port = queued_relay(tmp_path, relays, 1)
    key_file = relay.home / "keys" / "spool.key"
    old = active_key(key_file)
    assert relay.mta("keys", "rotate").returncode == 0
    relay.send(SENDER, ["bob@dest.test"], "Subject: m1\r\n\r\nunder the new key\r\n")
    # The operator removes the old key's line by hand, then rotates.
    key_file.write_text(
        "".join(line + "\n" for line in key_file.read_text().splitlines() if old not in line)
    )
    edited = key_file.read_bytes()

    rotated = relay.mta("keys", "rotate")
    assert rotated.returncode == 1
    assert f"need key id {old} (2 records)" in rotated.stderr, rotated.stderr
    assert key_file.read_bytes() == edited  # nothing built on the damaged file
    # Asked directly, the running relay refuses the smaller ring as well.
    answer = control.ask(relay.home / "spool" / "control.sock", "reload-keys")
    assert answer is not None
    assert answer.startswith("error "), answer
    assert f"{old} (2 records)" in answer
    assert "spool.keys.reload_refused" in relay.log

    with Receiver(HOST, port=port, tls="fs", ca=tls_ca) as receiver:
        assert relay.mta("queue", "flush").returncode == 0
        receiver.wait_for(2, timeout=20)  # it kept the key: both messages go out
    assert "spool.quarantined" not in relay.log
    assert not any((relay.home / "spool" / "quarantine").iterdir())


# --- re-wrap: older keys prunable without waiting for the queue to drain ---


@pytest.mark.parametrize("running", [True, False], ids=["relay-running", "relay-stopped"])
def test_rewrap_reseals_under_the_active_key_so_old_keys_can_be_pruned(
    running: bool, tls_ca: trustme.CA, tmp_path: Path, relays: list[RelayProcess]
) -> None:
    relay, port = queued_relay(tmp_path, relays, 2)
    spool = relay.home / "spool"
    key_file = relay.home / "keys" / "spool.key"
    old = active_key(key_file)
    # The receipts of the two messages written out (the relay flushes when asked, and
    # when it stops): sealed under the old key, which they keep until they expire.
    assert relay.mta("receipts", "verify").returncode == 0
    if not running:
        assert relay.terminate() == 0
    assert relay.mta("keys", "rotate").returncode == 0
    new = active_key(key_file)
    before = key_ids(spool)
    assert set(before.values()) == {old}
    assert len(before) == 4
    queue_before = [
        {k: e[k] for k in ("qid", "domains", "next_attempt", "last_error")} for e in relay.queue()
    ]
    times = {name: (spool / name).stat().st_mtime_ns for name in before}

    rewrapped = relay.mta("keys", "rewrap")
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert "re-wrapped 4 record(s)" in rewrapped.stdout
    assert ("spool.rewrapped" in relay.log) is running  # done by the relay when it runs
    after = key_ids(spool)
    assert after == dict.fromkeys(before, new)  # the same queue ids, all under the new key
    assert [
        {k: e[k] for k in ("qid", "domains", "next_attempt", "last_error")} for e in relay.queue()
    ] == queue_before
    assert {name: (spool / name).stat().st_mtime_ns for name in after} == times
    assert list((spool / "tmp").iterdir()) == []

    # No spool record needs the old key now; the receipts still do (rewrap leaves them
    # alone: their MACs chain the sealed bytes), so prune keeps it until they expire.
    pruned = relay.mta("keys", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "dropped 0 unreferenced key(s): -" in pruned.stdout
    assert re.search(rf"{old}  old     0 spool record\(s\), [1-9]\d* receipt\(s\)", pruned.stdout)
    shutil.rmtree(spool / "receipts")  # as if they had expired
    pruned = relay.mta("keys", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert f"dropped 1 unreferenced key(s): {old}" in pruned.stdout
    assert old not in key_file.read_text()
    with Receiver(HOST, port=port, tls="fs", ca=tls_ca) as receiver:
        if not running:
            relay.start()
        assert relay.mta("queue", "flush").returncode == 0
        receiver.wait_for(2, timeout=20)
    assert "spool.quarantined" not in relay.log
