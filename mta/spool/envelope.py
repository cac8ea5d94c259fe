"""The plaintext of a message record: the envelope and the raw content, in one byte string.

Pure: no I/O. ``u32 length | JSON envelope | content``. The JSON is re-validated on
decode (Postfix: do not trust the contents of queue files), although a record only
reaches ``decode_message`` after it has been authenticated.
"""

from __future__ import annotations

import collections
import json
import math
import struct
from collections.abc import Iterable
from typing import Any, Final, TypeVar

from mta.model import Envelope
from mta.spool.record import RecordError

FORMAT: Final = 1
_LENGTH: Final = struct.Struct(">I")
T = TypeVar("T")

_FIELDS: Final = frozenset(
    {
        "v",
        "mail_from",
        "rcpt_tos",
        "received_at",
        "client_address",
        "helo",
        "smtputf8",
        "body_8bit",
    }
)
# Written only when set: older records lack them.
_OPTIONAL: Final = frozenset({"report", "requiretls", "crlf_only", "dot_free"})


def encode_message(envelope: Envelope, content: bytes) -> bytes:
    """The record payload for a message: its envelope as JSON, then its content."""
    return b"".join((encode_envelope(envelope), content))


def encode_envelope(envelope: Envelope) -> bytes:
    """The start of a message's record payload, before its content: the spool seals the
    two as parts (``Sealer.stream``), never joined in memory."""
    doc = {
        "v": FORMAT,
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "received_at": float(envelope.received_at),
        "client_address": envelope.client_address,
        "helo": envelope.helo,
        "smtputf8": envelope.smtputf8,
        "body_8bit": envelope.body_8bit,
    }
    if envelope.report:
        doc["report"] = True
    if envelope.requiretls:
        doc["requiretls"] = True
    if envelope.crlf_only:
        doc["crlf_only"] = True
    if envelope.dot_free:
        doc["dot_free"] = True
    meta = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("ascii")
    return _LENGTH.pack(len(meta)) + meta


def decode_message(payload: bytes) -> tuple[Envelope, bytes]:
    """Split a message payload into envelope and content; ``RecordError`` if malformed."""
    return decode_message_parts([payload])


def decode_message_parts(parts: Iterable[bytes]) -> tuple[Envelope, bytes]:
    """``decode_message(b"".join(parts))``, but the content is the one copy made: the
    spool opens a record chunk by chunk, and joining the chunks first and then cutting
    the content out of the whole would hold three copies of a large message at once."""
    rest = collections.deque(parts)
    (size,) = _LENGTH.unpack(_take(rest, _LENGTH.size, "message payload too short"))
    meta = _take(rest, size, "message envelope length exceeds the payload")
    return _envelope(_load(meta)), b"".join(rest)


def _take(parts: collections.deque[bytes], size: int, short: str) -> bytes:
    """The first ``size`` bytes of ``parts``, removed from it (``RecordError(short)`` if
    there are fewer)."""
    taken: list[bytes] = []
    while size:
        if not parts:
            raise RecordError(short)
        part = parts.popleft()
        if len(part) > size:
            parts.appendleft(part[size:])
            part = part[:size]
        taken.append(part)
        size -= len(part)
    return b"".join(taken)


def _load(meta: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(meta.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise RecordError("message envelope is not valid JSON") from None
    if not isinstance(doc, dict) or not _FIELDS <= set(doc) <= _FIELDS | _OPTIONAL:
        raise RecordError("message envelope has the wrong fields")
    if doc["v"] != FORMAT or isinstance(doc["v"], bool):
        raise RecordError("unsupported message envelope format")
    return doc


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _envelope(doc: dict[str, Any]) -> Envelope:
    return Envelope(
        mail_from=_typed(doc, "mail_from", str),
        rcpt_tos=tuple(_strings(doc, "rcpt_tos")),
        received_at=_number(doc, "received_at"),
        client_address=_typed(doc, "client_address", str),
        helo=_typed(doc, "helo", str),
        smtputf8=_typed(doc, "smtputf8", bool),
        body_8bit=_typed(doc, "body_8bit", bool),
        report=_typed(doc, "report", bool) if "report" in doc else False,
        requiretls=_typed(doc, "requiretls", bool) if "requiretls" in doc else False,
        crlf_only=_typed(doc, "crlf_only", bool) if "crlf_only" in doc else False,
        dot_free=_typed(doc, "dot_free", bool) if "dot_free" in doc else False,
    )


def _typed(doc: dict[str, Any], name: str, kind: type[T]) -> T:
    value = doc[name]
    if not isinstance(value, kind):
        raise RecordError(f"message envelope field {name} has the wrong type")
    return value


def _strings(doc: dict[str, Any], name: str) -> list[str]:
    values = _typed(doc, name, list)
    if not all(isinstance(value, str) for value in values):
        raise RecordError(f"message envelope field {name} has the wrong type")
    return values


def _number(doc: dict[str, Any], name: str) -> float:
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"message envelope field {name} has the wrong type")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RecordError(f"message envelope field {name} is out of range")
    return number
