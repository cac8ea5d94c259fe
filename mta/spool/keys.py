"""The spool's key-encryption keys: one key file, refused unless it is private.

The file (``spool.key_file``) holds text lines ``<key id> <base64 of 32 bytes>``;
``#`` starts a comment; the last key is the active one, which seals new records, and
older keys stay to open older records until ``prune`` finds them unreferenced.
Like OpenSSH with private keys, the file is refused (``KeyFileError`` naming the file
and the problem) when it is a symbolic link, not a regular file, not owned by us or
root, or readable or writable by group or others; and so is the file when its
directory is a symbolic link, is not owned by us or root, or is writable by group or
others (whoever can write there can swap the file). Every rewrite is atomic and durable
(temp file, fsync, rename, directory fsync), so a crash leaves the old or the new
key set, never a mix. Key material never appears in errors or logs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final

from mta import durable as _files
from mta.errors import KeyFileError
from mta.spool.record import KEY_SIZE, NAME

log = logging.getLogger(__name__)

MAX_KEY_FILE_SIZE: Final = 1 << 20
KEY_ID_BYTES: Final = 6
_PREAMBLE: Final = (
    "# mta spool key-encryption keys: <key id> <base64 of 32 bytes> per line.\n"
    "# The last key is active. Keep this file private (mode 0600). Removing a key\n"
    "# makes every spool record sealed under it unreadable: use `mta keys prune`.\n"
)

Random = Callable[[int], bytes]


class KeyRing:
    """The key-encryption keys of one key file, oldest first, the last one active.

    Build it with ``load`` or ``create``.
    """

    def __init__(self, path: Path, keys: dict[str, bytes], *, random: Random) -> None:
        if not keys:
            raise KeyFileError(f"{path}: holds no keys")
        self._path = path
        self._keys = dict(keys)
        self._random = random

    @classmethod
    def load(cls, path: Path, *, random: Random = os.urandom) -> KeyRing:
        """Read and check the key file at ``path``."""
        return cls(path, _load(path), random=random)

    @classmethod
    def create(cls, path: Path, *, random: Random = os.urandom) -> KeyRing:
        """Create a new key file with one fresh key (``KeyFileError`` if it exists)."""
        try:
            return cls._create(path, random)
        except FileExistsError:
            raise KeyFileError(f"{path}: already exists") from None
        except OSError as err:
            raise KeyFileError(f"{path}: cannot create: {err.strerror}") from None

    @classmethod
    def _create(cls, path: Path, random: Random) -> KeyRing:
        keys = {_new_id(random, ()): _new_key(random)}
        if not path.parent.exists():
            path.parent.mkdir(mode=_files.DIR_MODE, parents=True)
        _check_directory(path)
        _files.write_new(path, _format(keys).encode("ascii"))
        _files.fsync_dir(path.parent)
        log.debug("spool.keys.created", extra={"key_file": str(path)})  # app logs mta.init
        return cls(path, keys, random=random)

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    @property
    def active_id(self) -> str:
        """The id of the key that seals new records."""
        return next(reversed(self._keys))

    def get(self, key_id: str) -> bytes | None:
        """The key with this id, or None."""
        return self._keys.get(key_id)

    def ids(self) -> list[str]:
        """Every key id, oldest first (the last is active)."""
        return list(self._keys)

    def reload(self) -> None:
        """Re-read the key file (it may have been rotated or pruned by another process)."""
        self._keys = _load(self._path)

    def adopt(self, other: KeyRing) -> None:
        """Take the keys of ``other`` (a fresh ``load`` of the file, judged fit to use)."""
        self._keys = dict(other._keys)

    def rotate(self) -> str:
        """Add a fresh key and make it active; older keys stay. Returns the new id."""
        self.reload()
        key_id = _new_id(self._random, self._keys)
        keys = {**self._keys, key_id: _new_key(self._random)}
        self._save(keys)
        log.info("spool.keys.rotated", extra={"key_id": key_id})
        return key_id

    def prune(self, referenced: Collection[str]) -> list[str]:
        """Drop the keys that are neither active nor ``referenced``; return their ids."""
        self.reload()
        active = self.active_id
        dropped = [k for k in self._keys if k != active and k not in referenced]
        if dropped:
            self._save({k: v for k, v in self._keys.items() if k not in dropped})
            log.info("spool.keys.pruned", extra={"key_ids": ",".join(dropped)})
        return dropped

    def _save(self, keys: dict[str, bytes]) -> None:
        tmp = self._path.with_name(f".{self._path.name}.{self._random(8).hex()}.tmp")
        try:
            _files.replace_durably(tmp, self._path, _format(keys).encode("ascii"))
        except OSError as err:
            raise KeyFileError(f"{self._path}: cannot write: {err.strerror}") from None
        self._keys = keys


def _new_id(random: Random, taken: Collection[str]) -> str:
    while (key_id := random(KEY_ID_BYTES).hex()) in taken:
        pass
    return key_id


def _new_key(random: Random) -> bytes:
    key = random(KEY_SIZE)
    if len(key) != KEY_SIZE:
        raise ValueError(f"random source returned {len(key)} bytes, expected {KEY_SIZE}")
    return key


def _format(keys: dict[str, bytes]) -> str:
    lines = [f"{key_id} {base64.b64encode(key).decode('ascii')}\n" for key_id, key in keys.items()]
    return _PREAMBLE + "".join(lines)


# --- reading and checking ---


def _load(path: Path) -> dict[str, bytes]:
    return _parse(path, _read_private(path))


def _check_directory(path: Path) -> None:
    """Refuse the key file's directory when someone else could swap the file in it."""
    directory = path.parent
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return  # the file is missing too; reading it says so
    except OSError as err:
        raise KeyFileError(f"{directory}: key directory: cannot inspect: {err.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise KeyFileError(f"{directory}: key directory is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(f"{directory}: key directory is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise KeyFileError(
            f"{directory}: key directory is owned by uid {info.st_uid}, not by us or root"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            f"{directory}: key directory mode {mode:04o} lets group or others replace the key "
            f"file; run chmod 700 {directory}"
        )


def _read_private(path: Path) -> str:
    """The text of the key file, after checking that nobody else could read or change it."""
    _check_directory(path)
    try:
        data = _files.read_private(path, MAX_KEY_FILE_SIZE)
    except _files.NotPrivate as err:
        raise KeyFileError(f"{path}: {err}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: is not an ASCII text key file") from None


def _parse(path: Path, text: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, key = _parse_line(path, number, line)
        if key_id in keys:
            raise KeyFileError(f"{path}: line {number}: key id {key_id!r} appears twice")
        keys[key_id] = key
    if not keys:
        raise KeyFileError(f"{path}: holds no keys")
    return keys


def _parse_line(path: Path, number: int, line: str) -> tuple[str, bytes]:
    """One ``<key id> <base64>`` line. Errors never quote the line: it may hold a key."""
    where = f"{path}: line {number}"
    fields = line.split()
    if len(fields) != 2:
        raise KeyFileError(f"{where}: expected '<key id> <base64 of {KEY_SIZE} bytes>'")
    key_id, encoded = fields
    if not NAME.fullmatch(key_id) or len(key_id) > 64:
        raise KeyFileError(f"{where}: key id must be 1-64 of A-Z a-z 0-9 . _ -")
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise KeyFileError(f"{where}: key is not valid base64") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"{where}: key is {len(key)} bytes, expected {KEY_SIZE}")
    return key_id, key
