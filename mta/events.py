"""What happened: one typed event per accepted message and per delivery attempt.

Pure: no I/O. DESIGN.md's "one source of truth": the receiver emits ``MessageReceived``
after it said ``250``; the scheduler emits ``DeliveryAttempt`` once an attempt's result
is settled (expiry and bounces applied). Everything that tells what the relay did —
transport receipts, TLS-RPT, metrics, the transparency report — is a sink of these
events (``EventSink``), fed by ``Events``; none of them reads log text.

``encode_event`` and ``decode_event`` turn an event into a JSON-ready dict and back,
so the sealed receipt log can keep events and the reports can be rebuilt from them.
The dict is versioned (``v``) and re-validated on decode, as spool records are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from mta.model import (
    CheckKind,
    DeliveryResult,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    SessionRecord,
    TlsInfo,
    TlsLevel,
)
from mta.reply import SmtpReply

__all__ = [
    "DeliveryAttempt",
    "Event",
    "EventError",
    "EventSink",
    "EventSource",
    "Events",
    "MessageReceived",
    "decode_event",
    "encode_event",
]

log = logging.getLogger(__name__)
FORMAT: Final = 1
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message the relay accepted (``250`` sent, the sealed record durable)."""

    at: float  # epoch seconds
    qid: QueueId
    listener: str  # "address:port" of the listener
    tls: str | None  # the client's TLS version, None in the clear
    authenticated: bool
    size: int  # octets of content
    recipients: int
    ack_seconds: float = 0.0  # from the end of DATA to the 250 (the record made durable)


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One delivery attempt for one domain's recipients of a message, as settled.

    ``result`` holds every host tried (``result.sessions``) and each recipient's outcome
    after the scheduler applied it: a deferral past the maximum age is a bounce here.
    ``report`` marks mail the relay wrote itself (TLS reports): its delivery is never
    counted in a TLS report (no report loops).
    """

    at: float  # when the attempt was settled, epoch seconds
    qid: QueueId
    received_at: float  # when the message was accepted (delivery latency)
    result: DeliveryResult
    report: bool = False

    @property
    def domain(self) -> str:
        return self.result.domain


Event = MessageReceived | DeliveryAttempt
EventSink = Callable[[Event], None]
EventSource = Callable[[float, float], Iterable[Event]]
"""The events stored between two times (epoch seconds, start inclusive, end exclusive),
oldest first: how TLS-RPT and the transparency report read the receipt log."""


class Events:
    """Hands every event to every sink, in order; a sink that fails is logged, never
    allowed to stop the others or the mail (a report is worth less than delivery)."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._sinks: list[EventSink] = list(sinks)

    def add(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def __call__(self, event: Event) -> None:
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("events.sink_failed", extra={"qid": event.qid})


class EventError(ValueError):
    """A stored event that does not decode (wrong type, missing or unknown field)."""


# --- codec -------------------------------------------------------------------------------


def encode_event(event: Event) -> dict[str, Any]:
    """A JSON-ready dict for ``event`` (stable names; enums by their value)."""
    if isinstance(event, MessageReceived):
        return {
            "v": FORMAT,
            "type": "received",
            "at": event.at,
            "qid": event.qid,
            "listener": event.listener,
            "tls": event.tls,
            "authenticated": event.authenticated,
            "size": event.size,
            "recipients": event.recipients,
            "ack_seconds": event.ack_seconds,
        }
    result = event.result
    return {
        "v": FORMAT,
        "type": "attempt",
        "at": event.at,
        "qid": event.qid,
        "received_at": event.received_at,
        "report": event.report,
        "domain": result.domain,
        "mx": result.mx,
        "address": result.address,
        "tls": _encode_tls(result.tls),
        "policy": _encode_policy(result.policy),
        "results": [
            {
                "rcpt": r.rcpt,
                "outcome": r.outcome.value,
                "reply": _encode_reply(r.reply),
                "reason": r.reason,
            }
            for r in result.results
        ],
        "sessions": [
            {
                "mx": s.mx,
                "address": s.address,
                "reply": _encode_reply(s.reply),
                "result_type": s.result_type,
                "tls": _encode_tls(s.tls),
                "policy": _encode_policy(s.policy),
                "local_address": s.local_address,
            }
            for s in result.sessions
        ],
    }


def decode_event(doc: object) -> Event:
    """The event ``encode_event`` made; ``EventError`` for anything else."""
    if not isinstance(doc, dict) or doc.get("v") != FORMAT:
        raise EventError("not an event of a known format")
    try:
        if doc.get("type") == "received":
            return MessageReceived(
                at=_typed(doc, "at", float),
                qid=QueueId(_typed(doc, "qid", str)),
                listener=_typed(doc, "listener", str),
                tls=_optional(doc, "tls", str),
                authenticated=_typed(doc, "authenticated", bool),
                size=_typed(doc, "size", int),
                recipients=_typed(doc, "recipients", int),
                ack_seconds=_typed(doc, "ack_seconds", float),
            )
        if doc.get("type") == "attempt":
            result = DeliveryResult(
                domain=_typed(doc, "domain", str),
                results=tuple(_recipient(r) for r in _typed(doc, "results", list)),
                mx=_optional(doc, "mx", str),
                tls=_decode_tls(doc.get("tls")),
                address=_optional(doc, "address", str),
                policy=_decode_policy(doc.get("policy")),
                sessions=tuple(_session(s) for s in _typed(doc, "sessions", list)),
            )
            return DeliveryAttempt(
                at=_typed(doc, "at", float),
                qid=QueueId(_typed(doc, "qid", str)),
                received_at=_typed(doc, "received_at", float),
                result=result,
                report=_typed(doc, "report", bool),
            )
    except (KeyError, TypeError, ValueError) as err:
        raise EventError(f"malformed event: {err}") from None
    raise EventError(f"unknown event type {doc.get('type')!r}")


def _typed(doc: dict[str, Any], key: str, kind: type[T]) -> T:
    value = doc[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key}: expected {kind.__name__}")
    return value


def _optional(doc: dict[str, Any], key: str, kind: type[T]) -> T | None:
    return None if doc.get(key) is None else _typed(doc, key, kind)


def _encode_reply(reply: SmtpReply) -> list[Any]:
    return [reply.code, reply.enhanced, reply.text]


def _decode_reply(value: object) -> SmtpReply:
    if not isinstance(value, list) or len(value) != 3:
        raise TypeError("reply: expected [code, enhanced, text]")
    code, enhanced, text = value
    if not isinstance(code, int) or not isinstance(enhanced, str) or not isinstance(text, str):
        raise TypeError("reply: expected [code, enhanced, text]")
    return SmtpReply(code, enhanced, text)


def _encode_tls(tls: TlsInfo | None) -> dict[str, Any] | None:
    if tls is None:
        return None
    return {
        "version": tls.version,
        "cipher": tls.cipher,
        "peer_verified": tls.peer_verified,
        "peer_key": tls.peer_key,
    }


def _decode_tls(value: object) -> TlsInfo | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("tls: expected an object")
    return TlsInfo(
        _typed(value, "version", str),
        _typed(value, "cipher", str),
        _typed(value, "peer_verified", bool),
        _optional(value, "peer_key", str),
    )


def _encode_policy(policy: HostPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    return {
        "source": policy.source.value,
        "level": policy.level.label,
        "check": policy.check,
        "auth": policy.auth.value,
        "report_only": policy.report_only,
        "reported_failure": policy.reported_failure,
        "policy_strings": list(policy.policy_strings),
        "mx_patterns": list(policy.mx_patterns),
    }


_CHECKS: Final[dict[str, CheckKind]] = {
    "none": "none",
    "pkix": "pkix",
    "dane": "dane",
    "fingerprint": "fingerprint",
}


def _decode_policy(value: object) -> HostPolicy | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("policy: expected an object")
    return HostPolicy(
        source=PolicySource(_typed(value, "source", str)),
        level=TlsLevel.from_label(_typed(value, "level", str)),
        check=_CHECKS[_typed(value, "check", str)],
        auth=PeerAuth(_typed(value, "auth", str)),
        report_only=_typed(value, "report_only", bool),
        reported_failure=_optional(value, "reported_failure", str),
        policy_strings=_strings(value, "policy_strings"),
        mx_patterns=_strings(value, "mx_patterns"),
    )


def _strings(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    values = _typed(doc, key, list)
    if not all(isinstance(value, str) for value in values):
        raise TypeError(f"{key}: expected strings")
    return tuple(values)


def _recipient(value: object) -> RecipientResult:
    if not isinstance(value, dict):
        raise TypeError("results: expected objects")
    return RecipientResult(
        _typed(value, "rcpt", str),
        Outcome(_typed(value, "outcome", str)),
        _decode_reply(value["reply"]),
        _optional(value, "reason", str),
    )


def _session(value: object) -> SessionRecord:
    if not isinstance(value, dict):
        raise TypeError("sessions: expected objects")
    return SessionRecord(
        _typed(value, "mx", str),
        _typed(value, "address", str),
        _decode_reply(value["reply"]),
        _optional(value, "result_type", str),
        _decode_tls(value.get("tls")),
        _decode_policy(value.get("policy")),
        # absent from events stored before it was recorded
        _typed(value, "local_address", str) if "local_address" in value else "",
    )
