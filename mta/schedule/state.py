"""Per-recipient delivery state of one queued message, and its transition table.

Pure: no I/O, no clock (``now`` is a parameter). Every rule that moves a recipient
between PENDING, SENT and BOUNCED lives in this file (h11's ``_state.py`` idea);
the scheduler only feeds it ``DeliveryResult``s and the passing of time, and
persists what ``encode_state`` returns next to the sealed message in the spool.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Final

from mta.errors import SpoolCorrupt
from mta.log import redact_text
from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult, domain_of
from mta.reply import SmtpReply
from mta.schedule import backoff

STATE_VERSION: Final = 2  # 2 added ``held``; version 1 records decode as not held
_VERSIONS: Final = frozenset({1, STATE_VERSION})


class RcptStatus(enum.Enum):
    """Where one recipient stands. SENT and BOUNCED are final."""

    PENDING = "pending"
    SENT = "sent"
    BOUNCED = "bounced"


# (status, outcome of an attempt) -> new status. A pair that is absent means the
# outcome is ignored: a final recipient never changes again.
TRANSITIONS: Final[Mapping[tuple[RcptStatus, Outcome], RcptStatus]] = {
    (RcptStatus.PENDING, Outcome.SENT): RcptStatus.SENT,
    (RcptStatus.PENDING, Outcome.DEFERRED): RcptStatus.PENDING,
    (RcptStatus.PENDING, Outcome.BOUNCED): RcptStatus.BOUNCED,
}


class StateError(SpoolCorrupt):
    """A state record authenticated but does not decode: treated as a corrupt record."""


@dataclass(frozen=True, slots=True)
class RecipientState:
    """One recipient of a queued message.

    ``next_attempt`` is when a PENDING recipient is due; ``reply`` is the last reply
    that decided an attempt for it, and ``last_error`` that reply as text plus the
    failure reason (empty once sent).
    """

    rcpt: str
    status: RcptStatus = RcptStatus.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    reply: SmtpReply | None = None

    @property
    def domain(self) -> str:
        return domain_of(self.rcpt)


@dataclass(frozen=True, slots=True)
class MessageState:
    """All recipients of one queued message, in envelope order (duplicates collapsed).

    ``held`` (``mta queue hold``, Postfix's ``postsuper -h``): no recipient is due and
    none expires until the message is released; the age still counts from receipt.
    """

    received_at: float
    recipients: tuple[RecipientState, ...]
    held: bool = False

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status is RcptStatus.PENDING)

    @property
    def done(self) -> bool:
        """Every recipient is SENT or BOUNCED: the message can leave the queue."""
        return not self.pending

    @property
    def next_due(self) -> float | None:
        """The earliest ``next_attempt`` of a pending recipient (None when done)."""
        return min((r.next_attempt for r in self.pending), default=None)

    @property
    def domains(self) -> tuple[str, ...]:
        """The domains that still have pending recipients, in envelope order."""
        return tuple(dict.fromkeys(r.domain for r in self.pending))

    def due_by_domain(self, now: float) -> dict[str, tuple[str, ...]]:
        """The pending recipients due at ``now``, grouped by domain (envelope order);
        none while the message is held."""
        due: dict[str, list[str]] = {}
        if self.held:
            return {}
        for r in self.pending:
            if r.next_attempt <= now:
                due.setdefault(r.domain, []).append(r.rcpt)
        return {domain: tuple(rcpts) for domain, rcpts in due.items()}

    def apply(
        self, result: DeliveryResult, now: float, *, retry_min: float, retry_max: float
    ) -> tuple[MessageState, tuple[RecipientState, ...]]:
        """The state after an attempt, and the recipients that this attempt bounced.

        Results for recipients that are unknown or already final are ignored. A
        deferred recipient is due again after ``backoff.next_attempt``.
        """
        by_rcpt = {r.rcpt: r for r in result.results}
        recipients: list[RecipientState] = []
        bounced: list[RecipientState] = []
        for before in self.recipients:
            found = by_rcpt.get(before.rcpt)
            after = before if found is None else _step(before, found, now, retry_min, retry_max)
            if before.status is not RcptStatus.BOUNCED and after.status is RcptStatus.BOUNCED:
                bounced.append(after)
            recipients.append(after)
        return replace(self, recipients=tuple(recipients)), tuple(bounced)

    def expire(
        self, now: float, max_age: float, rcpts: Collection[str] | None = None
    ) -> tuple[MessageState, tuple[RecipientState, ...]]:
        """Bounce the pending recipients (of ``rcpts``, or all) once ``max_age`` has passed.

        Returns the new state and the recipients bounced (their DSN status is 4.4.7,
        "delivery time expired"); their ``reply`` stays the last one received. A held
        message never expires (an attempt in flight when it was held may end after).
        """
        if self.held or not backoff.expired(self.received_at, now, max_age):
            return self, ()
        recipients: list[RecipientState] = []
        bounced: list[RecipientState] = []
        for before in self.recipients:
            if before.status is RcptStatus.PENDING and (rcpts is None or before.rcpt in rcpts):
                reason = "message expired"
                error = (
                    f"{reason}; last error: {before.last_error}" if before.last_error else reason
                )
                after = replace(before, status=RcptStatus.BOUNCED, last_error=error)
                bounced.append(after)
                recipients.append(after)
            else:
                recipients.append(before)
        return replace(self, recipients=tuple(recipients)), tuple(bounced)

    def flush(self, now: float) -> MessageState:
        """Every pending recipient due at ``now`` (``mta queue flush``); a held message
        stays held."""
        return replace(
            self,
            recipients=tuple(
                replace(r, next_attempt=min(r.next_attempt, now))
                if r.status is RcptStatus.PENDING
                else r
                for r in self.recipients
            ),
        )

    def hold(self) -> MessageState:
        """Held: never attempted, never expired, until ``release`` (``postsuper -h``)."""
        return replace(self, held=True)

    def release(self, now: float) -> MessageState:
        """No longer held, and every pending recipient due at ``now`` (``postsuper -H``).

        The age counts from receipt as ever: a message held past ``max_age`` gets this
        one attempt, and bounces if that attempt defers (as Postfix does).
        """
        return replace(self.flush(now), held=False)

    def requeue(self, now: float) -> MessageState:
        """Every pending recipient due at ``now`` with its backoff forgotten: its attempt
        count starts again from 0, so the next deferral waits ``retry_min`` (``postsuper
        -r``). Holding is not touched: a held message stays held."""
        return replace(
            self,
            recipients=tuple(
                replace(r, next_attempt=now, attempts=0) if r.status is RcptStatus.PENDING else r
                for r in self.recipients
            ),
        )


def describe(result: RecipientResult) -> str:
    """``last_error`` text: the reply, plus the RFC 8460 reason when there is one."""
    return f"{result.reply} ({result.reason})" if result.reason else str(result.reply)


def _step(
    before: RecipientState,
    result: RecipientResult,
    now: float,
    retry_min: float,
    retry_max: float,
) -> RecipientState:
    status = TRANSITIONS.get((before.status, result.outcome))
    if status is None:
        return before
    attempts = before.attempts + 1
    if result.outcome is Outcome.DEFERRED:
        next_at = backoff.next_attempt(attempts, now, retry_min, retry_max)
    else:
        next_at = before.next_attempt
    return replace(
        before,
        status=status,
        attempts=attempts,
        next_attempt=next_at,
        last_error="" if result.outcome is Outcome.SENT else describe(result),
        reply=result.reply,
    )


def initial_state(envelope: Envelope) -> MessageState:
    """A freshly received message: every recipient pending and due at once."""
    return MessageState(
        received_at=envelope.received_at,
        recipients=tuple(
            RecipientState(rcpt=rcpt, next_attempt=envelope.received_at)
            for rcpt in dict.fromkeys(envelope.rcpt_tos)
        ),
    )


# --- persistence: JSON, sealed by the spool as a kind=state record ---


def encode_state(state: MessageState) -> bytes:
    """The state as compact JSON bytes (``decode_state`` reverses it)."""
    doc = {
        "v": STATE_VERSION,
        "received_at": state.received_at,
        "held": state.held,
        "rcpts": [
            {
                "rcpt": r.rcpt,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_error": r.last_error,
                "reply": None
                if r.reply is None
                else [r.reply.code, r.reply.enhanced, r.reply.text],
            }
            for r in state.recipients
        ],
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_state(data: bytes) -> MessageState:
    """Parse ``encode_state`` output; ``StateError`` for anything else."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(doc, dict) or doc.get("v") not in _VERSIONS:
            raise StateError("state record: unknown version")
        rcpts = doc["rcpts"]
        if not isinstance(rcpts, list):
            raise StateError("state record: rcpts is not a list")
        held = doc["held"] if doc["v"] != 1 else False  # version 1 predates holding
        if not isinstance(held, bool):
            raise StateError("state record: held is not a boolean")
        return MessageState(
            received_at=_number(doc["received_at"]),
            recipients=tuple(_decode_rcpt(item) for item in rcpts),
            held=held,
        )
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # JSONDecodeError: ValueError
        raise StateError(f"state record: {type(err).__name__}") from None


def _reject_constant(name: str) -> float:
    raise StateError(f"state record: {name} is not a number")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StateError("state record: expected a number")
    return float(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise StateError("state record: expected a string")
    return value


def _decode_rcpt(item: object) -> RecipientState:
    if not isinstance(item, dict):
        raise StateError("state record: recipient is not an object")
    attempts = item["attempts"]
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise StateError("state record: attempts is not a count")
    raw_reply = item["reply"]
    reply: SmtpReply | None = None
    if raw_reply is not None:
        if not isinstance(raw_reply, list) or len(raw_reply) != 3:
            raise StateError("state record: malformed reply")
        code, enhanced, text = raw_reply
        if isinstance(code, bool) or not isinstance(code, int):
            raise StateError("state record: reply code is not an integer")
        reply = SmtpReply(code, _text(enhanced), _text(text))
    return RecipientState(
        rcpt=_text(item["rcpt"]),
        status=RcptStatus(item["status"]),
        attempts=attempts,
        next_attempt=_number(item["next_attempt"]),
        last_error=_text(item["last_error"]),
        reply=reply,
    )


# --- what `mta queue list` shows ---


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One line of ``mta queue list``: no addresses, only domains. A held message has
    no next attempt."""

    qid: QueueId
    age: float
    domains: tuple[str, ...]
    next_attempt: float | None
    last_error: str
    held: bool = False


def queue_entry(qid: QueueId, state: MessageState, now: float) -> QueueEntry:
    """The listing for one message, from its state alone (works without a scheduler).

    ``last_error`` is that of the first pending recipient that has one, with any address
    a remote server quoted in it redacted (``450 4.2.1 <bob@x.test>: mailbox busy``).
    """
    pending = state.pending
    return QueueEntry(
        qid=qid,
        age=max(0.0, now - state.received_at),
        domains=state.domains,
        next_attempt=None if state.held else state.next_due,
        last_error=redact_text(next((r.last_error for r in pending if r.last_error), "")),
        held=state.held,
    )
