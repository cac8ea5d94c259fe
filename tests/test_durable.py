"""``durable.read_private``: the one gate for secret files (spool keys, AUTH passwords)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta import durable


def secret(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret\n")
    path.chmod(mode)
    return path


def test_reads_a_private_file(tmp_path: Path) -> None:
    assert durable.read_private(secret(tmp_path), 100) == b"s3cret\n"


def test_refuses_a_file_someone_else_owns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = secret(tmp_path)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:  # not root: the file is ours, so be someone else
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(durable.NotPrivate, match="is owned by uid"):
        durable.read_private(path, 100)


@pytest.mark.parametrize(
    ("mode", "group_read", "refused"),
    [
        (0o640, False, True),
        (0o640, True, False),
        (0o660, True, True),  # group write
        (0o604, True, True),
    ],
)
def test_group_and_others(tmp_path: Path, mode: int, group_read: bool, refused: bool) -> None:
    path = secret(tmp_path, mode)
    if refused:
        with pytest.raises(durable.NotPrivate, match=f"mode {mode:04o} lets"):
            durable.read_private(path, 100, group_read=group_read)
    else:
        assert durable.read_private(path, 100, group_read=group_read) == b"s3cret\n"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(durable.NotPrivate, match="not a regular file"):
        durable.read_private(fifo, 100)


def test_size_limit(tmp_path: Path) -> None:
    with pytest.raises(durable.NotPrivate, match="larger than 3 bytes"):
        durable.read_private(secret(tmp_path), 3)


def test_pieces_written_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "record"
    pieces = [b"head", b"", os.urandom(70_000), b"tail"]
    fd = durable.create_written_pieces(path, iter(pieces))
    os.close(fd)
    assert path.read_bytes() == b"".join(pieces)
    assert oct(path.stat().st_mode & 0o777) == oct(durable.FILE_MODE)
    read = list(durable.read_pieces(path, 65_536))
    assert [len(piece) for piece in read] == [65_536, 70_008 - 65_536]
    assert b"".join(read) == b"".join(pieces)


def test_a_failed_piece_leaves_no_file(tmp_path: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield b"sealed so far"
        raise ValueError("sealing failed")

    path = tmp_path / "record"
    with pytest.raises(ValueError, match="sealing failed"):
        durable.create_written_pieces(path, failing())
    assert not path.exists()


def test_pieces_are_written_whole_when_writev_writes_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writev`` may stop anywhere, even inside a piece: the rest still gets written."""
    real = os.writev

    def short(fd: int, buffers: list[memoryview]) -> int:
        return real(fd, [buffers[0][:7]])

    monkeypatch.setattr(os, "writev", short)
    pieces = [b"head", os.urandom(300_000), b"", b"tail" * 10]
    path = tmp_path / "record"
    os.close(durable.create_written_pieces(path, pieces))
    assert path.read_bytes() == b"".join(pieces)
