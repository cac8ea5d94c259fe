"""Postfix's socketmap protocol: netstring requests ``name key``, netstring replies
``OK data``, ``NOTFOUND ``, ``TEMP reason``, ``TIMEOUT reason``, ``PERM reason``
(Postfix ``socketmap_table(5)``; netstrings as D. J. Bernstein defines them).

Pure, sans-I/O (like h11, and postfix-mta-sts-resolver's ``netstring.StreamReader``):
the server feeds the bytes it read to a ``NetstringReader`` and takes complete payloads
out; ``next_payload`` returns ``None`` when it needs more data. Every size is bounded,
and a malformed stream raises one of the ``ParseError`` subclasses; after that the
reader stays broken (the stream cannot be re-synchronised), so the caller closes it.

    netstring = length ":" payload ","      ; length: decimal, no leading zeros
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_REPLY",
    "MAX_REQUEST",
    "BadLength",
    "BadRequest",
    "BadTerminator",
    "NetstringReader",
    "ParseError",
    "Reply",
    "Request",
    "Status",
    "TooLong",
    "encode",
    "parse_request",
]

MAX_REQUEST: Final = 1024  # "name key": a map name and a domain (<= 255) fit many times
MAX_REPLY: Final = 100_000  # Postfix's socketmap client refuses longer replies (max_reply_len)
_REASON_MAX: Final = 400  # a TEMP/PERM reason is a log line, not a document


class ParseError(ValueError):
    """The peer broke the protocol; the connection cannot continue."""


class TooLong(ParseError):
    """The announced length exceeds the reader's limit."""


class BadLength(ParseError):
    """The length prefix is not a decimal number followed by ``:``."""


class BadTerminator(ParseError):
    """The payload is not followed by ``,``."""


class BadRequest(ParseError):
    """A well-formed netstring that is not ``name key``."""


class NetstringReader:
    """Feed bytes in, take netstring payloads out.

    Parameters:
        max_length: the longest payload accepted (``TooLong`` beyond it, raised as soon
            as the length prefix says so: the payload itself is never buffered).
    """

    def __init__(self, max_length: int = MAX_REQUEST) -> None:
        self._max = max_length
        self._digits = len(str(max_length))
        self._buffer = bytearray()
        self._error: ParseError | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes read from the peer."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned payload."""
        return len(self._buffer)

    def next_payload(self) -> bytes | None:
        """The next complete payload, or ``None`` when more data is needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ParseError as err:
            self._error = err
            raise

    def _next(self) -> bytes | None:
        colon = self._buffer.find(b":", 0, self._digits + 1)
        if colon < 0:
            head = bytes(self._buffer[: self._digits + 1])
            if not head.isdigit() and head:
                raise BadLength(f"length prefix is not a decimal number: {head[:12]!r}")
            if len(head) > self._digits:
                raise TooLong(f"length prefix {head!r}... exceeds {self._max} bytes")
            return None
        prefix = bytes(self._buffer[:colon])
        if not prefix.isdigit() or (len(prefix) > 1 and prefix.startswith(b"0")):
            raise BadLength(f"bad length prefix {prefix[:12]!r}")
        length = int(prefix)
        if length > self._max:
            raise TooLong(f"announced length {length} exceeds {self._max} bytes")
        end = colon + 1 + length
        if len(self._buffer) <= end:
            return None
        if self._buffer[end] != ord(","):
            raise BadTerminator(
                f"expected ',' after {length} bytes, got {chr(self._buffer[end])!r}"
            )
        payload = bytes(self._buffer[colon + 1 : end])
        del self._buffer[: end + 1]
        return payload


@dataclass(frozen=True, slots=True)
class Request:
    """One lookup: the map ``name`` (the part after the last ``:`` in Postfix's
    ``socketmap:inet:host:port:name``) and the ``key``."""

    name: str
    key: str


def parse_request(payload: bytes) -> Request:
    """``b"name key"`` -> ``Request``; ``BadRequest`` without a name, a space or a key."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request is not UTF-8") from None
    name, sep, key = text.partition(" ")
    if not sep or not name or not key:
        raise BadRequest(f"expected 'name key', got {text[:60]!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadRequest("control character in request")
    return Request(name, key)


class Status(enum.Enum):
    """The first word of a reply (socketmap_table(5))."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply: ``OK`` with the table's value, or a status with a reason."""

    status: Status
    data: str = ""

    @classmethod
    def ok(cls, data: str) -> Reply:
        return cls(Status.OK, data)

    @classmethod
    def notfound(cls) -> Reply:
        return cls(Status.NOTFOUND)

    @classmethod
    def temp(cls, reason: str) -> Reply:
        return cls(Status.TEMP, _reason(reason))

    @classmethod
    def perm(cls, reason: str) -> Reply:
        return cls(Status.PERM, _reason(reason))

    def payload(self) -> bytes:
        """``OK data`` / ``NOTFOUND `` / ``TEMP reason`` ...: the netstring's payload."""
        return f"{self.status.value} {self.data}".encode()


def _reason(text: str) -> str:
    """One printable line, bounded: Postfix logs it as it is."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat[:_REASON_MAX]


def encode(payload: bytes) -> bytes:
    """``payload`` as a netstring; ``ValueError`` above ``MAX_REPLY`` (Postfix would refuse it)."""
    if len(payload) > MAX_REPLY:
        raise ValueError(f"reply of {len(payload)} bytes exceeds {MAX_REPLY}")
    return b"%d:%s," % (len(payload), payload)
