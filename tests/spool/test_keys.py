"""The key ring: private key file or refusal, rotation and pruning that survive reloads."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from mta.errors import KeyFileError
from mta.spool.keys import KeyRing

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "spool.key"


def test_create_makes_a_private_file_with_one_key(key_file: Path) -> None:
    ring = KeyRing.create(key_file)
    assert mode_of(key_file) == 0o600
    assert mode_of(key_file.parent) == 0o700
    assert ring.ids() == [ring.active_id]
    key = ring.get(ring.active_id)
    assert key is not None
    assert len(key) == 32
    assert ring.get("missing") is None


def test_create_refuses_an_existing_file(key_file: Path) -> None:
    KeyRing.create(key_file)
    with pytest.raises(KeyFileError, match=re.escape(f"{key_file}: already exists")):
        KeyRing.create(key_file)


def test_create_ignores_the_umask(key_file: Path) -> None:
    old = os.umask(0o000)
    try:
        KeyRing.create(key_file)
    finally:
        os.umask(old)
    assert mode_of(key_file) == 0o600


def test_load_reads_comments_blank_lines_and_takes_the_last_key_as_active(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "k", f"# keys\n\nold {KEY_A}\n  # note\nnew {KEY_B}  \n")
    ring = KeyRing.load(path)
    assert ring.ids() == ["old", "new"]
    assert ring.active_id == "new"
    assert ring.get("old") == bytes(range(32))


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match=re.escape(f"{path}: does not exist")):
        KeyRing.load(path)


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = write_key_file(tmp_path / "real.key", f"k1 {KEY_A}\n")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match=re.escape(f"{link}: is a symbolic link")):
        KeyRing.load(link)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o700])
def test_loose_or_odd_modes(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "k", f"k1 {KEY_A}\n", mode)
    if mode & 0o077:
        with pytest.raises(
            KeyFileError, match=re.escape(f"{path}: mode {mode:04o} lets group or others")
        ):
            KeyRing.load(path)
    else:
        assert KeyRing.load(path).ids() == ["k1"]


@pytest.mark.parametrize("mode", [0o700, 0o750, 0o755, 0o770, 0o777, 0o1777, 0o730, 0o702])
def test_a_directory_others_can_write_in_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    path = write_key_file(directory / "spool.key", f"k1 {KEY_A}\n")
    directory.chmod(mode)
    if mode & 0o022:
        problem = f"{directory}: key directory mode {mode:04o} lets group or others replace"
        with pytest.raises(KeyFileError, match=re.escape(problem)) as info:
            KeyRing.load(path)
        assert "\n" not in str(info.value)
        with pytest.raises(KeyFileError, match=re.escape(problem)):
            KeyRing.create(directory / "new.key")
    else:
        assert KeyRing.load(path).ids() == ["k1"]


def test_a_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    write_key_file(real / "spool.key", f"k1 {KEY_A}\n")
    link = tmp_path / "keys"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match=re.escape(f"{link}: key directory is a symbolic link")):
        KeyRing.load(link / "spool.key")


def test_a_directory_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    path = write_key_file(directory / "spool.key", f"k1 {KEY_A}\n")
    real_lstat = os.lstat

    def lstat(target: os.PathLike[str] | str) -> os.stat_result:
        info = real_lstat(target)
        if Path(target) != directory:
            return info
        fields = list(info)
        fields[stat.ST_UID] = 4242
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)
    with pytest.raises(
        KeyFileError, match=re.escape(f"{directory}: key directory is owned by uid 4242")
    ):
        KeyRing.load(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=re.escape(f"{path}: is not a regular file")):
        KeyRing.load(path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "fifo.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match=re.escape(f"{path}: is not a regular file")):
        KeyRing.load(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "holds no keys"),
        ("# only a comment\n", "holds no keys"),
        (f"{KEY_A}\n", "line 1: expected '<key id> <base64 of 32 bytes>'"),
        (f"k1 {KEY_A} extra\n", "line 1: expected"),
        (f"# c\nk/1 {KEY_A}\n", "line 2: key id must be"),
        (f"{'k' * 65} {KEY_A}\n", "line 1: key id must be"),
        ("k1 not*base64\n", "line 1: key is not valid base64"),
        (f"k1 {base64.b64encode(bytes(16)).decode()}\n", "line 1: key is 16 bytes, expected 32"),
        (f"k1 {KEY_A}\nk1 {KEY_B}\n", "line 2: key id 'k1' appears twice"),
        ("k1 caf\xe9\n", "not an ASCII text key file"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=re.escape(str(path))) as info:
        KeyRing.load(path)
    assert problem in str(info.value)


def test_errors_never_quote_key_material(tmp_path: Path) -> None:
    short = base64.b64encode(b"sixteen byte key").decode()
    path = write_key_file(tmp_path / "k", f"k1 {short}\nk2 {KEY_A} junk\n")
    with pytest.raises(KeyFileError) as info:
        KeyRing.load(path)
    assert short not in str(info.value)
    path.write_text(f"k1 {KEY_A}\nk2 {KEY_A} junk\n")
    with pytest.raises(KeyFileError) as info:
        KeyRing.load(path)
    assert KEY_A not in str(info.value)


def test_too_large_a_file_is_refused(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "k", "#" * (2 << 20) + f"\nk1 {KEY_A}\n")
    with pytest.raises(KeyFileError, match="larger than"):
        KeyRing.load(path)


def test_rotate_keeps_old_keys_and_makes_the_new_one_active(key_file: Path) -> None:
    ring = KeyRing.create(key_file)
    old_id = ring.active_id
    old_key = ring.get(old_id)
    new_id = ring.rotate()
    assert new_id != old_id
    assert ring.active_id == new_id
    assert ring.ids() == [old_id, new_id]
    assert ring.get(old_id) == old_key
    assert ring.get(new_id) not in (None, old_key)
    assert mode_of(key_file) == 0o600
    assert sorted(p.name for p in key_file.parent.iterdir()) == [key_file.name]  # no temp left


def test_rotate_survives_reload(key_file: Path) -> None:
    ring = KeyRing.create(key_file)
    ring.rotate()
    new_id = ring.rotate()
    loaded = KeyRing.load(key_file)
    assert loaded.ids() == ring.ids()
    assert loaded.active_id == new_id
    assert all(loaded.get(k) == ring.get(k) for k in ring.ids())


def test_prune_drops_only_unreferenced_non_active_keys(tmp_path: Path) -> None:
    keys = "".join(f"k{i} {base64.b64encode(bytes([i]) * 32).decode()}\n" for i in range(1, 5))
    path = write_key_file(tmp_path / "k", keys)
    ring = KeyRing.load(path)
    assert ring.prune({"k2"}) == ["k1", "k3"]
    assert ring.ids() == ["k2", "k4"]
    assert ring.get("k2") == bytes([2]) * 32
    assert KeyRing.load(path).ids() == ["k2", "k4"]
    assert ring.prune(set()) == ["k2"]  # the active key stays even when unreferenced
    assert ring.ids() == ["k4"]
    assert ring.prune(set()) == []


def test_prune_with_nothing_to_drop_leaves_the_file_alone(key_file: Path) -> None:
    ring = KeyRing.create(key_file)
    before = key_file.stat().st_mtime_ns, key_file.read_bytes()
    assert ring.prune([ring.active_id]) == []
    assert (key_file.stat().st_mtime_ns, key_file.read_bytes()) == before


def test_reload_sees_another_processes_rotation(key_file: Path) -> None:
    ours = KeyRing.create(key_file)
    theirs = KeyRing.load(key_file)
    new_id = theirs.rotate()
    assert ours.get(new_id) is None
    ours.reload()
    assert ours.active_id == new_id


def test_rotate_builds_on_the_file_not_a_stale_copy(key_file: Path) -> None:
    ours = KeyRing.create(key_file)
    theirs = KeyRing.load(key_file)
    their_id = theirs.rotate()
    our_id = ours.rotate()
    assert KeyRing.load(key_file).ids() == [ours.ids()[0], their_id, our_id]


def test_reload_checks_the_file_again(key_file: Path) -> None:
    ring = KeyRing.create(key_file)
    key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="lets group or others"):
        ring.reload()
    with pytest.raises(KeyFileError, match="lets group or others"):
        ring.rotate()


def test_rotate_write_failure_is_a_key_file_error(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = KeyRing.create(key_file)
    ids = ring.ids()

    def fail(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(KeyFileError, match=re.escape(f"{key_file}: cannot write: No space left")):
        ring.rotate()
    monkeypatch.undo()
    assert ring.ids() == ids
    assert KeyRing.load(key_file).ids() == ids
    assert sorted(p.name for p in key_file.parent.iterdir()) == [key_file.name]
