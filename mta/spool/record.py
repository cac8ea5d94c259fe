"""The spool record format: one sealed, self-describing file per message or state.

Pure: no I/O, no clock; randomness is a parameter. A record is a header followed by
a body sealed with the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015;
as in age's payload and Tink's streaming AEAD), so that a reader can hand on each
chunk as soon as it is authenticated, and a truncated, reordered or spliced record
fails instead of yielding a shorter message. All integers are big-endian::

    header = "MTA1" | version u8 (1) | kind u8 (1 message, 2 state, 3 key check,
             4 transport receipt)
             | u8 length | key id (ascii) | u8 length | qid (ascii)
             | nonce prefix (7) | wrap nonce (12) | wrapped data key (48)
    body   = chunk+, each AES-256-GCM(data key, nonce, plaintext, aad = header)
    nonce  = nonce prefix | chunk index u32 | last flag u8 (1 on the final chunk)

Every chunk but the final one holds exactly ``CHUNK_SIZE`` bytes of plaintext; the
final one holds 1 to ``CHUNK_SIZE`` bytes (0 only when the whole payload is empty).
The data key is fresh and random per record and is wrapped (AES-256-GCM) under the
key-encryption key named by the key id, with every header byte before the wrap nonce
as associated data. Any failure to parse or authenticate is a ``RecordError``.
"""

from __future__ import annotations

import contextlib
import enum
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mta.errors import SpoolCorrupt

MAGIC: Final = b"MTA1"
VERSION: Final = 1
CHUNK_SIZE: Final = 64 * 1024
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
NONCE_PREFIX_SIZE: Final = 7
WRAP_NONCE_SIZE: Final = 12
WRAPPED_KEY_SIZE: Final = KEY_SIZE + TAG_SIZE
MAX_NAME: Final = 255
MAX_HEADER_SIZE: Final = (
    len(MAGIC) + 2 + 2 * (1 + MAX_NAME) + NONCE_PREFIX_SIZE + WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE
)
MAX_CHUNKS: Final = 1 << 32

NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,255}")
"""What a key id or a qid may be: short, ASCII, safe in a file name and a log line."""

Random = Callable[[int], bytes]
Keys = Callable[[str], bytes | None]

_CHUNK_NONCE: Final = struct.Struct(">IB")


class RecordKind(enum.IntEnum):
    """What a record holds: a queued message, the delivery state of one, a known
    plaintext that tells whether a key is the one the spool was sealed under, or one
    entry of the transport receipt log (``mta.report.receipts``)."""

    MESSAGE = 1
    STATE = 2
    KEY_CHECK = 3
    RECEIPT = 4


class RecordError(SpoolCorrupt):
    """A record failed to parse or authenticate; it goes to quarantine, never retried."""


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """A parsed header. ``raw`` is its bytes as stored: the AAD of every chunk."""

    kind: RecordKind
    key_id: str
    qid: str
    nonce_prefix: bytes
    wrap_nonce: bytes
    wrapped_key: bytes
    raw: bytes

    @property
    def wrap_aad(self) -> bytes:
        """The header bytes before the wrap nonce: what the wrapped data key is bound to."""
        return self.raw[: len(self.raw) - WRAP_NONCE_SIZE - WRAPPED_KEY_SIZE]


# --- header ---


def _encode_name(name: str, what: str) -> bytes:
    if not NAME.fullmatch(name):
        raise ValueError(f"{what} must match {NAME.pattern}, got {name!r}")
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw


class _NeedMore(Exception):
    """The header is not complete yet (internal to parsing)."""


class _Cursor:
    """Reads header fields from the front of a buffer; ``_NeedMore`` when it runs out."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise _NeedMore
        out = bytes(self.data[self.pos : end])
        self.pos = end
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def name(self, what: str) -> str:
        raw = self.take(self.byte())
        text = raw.decode("ascii", "replace")
        if not NAME.fullmatch(text):
            raise RecordError(f"malformed {what} in record header")
        return text


def _parse_header(data: bytes | bytearray) -> RecordHeader | None:
    """The header at the start of ``data``; None while ``data`` is too short to tell."""
    cursor = _Cursor(data)
    try:
        if cursor.take(len(MAGIC)) != MAGIC:
            raise RecordError("not a spool record (bad magic)")
        if (version := cursor.byte()) != VERSION:
            raise RecordError(f"unsupported record version {version}")
        kind = _kind(cursor.byte())
        key_id = cursor.name("key id")
        qid = cursor.name("qid")
        prefix = cursor.take(NONCE_PREFIX_SIZE)
        wrap_nonce = cursor.take(WRAP_NONCE_SIZE)
        wrapped = cursor.take(WRAPPED_KEY_SIZE)
    except _NeedMore:
        return None
    raw = bytes(data[: cursor.pos])
    return RecordHeader(kind, key_id, qid, prefix, wrap_nonce, wrapped, raw)


def _kind(value: int) -> RecordKind:
    try:
        return RecordKind(value)
    except ValueError:
        raise RecordError(f"unknown record kind {value}") from None


def read_header(data: bytes) -> RecordHeader:
    """Parse the header at the start of ``data`` (the body, if any, is not looked at)."""
    header = _parse_header(data)
    if header is None:
        raise RecordError("truncated record header")
    return header


def unwrap_data_key(header: RecordHeader, kek: bytes) -> bytes:
    """The record's data key, unwrapped with ``kek`` (``RecordError`` if it is not the key
    the record was sealed under). Needs the header only: a cheap test of a key."""
    try:
        return AESGCM(kek).decrypt(header.wrap_nonce, header.wrapped_key, header.wrap_aad)
    except InvalidTag:
        raise RecordError("record data key failed authentication") from None


# --- chunks ---


class _ChunkCipher:
    """AES-256-GCM under one data key, nonce = prefix | index | last, AAD = header."""

    def __init__(self, data_key: bytes, prefix: bytes, header: bytes) -> None:
        self._aead = AESGCM(data_key)
        self._prefix = prefix
        self._header = header

    def _nonce(self, index: int, last: bool) -> bytes:
        if index >= MAX_CHUNKS:
            raise RecordError("record has too many chunks")
        return self._prefix + _CHUNK_NONCE.pack(index, int(last))

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, last), plaintext, self._header)

    def open(self, index: int, ciphertext: bytes | memoryview, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, last), ciphertext, self._header)
        except InvalidTag:
            raise RecordError(f"record chunk {index} failed authentication") from None


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def _random_bytes(random: Random, size: int) -> bytes:
    out = random(size)
    if len(out) != size:
        raise ValueError(f"random source returned {len(out)} bytes, expected {size}")
    return out


# --- sealing ---


class Sealer:
    """Seals one record as a stream: ``header()``, then ``update()`` any number of
    times, then ``finish()`` once. Concatenated, the outputs are the record.

    ``update`` holds back up to one chunk of plaintext, because only ``finish`` knows
    which chunk is the final one.

    Parameters:
        kind: what the record holds.
        qid: the queue id the record belongs to (bound into the header).
        key_id: the id of ``kek`` in the key ring.
        kek: the 32-byte key-encryption key that wraps the fresh data key.
        random: source of random bytes (``os.urandom`` in production).
        chunk_size: plaintext bytes per chunk; the on-disk format uses ``CHUNK_SIZE``.
    """

    def __init__(
        self,
        *,
        kind: RecordKind,
        qid: str,
        key_id: str,
        kek: bytes,
        random: Random,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        _check_chunk_size(chunk_size)
        if len(kek) != KEY_SIZE:
            raise ValueError(f"key-encryption key must be {KEY_SIZE} bytes")
        # One draw for all three (each call to the system's generator is a system call).
        fresh = _random_bytes(random, KEY_SIZE + NONCE_PREFIX_SIZE + WRAP_NONCE_SIZE)
        data_key = fresh[:KEY_SIZE]
        prefix = fresh[KEY_SIZE : KEY_SIZE + NONCE_PREFIX_SIZE]
        wrap_nonce = fresh[KEY_SIZE + NONCE_PREFIX_SIZE :]
        wrap_aad = (
            MAGIC
            + bytes([VERSION, kind])
            + _encode_name(key_id, "key id")
            + _encode_name(qid, "qid")
            + prefix
        )
        wrapped = AESGCM(kek).encrypt(wrap_nonce, data_key, wrap_aad)
        self._header = wrap_aad + wrap_nonce + wrapped
        self._cipher = _ChunkCipher(data_key, prefix, self._header)
        self._chunk_size = chunk_size
        self._pending = bytearray()
        self._index = 0
        self._finished = False

    def header(self) -> bytes:
        """The record header: write it first."""
        return self._header

    def update(self, data: bytes) -> bytes:
        """Take more plaintext; return the chunks that are now complete, sealed."""
        self._check_open()
        self._pending += data
        out = bytearray()
        start = 0
        # Keep at least one byte back: a chunk is sealed only once we know it is not last.
        while len(self._pending) - start > self._chunk_size:
            end = start + self._chunk_size
            out += self._seal(bytes(self._pending[start:end]), last=False)
            start = end
        del self._pending[:start]
        return bytes(out)

    def finish(self) -> bytes:
        """Seal what is left as the final chunk (empty only for an empty record)."""
        self._check_open()
        self._finished = True
        out = self._seal(bytes(self._pending), last=True)
        self._pending.clear()
        return out

    def whole(self, payload: bytes) -> bytes:
        """The whole record for ``payload``, instead of ``header``, ``update`` and
        ``finish``: the same bytes, with one copy of the payload instead of five (each
        chunk is sealed straight from a view of it)."""
        return b"".join(self.stream((payload,)))

    def stream(self, parts: Sequence[bytes]) -> Iterator[bytes]:
        """The record for the payload ``b"".join(parts)``, as the header and then each
        sealed chunk, made only as they are asked for: instead of ``header``,
        ``update`` and ``finish`` (the same bytes). Nothing holds the payload joined or
        the record whole: a chunk is sealed straight from a view of its part, and only
        a chunk that spans two parts is copied (at most ``chunk_size`` bytes). The
        spool writes a 1 MiB message this way, envelope and content as two parts."""
        self._check_open()
        if self._index or self._pending:
            raise ValueError("Sealer already in use")
        self._finished = True
        total = sum(len(part) for part in parts)
        count = max(1, -(-total // self._chunk_size))  # an empty payload: one empty chunk
        return self._stream(parts, total, count)

    def _stream(self, parts: Sequence[bytes], total: int, count: int) -> Iterator[bytes]:
        yield self._header
        for index, piece in enumerate(contiguous_pieces(parts, self._chunk_size, total)):
            yield self._cipher.seal(index, piece, index == count - 1)
            self._index = index + 1

    def _seal(self, plaintext: bytes, *, last: bool) -> bytes:
        sealed = self._cipher.seal(self._index, plaintext, last)
        self._index += 1
        return sealed

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("Sealer already finished")


def contiguous_pieces(
    parts: Iterable[bytes], size: int, total: int
) -> Iterator[bytes | memoryview]:
    """``b"".join(parts)`` (``total`` bytes) cut into pieces of ``size`` bytes, the last
    one shorter (or empty, when ``total`` is 0): ``max(1, ceil(total / size))`` pieces.
    Views of the parts where a piece lies within one part; a copy only of a piece that
    spans parts."""
    spanning = bytearray()
    for part in parts:
        view = memoryview(part)
        if spanning:
            take = size - len(spanning)
            spanning += view[:take]
            view = view[take:]
            if len(spanning) < size:
                continue
            yield bytes(spanning)
            spanning.clear()
        whole = len(view) - len(view) % size
        for start in range(0, whole, size):
            yield view[start : start + size]
        spanning += view[whole:]
    if spanning or total == 0:
        yield bytes(spanning)


def seal(
    payload: bytes,
    *,
    kind: RecordKind,
    qid: str,
    key_id: str,
    kek: bytes,
    random: Random,
    chunk_size: int = CHUNK_SIZE,
) -> bytes:
    """The whole record for ``payload`` (see ``Sealer`` for the parameters)."""
    sealer = Sealer(
        kind=kind, qid=qid, key_id=key_id, kek=kek, random=random, chunk_size=chunk_size
    )
    return sealer.whole(payload)


# --- opening ---


class Opener:
    """Opens one record fed in pieces; hands out plaintext only once authenticated.

    ``feed()`` returns the chunks that are complete and authenticated (it keeps the
    last full chunk back until it knows whether more follows); ``close()`` opens the
    final chunk and raises ``RecordError`` when there is none, so a truncated record
    never looks like a complete one. After any error the opener refuses more input.

    Parameters:
        kind: the kind the record must have.
        qid: the queue id the record must carry.
        keys: key id -> key-encryption key, or None when unknown.
        chunk_size: as the record was sealed with.
    """

    def __init__(
        self, *, kind: RecordKind, qid: str, keys: Keys, chunk_size: int = CHUNK_SIZE
    ) -> None:
        _check_chunk_size(chunk_size)
        self._kind = kind
        self._qid = qid
        self._keys = keys
        self._sealed_size = chunk_size + TAG_SIZE
        self._buffer = bytearray()
        self._cipher: _ChunkCipher | None = None
        self._header: RecordHeader | None = None
        self._index = 0
        self._done = False

    @property
    def header(self) -> RecordHeader | None:
        """The authenticated header, once it has been read."""
        return self._header

    def feed(self, data: bytes) -> list[bytes]:
        """Take more record bytes; return the plaintext chunks now authenticated."""
        with self._failing_closed():
            self._buffer += data
            cipher = self._cipher or self._start()
            return [] if cipher is None else self._open_full_chunks(cipher)

    def close(self) -> bytes:
        """The end of the record: open the final chunk and return its plaintext."""
        with self._failing_closed():
            self._done = True
            cipher = self._cipher or self._start()
            if cipher is None:
                raise RecordError("truncated record header")
            if len(self._buffer) < TAG_SIZE:
                raise RecordError("truncated record: no final chunk")
            with memoryview(self._buffer) as view:
                return cipher.open(self._index, view, last=True)

    def whole(self, data: bytes) -> bytes:
        """The plaintext of the whole record ``data``, instead of ``feed`` and ``close``:
        the same checks and the same result, each chunk opened straight from a view of
        ``data`` instead of from a copy of it (a re-read 1 MiB message held five copies
        at once, this four)."""
        with self._failing_closed():
            if self._index or self._buffer or self._cipher:
                raise ValueError("Opener already in use")
            self._done = True
            header = _parse_header(data)
            if header is None:
                raise RecordError("truncated record header")
            self._header = header
            cipher = _ChunkCipher(self._unwrap(header), header.nonce_prefix, header.raw)
            view = memoryview(data)[len(header.raw) :]
            size = self._sealed_size
            # As ``feed``: a full chunk with nothing after it is the final one.
            full = max(0, -(-len(view) // size) - 1)
            plain = [
                cipher.open(index, view[index * size : (index + 1) * size], last=False)
                for index in range(full)
            ]
            final = view[full * size :]
            if len(final) < TAG_SIZE:
                raise RecordError("truncated record: no final chunk")
            plain.append(cipher.open(full, final, last=True))
            return b"".join(plain)

    @contextlib.contextmanager
    def _failing_closed(self) -> Iterator[None]:
        if self._done:
            raise RecordError("record opener already closed or failed")
        try:
            yield
        except BaseException:
            self._done = True
            raise

    def _start(self) -> _ChunkCipher | None:
        header = _parse_header(self._buffer)
        if header is None:
            return None
        data_key = self._unwrap(header)
        del self._buffer[: len(header.raw)]
        self._header = header
        self._cipher = _ChunkCipher(data_key, header.nonce_prefix, header.raw)
        return self._cipher

    def _unwrap(self, header: RecordHeader) -> bytes:
        if header.kind != self._kind:
            raise RecordError(f"record kind {header.kind.name}, expected {self._kind.name}")
        if header.qid != self._qid:
            raise RecordError("record belongs to another queue id")
        kek = self._keys(header.key_id)
        if kek is None:
            raise RecordError(f"record sealed under unknown key id {header.key_id!r}")
        return unwrap_data_key(header, kek)

    def _open_full_chunks(self, cipher: _ChunkCipher) -> list[bytes]:
        out = []
        start = 0
        # Each chunk is opened from a view of the buffer, not a copy (the view is let go
        # before the buffer is cut). A full chunk with nothing after it yet may be the
        # final one: keep it back.
        with memoryview(self._buffer) as view:
            while len(view) - start > self._sealed_size:
                end = start + self._sealed_size
                out.append(cipher.open(self._index, view[start:end], last=False))
                self._index += 1
                start = end
        del self._buffer[:start]
        return out


def open_stream(
    pieces: Iterable[bytes],
    *,
    kind: RecordKind,
    qid: str,
    keys: Keys,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[bytes]:
    """Yield a record's plaintext chunk by chunk, each only after it is authenticated.

    Raises ``RecordError`` at the first bad chunk, or at the end when the record has
    no final chunk: a consumer that stops on the exception never treats a truncated
    record as complete (delivery never sends the final ``.``).
    """
    opener = Opener(kind=kind, qid=qid, keys=keys, chunk_size=chunk_size)
    for piece in pieces:
        yield from opener.feed(piece)
    yield opener.close()


def unseal(
    data: bytes,
    *,
    kind: RecordKind,
    qid: str,
    keys: Keys,
    chunk_size: int = CHUNK_SIZE,
) -> bytes:
    """The whole authenticated payload of a record (``RecordError`` on any failure)."""
    return Opener(kind=kind, qid=qid, keys=keys, chunk_size=chunk_size).whole(data)
