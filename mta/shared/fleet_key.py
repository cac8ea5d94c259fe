"""The fleet key: what every relay of a fleet shares to seal what it puts in Redis.

Redis is a store the relays trust to keep data, not to keep it secret: the MTA-STS
cache and the TLS-RPT counts name recipient domains, the counts name MX hosts and IPs.
So every value is sealed (AES-256-GCM, a random 96-bit nonce, the Redis key name as
associated data, so a value moved to another key does not open), and every key name
that depends on a domain carries an HMAC-SHA256 of it instead of the domain. Both
subkeys are derived from one 32-byte file (HKDF-SHA256, distinct labels), the same on
every relay: ``[shared] key_file``, mode 0600, created with ``mta keys shared-create``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mta import durable
from mta.errors import KeyFileError

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
VERSION: Final = b"\x01"
PREFIX: Final = "mta:"  # every key the relays write starts with it
_NAME_LABEL: Final = b"mta shared key names v1"
_SEAL_LABEL: Final = b"mta shared values v1"


class Unsealable(ValueError):
    """A value that does not open under our key (another fleet's, tampered, moved)."""


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


class FleetKey:
    """Seals values and names keys under the fleet's 32-byte key.

    Parameters:
        key: the 32 bytes of ``[shared] key_file``.
        random: nonce source (``os.urandom``; a test may pass its own).
    """

    def __init__(self, key: bytes, random: Callable[[int], bytes] = os.urandom) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a fleet key is {KEY_SIZE} bytes, not {len(key)}")
        self._names = _derive(key, _NAME_LABEL)
        self._aead = AESGCM(_derive(key, _SEAL_LABEL))
        self._random = random

    @classmethod
    def load(cls, path: Path) -> FleetKey:
        """The key in ``path``: a private regular file of exactly 32 bytes
        (``KeyFileError`` naming the file otherwise)."""
        try:
            data = durable.read_private(path, KEY_SIZE + 1)
        except durable.NotPrivate as err:
            raise KeyFileError(f"{path}: {err}") from None
        if len(data) != KEY_SIZE:
            raise KeyFileError(f"{path}: a fleet key is {KEY_SIZE} bytes, this has {len(data)}")
        return cls(data)

    def name(self, kind: str, *parts: str) -> str:
        """The Redis key of ``kind`` for ``parts`` (a domain, a day...): ``mta:<kind>:``
        and 32 hex digits of HMAC-SHA256, which says nothing about the parts."""
        digest = hmac.new(self._names, "\0".join((kind, *parts)).encode(), hashlib.sha256)
        return f"{PREFIX}{kind}:{digest.hexdigest()[:32]}"

    def seal(self, name: str, plaintext: bytes) -> bytes:
        """``plaintext`` sealed for the key ``name``: version, nonce, ciphertext and tag."""
        nonce = self._random(NONCE_SIZE)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext, name.encode())

    def unseal(self, name: str, sealed: bytes) -> bytes:
        """What ``seal(name, ...)`` sealed; ``Unsealable`` when it does not open."""
        if len(sealed) < 1 + NONCE_SIZE + 16 or sealed[:1] != VERSION:
            raise Unsealable("not a sealed value")
        nonce, body = sealed[1 : 1 + NONCE_SIZE], sealed[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, body, name.encode())
        except InvalidTag:
            raise Unsealable("does not open under the fleet key") from None


def create(path: Path, random: Callable[[int], bytes] = os.urandom) -> None:
    """Write a new fleet key to ``path`` (mode 0600, never over an existing file)."""
    path.parent.mkdir(mode=durable.DIR_MODE, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, random(KEY_SIZE))
        os.fsync(fd)
    finally:
        os.close(fd)
