"""Fault: the spool cannot be written during DATA -> ``452 4.3.1`` when the disk is full
(ENOSPC, EDQUOT), ``451 4.3.0`` for any other I/O error (EIO), nothing left behind,
and the relay keeps serving once the disk is usable again.

Two ways in:

- a real full file system: the relay process keeps its spool on a small tmpfs mounted
  for the test (we run as root here; elsewhere the test is skipped with the reason),
  filled up to the last page or to a few pages short of the message, so the write
  fails before or part way through the record;
- an in-process relay (``app.start``) whose spool meets a write error at the OS boundary
  (``os`` as ``mta.durable`` sees it): ENOSPC after a partial write, EIO from
  fsync of the record, EIO from fsync of ``msg/`` after the rename. These are the
  failures a full disk does not produce but a failing one does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import smtplib
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import trustme

from mta import app, config
from mta import durable as _files
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, client_tls, free_port, policy

SENDER = "alice@sender.test"
FS_SIZE = 4 * 1024 * 1024
BIG_BODY = 256 * 1024  # bytes of message body: larger than what is left on the disk


def message(token: str, size: int = 0) -> str:
    body = ("x" * 76 + "\r\n") * (size // 78)
    return f"From: {SENDER}\r\nTo: bob@dest.test\r\nSubject: {token}\r\n\r\n{token}\r\n{body}"


def session(port: int) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20)
    smtp.starttls(context=client_tls())
    return smtp


def send_refused(smtp: smtplib.SMTP, token: str, size: int) -> tuple[int, bytes]:
    """Send a message that must not be accepted; the reply to the end of DATA."""
    with pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail(SENDER, ["bob@dest.test"], message(token, size))
    return refused.value.smtp_code, refused.value.smtp_error


def spool_entries(spool: Path) -> dict[str, list[str]]:
    """File names in the spool's record directories (the control socket is not one)."""
    return {
        name: sorted(
            p.name for p in (spool / name).iterdir() if not stat.S_ISSOCK(p.lstat().st_mode)
        )
        for name in ("tmp", "msg", "state", "quarantine")
    }


def subjects(receiver: Receiver) -> list[str]:
    out = []
    for got in receiver.messages:
        for line in got.content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Fill the file system of ``path`` to the last page, then give back ``leave`` bytes."""
    filler = path / "filler"
    chunk = b"\0" * 65536

    def write_all() -> None:
        for _ in range(FS_SIZE // len(chunk) + 2):  # bounded: the file system is this small
            os.write(fd, chunk)

    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(OSError, match="No space left") as full:
            write_all()
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# --- a real full file system ---


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``FS_SIZE`` bytes mounted for this test (root only)."""
    mount = tmp_path / "spoolfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (the in-process variant still runs)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10, check=False)


@pytest.mark.parametrize("left", [0, 64 * 1024], ids=["no-space", "space-runs-out-mid-record"])
def test_full_disk_during_data_is_452_and_leaves_nothing(
    left: int, small_fs: Path, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    spool = small_fs / "spool"
    with Receiver("127.0.0.151", tls="fs", ca=tls_ca) as receiver:
        relay = RelayProcess(
            tmp_path, policy(f"[127.0.0.151]:{receiver.port}", extra=f'[spool]\npath = "{spool}"\n')
        )
        try:
            relay.start()
            filler = fill(small_fs, left)
            before = spool_entries(spool)
            space = free_bytes(small_fs)
            assert space <= left + 4096, space
            with session(relay.port) as smtp:
                code, text = send_refused(smtp, "refused", BIG_BODY)
                assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
                # Nothing half-written: no record, no temp file, and no space held by
                # a removed file that is still open.
                assert spool_entries(spool) == before
                assert free_bytes(small_fs) == space
                # What fits still goes through, in the same session.
                if left:
                    smtp.sendmail(SENDER, ["bob@dest.test"], message("small-while-full"))
                filler.unlink()  # space is back
                smtp.sendmail(SENDER, ["bob@dest.test"], message("big-after", BIG_BODY))
            relay.send(SENDER, ["bob@dest.test"], message("new-session"))
            expected = ["big-after", "new-session"] + (["small-while-full"] if left else [])
            receiver.wait_for(len(expected), timeout=20)
            assert relay.proc is not None
            assert relay.proc.poll() is None  # still running
        finally:
            relay.stop()
    assert sorted(subjects(receiver)) == sorted(expected)
    assert "receive.spool_failed" in relay.log
    assert "No space left on device" in relay.log


# --- write errors injected at the OS boundary, relay in process ---


class FaultyOs:
    """``os`` as ``mta.durable`` sees it, with at most one armed fault.

    ``arm("write")``: the next record write stores half its bytes, then ENOSPC.
    ``arm("fsync")``: the next fsync of a file fails with EIO.
    ``arm("fsync-dir")``: the next fsync of a directory fails with EIO (after the rename).
    A fault fires once, then the disk behaves again.
    """

    def __init__(self) -> None:
        self._armed: str | None = None
        self._lock = threading.Lock()
        self.fired: list[str] = []

    def arm(self, fault: str) -> None:
        with self._lock:
            self._armed = fault

    def _fire(self, fault: str) -> bool:
        with self._lock:
            if self._armed != fault:
                return False
            self._armed = None
            self.fired.append(fault)
            return True

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if self._armed == "write" and len(data) > 1 and self._fire("write"):
            written = os.write(fd, data[: len(data) // 2])
            assert written > 0
            self._armed = "write-rest"
            return written
        if self._fire("write-rest"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def writev(self, fd: int, buffers: Any) -> int:
        """The spool writes records with ``writev``: the same faults as ``write``."""
        return self.write(fd, b"".join(buffers))

    def fsync(self, fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if self._fire("fsync-dir" if is_dir else "fsync"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


class InProcessRelay:
    """``app.start(config)`` on an event loop in a background thread."""

    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.relay: app.Relay | None = None

    def __enter__(self) -> InProcessRelay:
        self.thread.start()
        self.relay = asyncio.run_coroutine_threadsafe(app.start(self.config), self.loop).result(20)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.relay is not None:
            asyncio.run_coroutine_threadsafe(self.relay.close(grace=2), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# A full disk is "insufficient storage"; a failing one is a local error (Postfix's
# cleanup says 451 4.3.0 for a write error, 452 4.3.1 only for lack of space).
FAULT_REPLIES: dict[str, tuple[int, bytes]] = {
    "write": (452, b"4.3.1"),  # ENOSPC part way through the record
    "fsync": (451, b"4.3.0"),  # EIO
    "fsync-dir": (451, b"4.3.0"),  # EIO
}


@pytest.mark.parametrize("fault", FAULT_REPLIES)
def test_spool_write_error_during_data_says_why_and_leaves_nothing(
    fault: str, tls_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faulty = FaultyOs()
    monkeypatch.setattr(_files, "os", faulty)
    port = free_port()
    with Receiver("127.0.0.152", tls="fs", ca=tls_ca) as receiver:
        listener = f'[[listener]]\naddress = "127.0.0.1"\nport = {port}\n\n'
        metrics_off = '[metrics]\nlisten = ""\n\n'  # the default port is one port for all
        text = listener + metrics_off + policy(f"[127.0.0.152]:{receiver.port}")
        cfg = config.parse_text(text, "fault.toml", tmp_path / "var")
        spool = cfg.spool.path
        with InProcessRelay(cfg), session(port) as smtp:
            token = uuid.uuid4().hex
            faulty.arm(fault)
            code, reply = send_refused(smtp, token, 4 * 1024)
            assert (code, reply[:5]) == FAULT_REPLIES[fault], (code, reply)
            assert faulty.fired[:1] == [fault]
            assert spool_entries(spool) == {"tmp": [], "msg": [], "state": [], "quarantine": []}
            smtp.sendmail(SENDER, ["bob@dest.test"], message("after-the-fault"))
            receiver.wait_for(1, timeout=20)
    assert subjects(receiver) == ["after-the-fault"]
