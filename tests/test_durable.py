"""``durable.read_private``: the one gate for secret files (spool keys, AUTH passwords)."""

from __future__ import annotations

import os
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
