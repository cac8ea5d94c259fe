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
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from mta.spool.keys import KeyRing
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


BREAKS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "other-key-file": (other_key_file, "does not hold"),
    "same-id-other-key": (same_id_other_key, "opens none of the spooled records"),
    "loose-permissions": (loose_mode, "lets group or others access it"),
    "symlink": (symlink, "symbolic link"),
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
    breaks, problem = BREAKS[case]
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
    assert lines[0].startswith(f"mta: {key_file}: "), lines[0]
    assert problem in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(spool) == before
    with socket.socket() as probe:  # it never listened
        assert probe.connect_ex(("127.0.0.1", relay.port)) != 0

    # The right key back: the message was there all along, and goes out.
    key_file.unlink()
    key_file.write_bytes(good_key)
    os.chmod(key_file, 0o600)
    with Receiver(HOST, port=port, tls="fs", ca=tls_ca) as receiver:
        relay.start()
        assert relay.mta("queue", "flush").returncode == 0
        (got,) = receiver.wait_for(1, timeout=20)
    assert b"queued while keys change" in got.content
    assert "quarantine" not in relay.log
