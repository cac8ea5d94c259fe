"""Transport receipts: one sealed, chained entry per event, and the check of the chain.

Pure: no I/O, no clock; randomness and key lookup are parameters, and files are read
through a ``read(size)`` callable. Each entry holds one event (``encode_event`` JSON)
sealed as a spool record (``RecordKind.RECEIPT``, the event's queue id in the header),
framed so a reader can walk the file and tell a torn final entry (a crash mid-append)
from damage in the middle. All integers are big-endian::

    entry  = frame header | body
    header = magic "\\xa5R" | body length u32 | CRC-32 of the six bytes before it (u32)
    body   = sequence number u64 | sealed record | MAC (32)
    MAC    = HMAC-SHA256(chain key, previous entry's MAC | sequence u64 | sealed record)
    chain key = HKDF-SHA256(the key-encryption key the record names, info
                "mta receipts chain")

The sequence number runs on across files. Every file starts with an *anchor* entry
whose payload names the previous file and the sequence number and MAC it ended with:
the anchor chains from them, so the chain runs on across days, and once older files
have expired the oldest anchor is where verification starts. A deleted, reordered,
edited or inserted entry breaks a sequence number or a MAC; the CRC only tells a frame
header cut short (torn: the bytes end inside the frame) from one that was changed.
What no chain detects: the newest entries removed from the end of the newest file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mta.events import Event, EventError, decode_event, encode_event
from mta.spool.record import Keys, Random, RecordError, RecordKind, read_header, seal, unseal

__all__ = [
    "GENESIS",
    "Anchor",
    "BadEntry",
    "Frame",
    "Link",
    "Opened",
    "Tail",
    "Verifier",
    "anchor_entry",
    "event_entry",
    "open_frame",
    "walk",
]

MAGIC: Final = b"\xa5R"
_HEAD: Final = struct.Struct(">2sI")
_CRC: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEAD.size + _CRC.size
_SEQ: Final = struct.Struct(">Q")
MAC_SIZE: Final = 32
MAX_BODY: Final = 1 << 20  # an event is a few kB; anything larger is damage
ANCHOR_QID: Final = "anchor"
CHAIN_INFO: Final = b"mta receipts chain"
_READ_CHUNK: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class Link:
    """Where the chain stands: the last entry's sequence number and MAC."""

    seq: int
    mac: bytes


GENESIS: Final = Link(0, bytes(MAC_SIZE))
"""What the very first anchor of a new log chains from."""


@dataclass(frozen=True, slots=True)
class Anchor:
    """The payload of a file's first entry: the end of the file before it."""

    previous: str | None  # the previous file's name; None for the first file ever
    link: Link


@dataclass(frozen=True, slots=True)
class Frame:
    """One framed entry as read from a file (not yet authenticated)."""

    index: int  # entry number in its file, from 1
    offset: int
    seq: int
    sealed: bytes
    mac: bytes

    @property
    def link(self) -> Link:
        return Link(self.seq, self.mac)


@dataclass(frozen=True, slots=True)
class Tail:
    """What follows the last whole entry: a torn entry (``torn``) or damage."""

    index: int  # the entry number it would have had
    offset: int
    torn: bool
    problem: str


@dataclass(frozen=True, slots=True)
class Opened:
    """An authenticated entry: an anchor or an event."""

    frame: Frame
    anchor: Anchor | None
    event: Event | None


class BadEntry(Exception):
    """The first entry that fails verification: file, entry number and what is wrong."""

    def __init__(self, file: str, entry: int, problem: str) -> None:
        super().__init__(f"{file}: entry {entry}: {problem}")
        self.file = file
        self.entry = entry
        self.problem = problem


# --- writing ---


@lru_cache(maxsize=16)
def chain_key(kek: bytes) -> bytes:
    """The MAC key derived from a key-encryption key (cached: HKDF per entry is wasted)."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=CHAIN_INFO).derive(kek)


def entry_mac(kek: bytes, previous: bytes, seq: int, sealed: bytes) -> bytes:
    return hmac.new(chain_key(kek), previous + _SEQ.pack(seq) + sealed, hashlib.sha256).digest()


def _entry(
    link: Link, payload: bytes, qid: str, key_id: str, kek: bytes, random: Random
) -> tuple[bytes, Link]:
    seq = link.seq + 1
    sealed = seal(payload, kind=RecordKind.RECEIPT, qid=qid, key_id=key_id, kek=kek, random=random)
    mac = entry_mac(kek, link.mac, seq, sealed)
    body = _SEQ.pack(seq) + sealed + mac
    head = _HEAD.pack(MAGIC, len(body))
    return head + _CRC.pack(zlib.crc32(head)) + body, Link(seq, mac)


def event_entry(
    link: Link, event: Event, *, key_id: str, kek: bytes, random: Random
) -> tuple[bytes, Link]:
    """The framed entry for ``event`` after ``link``, and the chain's new end."""
    payload = json.dumps(encode_event(event), separators=(",", ":")).encode()
    return _entry(link, payload, event.qid, key_id, kek, random)


def anchor_entry(anchor: Anchor, *, key_id: str, kek: bytes, random: Random) -> tuple[bytes, Link]:
    """The first entry of a file: chained from the end of ``anchor.previous``."""
    doc = {
        "anchor": {"file": anchor.previous, "seq": anchor.link.seq, "mac": anchor.link.mac.hex()}
    }
    payload = json.dumps(doc, separators=(",", ":")).encode()
    return _entry(anchor.link, payload, ANCHOR_QID, key_id, kek, random)


# --- reading ---


def walk(read: Callable[[int], bytes]) -> Iterator[Frame | Tail]:
    """The frames of one file in order; a ``Tail`` last when bytes follow the last whole
    entry. Torn: the bytes end inside a frame whose header is intact (or inside the
    header), or only zeros follow (a file system's fill after a crash)."""
    offset = 0
    index = 1
    while True:
        head = _read_exact(read, HEADER_SIZE)
        if not head:
            return
        if len(head) < HEADER_SIZE:
            yield Tail(index, offset, True, "entry cut short (frame header)")
            return
        magic, size = _HEAD.unpack_from(head)
        (crc,) = _CRC.unpack_from(head, _HEAD.size)
        if magic != MAGIC or crc != zlib.crc32(head[: _HEAD.size]):
            zeros = not any(head) and _only_zeros(read)
            yield Tail(index, offset, zeros, "zero-filled tail" if zeros else "bad frame header")
            return
        if not _SEQ.size + MAC_SIZE < size <= MAX_BODY:
            yield Tail(index, offset, False, f"impossible entry length {size}")
            return
        body = _read_exact(read, size)
        if len(body) < size:
            yield Tail(index, offset, True, "entry cut short")
            return
        (seq,) = _SEQ.unpack_from(body)
        yield Frame(index, offset, seq, body[_SEQ.size : -MAC_SIZE], body[-MAC_SIZE:])
        offset += HEADER_SIZE + size
        index += 1


def _read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    out = b""
    while len(out) < size:
        piece = read(size - len(out))
        if not piece:
            break
        out += piece
    return out


def _only_zeros(read: Callable[[int], bytes]) -> bool:
    while piece := read(_READ_CHUNK):
        if any(piece):
            return False
    return True


def open_frame(frame: Frame, keys: Keys) -> tuple[Opened, bytes]:
    """Authenticate and decode one entry on its own (not its place in the chain).

    Returns the entry and the key-encryption key it names; ``RecordError`` or
    ``EventError`` when it does not open or decode.
    """
    header = read_header(frame.sealed)
    if header.kind != RecordKind.RECEIPT:
        raise RecordError(f"record kind {header.kind.name}, expected RECEIPT")
    kek = keys(header.key_id)
    if kek is None:
        raise RecordError(f"sealed under unknown key id {header.key_id!r}")
    payload = unseal(frame.sealed, kind=RecordKind.RECEIPT, qid=header.qid, keys=keys)
    try:
        doc = json.loads(payload)
    except ValueError:
        raise EventError("payload is not JSON") from None
    if isinstance(doc, dict) and "anchor" in doc:
        return Opened(frame, _anchor(doc["anchor"]), None), kek
    event = decode_event(doc)
    if event.qid != header.qid:
        raise EventError("event queue id differs from the record's")
    return Opened(frame, None, event), kek


def _anchor(value: Any) -> Anchor:
    try:
        previous = value["file"]
        seq = value["seq"]
        mac = bytes.fromhex(value["mac"])
    except (TypeError, KeyError, ValueError):
        raise EventError("malformed anchor") from None
    if not (previous is None or isinstance(previous, str)) or not isinstance(seq, int):
        raise EventError("malformed anchor")
    if len(mac) != MAC_SIZE or seq < 0:
        raise EventError("malformed anchor")
    return Anchor(previous, Link(seq, mac))


# --- verifying ---


class Verifier:
    """Checks files of the log in order, oldest first, carrying the chain across them.

    ``keep_from``: the oldest file name that must still exist (files before it may have
    expired); the oldest file's anchor may name a missing previous file only if that
    name sorts before it.
    """

    def __init__(self, keys: Keys, keep_from: str = "") -> None:
        self._keys = keys
        self._keep_from = keep_from
        self._link: Link | None = None
        self._file: str | None = None
        self.entries = 0
        self.files = 0

    def check_file(self, name: str, items: Iterator[Frame | Tail], *, last: bool) -> None:
        """Check every entry of one file; ``BadEntry`` at the first that fails."""
        for item in items:
            if isinstance(item, Tail):
                if item.torn and last:
                    break  # a crash mid-append, or a write in progress
                what = "torn entry before the end of the log" if item.torn else item.problem
                raise BadEntry(name, item.index, what)
            self._check(name, item)
        self._file = name
        self.files += 1

    def _check(self, name: str, frame: Frame) -> None:
        def bad(problem: str) -> BadEntry:
            return BadEntry(name, frame.index, problem)

        try:
            opened, kek = open_frame(frame, self._keys)
        except (RecordError, EventError) as err:
            raise bad(f"does not open: {err}") from None
        start = self._start(name, frame, opened.anchor, bad)
        if frame.seq != start.seq + 1:
            raise bad(f"sequence number {frame.seq}, expected {start.seq + 1}")
        if not hmac.compare_digest(entry_mac(kek, start.mac, frame.seq, frame.sealed), frame.mac):
            raise bad("chain MAC does not match (an entry edited, moved or removed)")
        self._link = frame.link
        self.entries += 1

    def _start(
        self, name: str, frame: Frame, anchor: Anchor | None, bad: Callable[[str], BadEntry]
    ) -> Link:
        if frame.index > 1:
            if anchor is not None:
                raise bad("anchor in the middle of a file")
            if self._link is None:  # unreachable: entry 1 set it or raised
                raise bad("no chain to continue")
            return self._link
        if anchor is None:
            raise bad("file does not start with an anchor")
        if self._link is None:  # the oldest file kept: its anchor is the start
            if anchor.previous is not None and anchor.previous >= name:
                raise bad(f"anchor names a later file, {anchor.previous}")
            if anchor.previous is not None and anchor.previous >= self._keep_from:
                raise bad(f"previous file {anchor.previous} is missing (not expired)")
            return anchor.link
        if anchor.previous != self._file:
            raise bad(f"anchor names {anchor.previous}, the previous file is {self._file}")
        if anchor.link != self._link:
            raise bad(f"anchor does not match the end of {self._file}")
        return self._link
