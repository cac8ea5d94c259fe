"""SMTP AUTH credentials: a file of scrypt password hashes, and the aiosmtpd authenticator.

One line per user, ``user:$scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (salt and hash in
unpadded standard base64); ``#`` starts a comment. ``mta passwd USER`` writes it
through ``add_user`` (temp file, fsync, rename; mode 0600). The file is refused when
others may write or read it, since a writable file lets anyone add a user.

Verification costs one scrypt run (about 16 MiB, tens of milliseconds) whether or not
the user exists, and compares digests in constant time, so neither timing nor the
reply tells a client which user names exist. Passwords are never logged or kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mta import durable
from mta.errors import ConfigError

log = logging.getLogger(__name__)

SCRYPT_N: Final = 16384
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
# Bounds on parameters read from the file: a hostile line must not cost the loop seconds.
_MAX_N: Final = 1 << 20
MAX_PASSWORD_FILE: Final = 16 << 20  # about 100,000 users
_MAX_R: Final = 32
_MAX_P: Final = 16
_MAX_MEM: Final = 256 * 1024 * 1024

_LINE = re.compile(
    r"(?P<user>[^:\s]+):\$scrypt\$n=(?P<n>\d+),r=(?P<r>\d+),p=(?P<p>\d+)"
    r"\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)"
)
_USER = re.compile(r"[^:\s]{1,255}")


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """One stored password: scrypt parameters, salt and derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def matches(self, password: bytes) -> bool:
        derived = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(derived, self.digest)

    def encode(self) -> str:
        salt, digest = _b64(self.salt), _b64(self.digest)
        return f"$scrypt$n={self.n},r={self.r},p={self.p}${salt}${digest}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_MAX_MEM, dklen=length)


def hash_password(password: str, *, random: Callable[[int], bytes] = os.urandom) -> ScryptHash:
    """A fresh hash of ``password`` with the default parameters and a random salt."""
    salt = random(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return ScryptHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, digest)


def parse_line(line: str) -> tuple[str, ScryptHash]:
    """One ``user:$scrypt$...`` line -> (user, hash); ``ValueError`` says what is wrong."""
    match = _LINE.fullmatch(line)
    if not match:
        raise ValueError("expected user:$scrypt$n=N,r=R,p=P$salt$hash")
    n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
    if n < 2 or n & (n - 1) or n > _MAX_N or not 0 < r <= _MAX_R or not 0 < p <= _MAX_P:
        raise ValueError(f"scrypt parameters n={n},r={r},p={p} out of range")
    try:
        salt, digest = _unb64(match["salt"]), _unb64(match["hash"])
    except ValueError:
        raise ValueError("salt or hash is not base64") from None
    if len(digest) < 16:
        raise ValueError("hash too short")
    return match["user"], ScryptHash(n, r, p, salt, digest)


def _read_lines(path: Path) -> list[str]:
    """The file's lines, after the checks of ``durable.read_private``. The group may read
    it (an admin group that manages users), nobody else."""
    try:
        data = durable.read_private(path, MAX_PASSWORD_FILE, group_read=True)
    except durable.NotPrivate as err:
        raise ConfigError(path, "auth.password_file", str(err)) from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(path, "auth.password_file", "not UTF-8 text") from None


class PasswordFile:
    """The users allowed to AUTH, loaded once (restart or reload to pick up changes)."""

    def __init__(self, users: dict[str, ScryptHash]) -> None:
        self._users = dict(users)
        # Unknown users are checked against this, so they cost as much as known ones.
        self._decoy = ScryptHash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * SALT_BYTES, b"\0" * 32)

    @classmethod
    def load(cls, path: Path) -> PasswordFile:
        """Read and check a password file; ``ConfigError`` names the file and the line."""
        users: dict[str, ScryptHash] = {}
        for number, raw in enumerate(_read_lines(path), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                user, hashed = parse_line(line)
            except ValueError as err:
                raise ConfigError(path, f"line {number}", str(err)) from None
            if user in users:
                raise ConfigError(path, f"line {number}", f"user {user!r} appears twice")
            users[user] = hashed
        return cls(users)

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s; the same cost for unknown users."""
        hashed = self._users.get(user)
        ok = (hashed or self._decoy).matches(password.encode("utf-8"))
        return ok and hashed is not None

    def authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's ``authenticator`` hook for PLAIN and LOGIN.

        On success the session's ``auth_data`` is the user name, never the password.
        """
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            user = auth_data.login.decode("utf-8")
            password = auth_data.password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        if self.verify(user, password):
            log.info("receive.auth.ok", extra={"client": peer, "mechanism": mechanism})
            return AuthResult(success=True, auth_data=user)
        log.info("receive.auth.failed", extra={"client": peer, "mechanism": mechanism})
        return AuthResult(success=False, handled=False)


def add_user(
    path: Path, user: str, password: str, *, random: Callable[[int], bytes] = os.urandom
) -> None:
    """Set ``user``'s password in the file (created 0600 if absent), replacing an old entry.

    The new file is written beside the old one, fsynced and renamed over it, so a
    crash leaves either the old file or the new one.
    """
    if not _USER.fullmatch(user):
        raise ValueError("user names are 1-255 characters without ':' or white space")
    if not password:
        raise ValueError("empty password")
    lines = _read_lines(path) if path.exists() or path.is_symlink() else []
    entry = f"{user}:{hash_password(password, random=random).encode()}"
    out: list[str] = []
    replaced = False
    for line in lines:
        if line.strip().partition(":")[0] == user and not line.lstrip().startswith("#"):
            if not replaced:
                out.append(entry)
            replaced = True
        else:
            out.append(line)
    if not replaced:
        out.append(entry)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    durable.replace_durably(tmp, path, ("\n".join(out) + "\n").encode("utf-8"))
