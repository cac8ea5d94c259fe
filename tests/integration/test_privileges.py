"""``[server] user``: a relay started as root binds, becomes the user, and relays as it.

These tests run as root (as CI does): the relay process is started as root with
``server.user = "nobody"``, and what the kernel says about it is read from
``/proc/PID/status``. Its data directory sits in a directory that ``nobody`` can
enter (pytest's own tmp_path is root's alone), made and removed here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, policy, run_mta

SENDER = "alice@sender.test"
MESSAGE = f"From: {SENDER}\r\nTo: bob@dest.test\r\nSubject: as nobody\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def _root() -> None:
    assert os.geteuid() == 0, "these tests start the relay as root (as CI runs them)"


def status(pid: int) -> dict[str, list[str]]:
    """``/proc/PID/status`` as name -> fields (Uid: real, effective, saved, fs)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: rest.split() for name, _, rest in (line.partition(":") for line in lines)}


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory ``nobody`` may enter (not read): the relay's files go inside."""
    path = Path(tempfile.mkdtemp(prefix="mta-privileges-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


def test_root_start_switches_to_the_user_before_serving(base: Path, tls_ca: trustme.CA) -> None:
    nobody = pwd.getpwnam("nobody")
    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as receiver:
        relay = RelayProcess(
            base,
            policy(f"[127.0.0.2]:{receiver.port}", level="encrypt"),
            server='user = "nobody"',
            port=None,
        )
        try:
            relay.start()
            assert relay.proc is not None
            proc = status(relay.proc.pid)
            assert proc["Uid"] == [str(nobody.pw_uid)] * 4
            assert proc["Gid"] == [str(nobody.pw_gid)] * 4
            assert proc["Groups"] == []  # setgroups([]): root's groups are gone
            assert proc["CapEff"] == ["0000000000000000"]
            assert proc["CapPrm"] == ["0000000000000000"]
            assert "mta.privileges.dropped" in relay.log

            relay.send(SENDER, ["bob@dest.test"], MESSAGE)  # still accepts and relays
            (got,) = receiver.wait_for(1, timeout=20)
            assert b"hello" in got.content

            # What the relay made is the user's: spool, key file, certificates.
            made = [relay.home, *relay.home.rglob("*")]
            owners = {}
            for path in made:
                with contextlib.suppress(FileNotFoundError):  # delivered, removed meanwhile
                    info = path.lstat()
                    owners[str(path)] = (info.st_uid, info.st_gid)
            assert set(owners.values()) == {(nobody.pw_uid, nobody.pw_gid)}, owners
            assert (relay.home / "keys" / "spool.key").exists()
            assert (relay.home / "spool" / "msg").is_dir()
            assert relay.terminate() == 0
        finally:
            relay.stop()


def test_a_root_spool_is_handed_over_at_the_next_start(base: Path, tls_ca: trustme.CA) -> None:
    """A relay that ran as root before (allow_root) leaves root's files. Started with
    ``user``, it refuses a data directory it did not make (MTA_HOME may be shared: it is
    never taken over) with one line saying what to do; once that is done, it gives
    the spool, keys and certificates to the user and opens its keys as that user."""
    nobody = pwd.getpwnam("nobody")
    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as receiver:
        relay = RelayProcess(base, policy(f"[127.0.0.2]:{receiver.port}"))
        try:
            relay.start()
            relay.terminate()  # (so soon after start, SIGTERM may beat the handler)
            key = relay.home / "keys" / "spool.key"
            assert key.stat().st_uid == 0
            relay.server = 'user = "nobody"'
            relay.write_policy(policy(f"[127.0.0.2]:{receiver.port}"))
            refused = run_mta("run", "--config", str(relay.policy_file), home=relay.home)
            assert refused.returncode == 2
            assert refused.stderr.strip().splitlines()[-1] == (
                f"mta: {relay.policy_file}: server.user: {relay.home}: the data directory is "
                f"not writable by nobody (chown nobody {relay.home}, or set MTA_HOME)"
            )
            os.chown(relay.home, nobody.pw_uid, nobody.pw_gid)  # what the line says
            relay.start()
            assert key.stat().st_uid == nobody.pw_uid
            assert (relay.home / "spool").stat().st_uid == nobody.pw_uid
            assert (relay.home / "tls" / "key.pem").stat().st_uid == nobody.pw_uid
            relay.send(SENDER, ["bob@dest.test"], MESSAGE)
            receiver.wait_for(1, timeout=20)
        finally:
            relay.stop()


def test_allow_root_on_the_command_line_runs_as_root(tmp_path: Path) -> None:
    """``make run`` as root: ``mta run --allow-root`` is ``[server] allow_root = true``."""
    relay = RelayProcess(tmp_path, policy("[127.0.0.2]:25"), server="", run_args=("--allow-root",))
    try:
        relay.start()
        assert relay.proc is not None
        assert status(relay.proc.pid)["Uid"] == ["0", "0", "0", "0"]
        assert relay.terminate() == 0
    finally:
        relay.stop()


def test_root_without_user_is_refused_with_one_line(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, policy("[127.0.0.2]:25"), server="")
    result = run_mta("run", "--config", str(relay.policy_file), home=relay.home)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f'mta: {relay.policy_file}: server.user: refusing to run as root: set user = "mta" '
        "(an unprivileged user to switch to after binding) or allow_root = true in [server]"
    )
    assert not relay.home.exists()  # refused before anything was made


def test_a_group_binds_as_root_and_its_workers_serve_as_the_user(
    base: Path, tls_ca: trustme.CA
) -> None:
    """``workers = 2`` with ``user``: each worker binds (SO_REUSEPORT) as root, then
    becomes the user; the supervisor, which serves no SMTP and starts workers again,
    stays root, as Postfix's master does."""
    nobody = pwd.getpwnam("nobody")
    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as receiver:
        relay = RelayProcess(
            base, policy(f"[127.0.0.2]:{receiver.port}"), server='user = "nobody"', workers=2
        )
        try:
            relay.start()
            workers = relay.worker_pids()
            assert len(workers) == 2
            for pid in workers.values():
                assert status(pid)["Uid"] == [str(nobody.pw_uid)] * 4
                assert status(pid)["CapEff"] == ["0000000000000000"]
            relay.send(SENDER, ["bob@dest.test"], MESSAGE)
            receiver.wait_for(1, timeout=20)
            made = [relay.home, *relay.home.rglob("*")]
            owners = {}
            for path in made:
                with contextlib.suppress(FileNotFoundError):  # delivered, removed meanwhile
                    owners[str(path)] = path.lstat().st_uid
            assert set(owners.values()) == {nobody.pw_uid}, owners  # the group socket too
            assert relay.terminate() == 0
        finally:
            relay.stop()
