"""Durable file primitives shared by the key ring, the spool store and the MTA-STS cache.

A file counts as written only once its data is fsynced, it has been renamed (or, for a
new spool record, linked) into place and the directory holding the new name is
fsynced (RFC 5321 §6.1: accept a message only once it is on stable storage). Files are
created 0600, never through a symbolic link. Callers translate ``OSError`` into their
own errors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Final

FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
WRITE_BATCH: Final = 256 * 1024  # octets of pieces gathered for one writev


def create_written(path: Path, data: bytes) -> int:
    """Create ``path`` (it must not exist) and write ``data``; return the open descriptor.

    Nothing waits for the disk here (the data is in the page cache): ``settle`` does
    that. On failure the descriptor is closed and ``path`` removed.
    """
    return create_written_pieces(path, (data,))


def create_written_pieces(path: Path, pieces: Iterable[bytes]) -> int:
    """``create_written`` for data made piece by piece as it is written (a sealed spool
    record, chunk by chunk), so that it is never whole in memory. Pieces go out up to
    ``WRITE_BATCH`` octets at a time in one ``writev``: a small record is one system
    call, as it was when written whole."""
    fd = os.open(path, _CREATE, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        batch: list[bytes] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= WRITE_BATCH:
                _write_all(fd, batch)
                batch, size = [], 0
        _write_all(fd, batch)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """Write every byte of ``pieces``, in order (``writev`` may write only some)."""
    views = [memoryview(piece) for piece in pieces if piece]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


def write_new(path: Path, data: bytes, *, mtime_ns: int | None = None) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it (with its
    modification time set to ``mtime_ns`` first, when given)."""
    fd = create_written(path, data)
    try:
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(tmp: Path, final: Path, data: bytes, *, mtime_ns: int | None = None) -> None:
    """Write ``data`` to the new file ``tmp`` (fsynced), then atomically rename it to
    ``final``. On failure ``tmp`` is removed. The new name is durable only once the
    directory is fsynced (``fsync_dir``), as ``replace_durably`` does."""
    try:
        write_new(tmp, data, mtime_ns=mtime_ns)
        os.replace(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise


def replace_durably(tmp: Path, final: Path, data: bytes, *, mtime_ns: int | None = None) -> None:
    """``place`` then fsync the directory: ``final`` now survives a crash.

    If only the directory fsync fails, ``final`` is in place but may not survive a
    crash; the caller decides what to do about it.
    """
    place(tmp, final, data, mtime_ns=mtime_ns)
    fsync_dir(final.parent)


def settle(fd: int, tmp: Path, final: Path) -> None:
    """The waits for the disk after ``create_written(tmp)``: fsync the data, link it as
    ``final``, fsync the directory. ``final`` then survives a crash.

    A link, not a rename: it never replaces an existing ``final`` (``FileExistsError``),
    so a new file can never take the place of another, whatever its name. ``tmp`` is
    removed in any case; on failure ``final`` is too (the caller still closes ``fd``).
    """
    try:
        os.fsync(fd)
        os.link(tmp, final)
    finally:
        unlink_quietly(tmp)
    try:
        fsync_dir(final.parent)
    except BaseException:
        unlink_quietly(final)
        raise


_READ_PRIVATE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotPrivate(Exception):
    """A file that must be ours alone is not, or cannot be read; ``str()`` says why
    (without the path: the caller names the file and the setting)."""


def read_private(path: Path, limit: int, *, group_read: bool = False) -> bytes:
    """The bytes of a secret file (spool keys, AUTH password hashes), after refusing a
    link, a non-file (a FIFO would block: O_NONBLOCK), an owner other than us or root,
    access by others (and by the group unless ``group_read``) and more than ``limit``."""
    try:
        fd = os.open(path, _READ_PRIVATE)
    except FileNotFoundError:
        raise NotPrivate("does not exist") from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):
            raise NotPrivate("is a symbolic link; refusing to follow it") from None
        raise NotPrivate(f"cannot open: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPrivate("is not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise NotPrivate(f"is owned by uid {info.st_uid}, not by us or root")
        mode = stat.S_IMODE(info.st_mode)
        if mode & (0o037 if group_read else 0o077):
            who = "others" if group_read else "group or others"
            raise NotPrivate(f"mode {mode:04o} lets {who} access it; run chmod 600 {path}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > limit:
                raise NotPrivate(f"is larger than {limit} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_pieces(path: Path, size: int) -> Generator[bytes, None, None]:
    """The bytes of a regular file (without following a final link), ``size`` at a time:
    a large file is never whole in memory."""
    fd = os.open(path, _READ)
    with open(fd, "rb", buffering=0, closefd=True) as file:
        while piece := file.read(size):
            yield piece


def read_file(path: Path, limit: int = -1) -> bytes:
    """The bytes of a regular file (at most ``limit``), without following a final link."""
    fd = os.open(path, _READ)
    with open(fd, "rb", closefd=True) as file:
        return file.read(limit)


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
