"""What ``mta queue hold|release|delete|requeue|show`` mean, apart from where they run.

Pure: no I/O, no clock. The same rules serve the running relay (its scheduler, through
the control socket) and a stopped one (the spool files, under the spool's lock): which
messages a selection names (queue ids, ``--all`` or ``--domain D``), what each action
does to a message's state, the line a selection travels as on the control socket
(validated there: it came from a socket), and ``queue show``'s document.

``delete --domain D`` deletes only the messages whose every pending recipient is in
``D``: one that still goes to another domain too is skipped and named, never dropped
whole for the sake of one domain (delete it by queue id). ``hold --domain D`` holds every
message with a pending recipient in ``D`` (holding is per message, as in Postfix).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from mta.model import Envelope, QueueId, domain_of
from mta.schedule.state import MessageState, RcptStatus
from mta.spool.store import QID

_DOMAIN: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")  # what travels on the socket
ALL: Final = "--all"
DOMAIN: Final = "--domain"


class Action(enum.Enum):
    """An operator's change to queued messages (the control command is ``queue-<value>``)."""

    HOLD = "hold"
    RELEASE = "release"
    DELETE = "delete"
    REQUEUE = "requeue"

    @property
    def done(self) -> str:
        """The past tense, for logs and answers (``held``, ``deleted``)."""
        return {"hold": "held", "release": "released"}.get(self.value, self.value + "d")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which messages: the named queue ids, every message (``all``), or those with a
    pending recipient in ``domain``."""

    qids: tuple[QueueId, ...] = ()
    all: bool = False
    domain: str = ""

    def words(self) -> list[str]:
        """The selection as command-line words (``--domain example.org``)."""
        if self.all:
            return [ALL]
        if self.domain:
            return [DOMAIN, self.domain]
        return list(self.qids)


class SelectionError(ValueError):
    """A selection that names nothing valid (reported to the operator as it is)."""


def make_selection(qids: Iterable[str], *, every: bool = False, domain: str = "") -> Selection:
    """Validate a selection: exactly one of queue ids, ``every`` or ``domain``."""
    qids = tuple(dict.fromkeys(qids))
    if (bool(qids), every, bool(domain)).count(True) != 1:
        raise SelectionError("give queue ids, --all or --domain D (exactly one of them)")
    for qid in qids:
        if not QID.fullmatch(qid):
            raise SelectionError(f"not a queue id: {qid!r}")
    if domain:
        if not _DOMAIN.fullmatch(domain):
            raise SelectionError(f"not a domain name: {domain!r}")
        domain = domain.lower().rstrip(".")
    return Selection(tuple(QueueId(q) for q in qids), every, domain)


def parse_selection(argument: str) -> Selection:
    """The selection from a control line's argument (``--domain D``, ``--all``, qids)."""
    words = argument.split()
    if words[:1] == [ALL] and len(words) == 1:
        return make_selection((), every=True)
    if words[:1] == [DOMAIN] and len(words) == 2:  # the flag and its value
        return make_selection((), domain=words[1])
    return make_selection(words)


@dataclass(frozen=True, slots=True)
class Picked:
    """What a selection names in the queue: the messages to act on, queue ids that are
    not queued, and messages left alone (``delete --domain``: they go elsewhere too)."""

    chosen: tuple[QueueId, ...]
    missing: tuple[str, ...] = ()
    skipped: tuple[QueueId, ...] = ()


def pick(
    action: Action, selection: Selection, queued: Iterable[tuple[QueueId, MessageState]]
) -> Picked:
    """The messages ``selection`` names for ``action``, in queue order.

    ``--all`` and ``--domain`` take only the messages the action would change (``release``
    only held ones); named queue ids are taken as they are.
    """
    states = dict(queued)
    if selection.qids:
        chosen = tuple(q for q in selection.qids if q in states)
        missing = tuple(q for q in selection.qids if q not in states)
        return Picked(chosen, missing)
    wanted: list[QueueId] = []
    skipped: list[QueueId] = []
    for qid, state in states.items():
        if action is Action.RELEASE and not state.held:
            continue
        if action is Action.HOLD and state.held:
            continue
        domains = {domain_of(r.rcpt) for r in state.pending}
        if selection.domain and selection.domain not in domains:
            continue
        if action is Action.DELETE and len(domains) > 1:
            skipped.append(qid)
            continue
        wanted.append(qid)
    return Picked(tuple(wanted), (), tuple(skipped))


def altered(action: Action, state: MessageState, now: float) -> MessageState:
    """The state after ``action`` (not ``DELETE``, which removes the message)."""
    if action is Action.HOLD:
        return state.hold()
    if action is Action.RELEASE:
        return state.release(now) if state.held else state
    if action is Action.REQUEUE:
        return state.requeue(now)
    raise ValueError(f"{action.value} does not alter a state")


def picked_answer(picked: Picked) -> str:
    """The control socket's answer: ``ok`` and one JSON object on the line."""
    doc = {"done": picked.chosen, "missing": picked.missing, "skipped": picked.skipped}
    return "ok " + json.dumps(doc, separators=(",", ":"))


def parse_picked(answer: str) -> Picked:
    """Reverse ``picked_answer`` (``ValueError`` for anything else)."""
    doc = json.loads(answer.removeprefix("ok").strip())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")

    def ids(key: str) -> tuple[QueueId, ...]:
        items = doc.get(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{key}: not a list of queue ids")
        return tuple(QueueId(i) for i in items)

    return Picked(ids("done"), ids("missing"), ids("skipped"))


# --- mta queue show ---


def show_doc(
    qid: QueueId,
    envelope: Envelope,
    state: MessageState,
    headers: bytes,
    size: int,
    now: float,
    body: bytes | None = None,
) -> dict[str, Any]:
    """``mta queue show --json``: the envelope, each recipient's state, the headers, and
    the body only when given (the operator asked with ``--body``). Addresses in full:
    this goes to the operator's terminal, never to a log."""
    doc: dict[str, Any] = {
        "qid": qid,
        "held": state.held,
        "age": round(max(0.0, now - state.received_at), 1),
        "size": size,
        "envelope": dataclasses.asdict(envelope),
        "recipients": [
            {
                "rcpt": r.rcpt,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt
                if r.status is RcptStatus.PENDING and not state.held
                else None,
                "last_error": r.last_error,
            }
            for r in state.recipients
        ],
        "headers": headers.decode("utf-8", "replace"),
    }
    if body is not None:
        doc["body"] = body.decode("utf-8", "replace")
    return doc


def show_text(doc: dict[str, Any], when: Callable[[float | None], str]) -> str:
    """The human form of ``show_doc`` (``when(moment)``: a next attempt as text)."""
    envelope = doc["envelope"]
    flags = [name for name, value in envelope.items() if value is True]
    lines = [
        f"queue id:   {doc['qid']}{'  (held)' if doc['held'] else ''}",
        f"age:        {doc['age']:.0f}s   size: {doc['size']} bytes",
        f"sender:     <{envelope['mail_from']}>",
        f"client:     {envelope['client_address'] or '-'}  helo {envelope['helo'] or '-'}",
        f"flags:      {' '.join(flags) or '-'}",
        "recipients:",
    ]
    for r in doc["recipients"]:
        line = f"  {r['rcpt']}  {r['status']}  attempts={r['attempts']}"
        if r["status"] == RcptStatus.PENDING.value:
            line += "  next=held" if doc["held"] else f"  next={when(r['next_attempt'])}"
        if r["last_error"]:
            line += f"  last error: {r['last_error']}"
        lines.append(line)
    lines += ["headers:", doc["headers"].rstrip("\r\n").replace("\r\n", "\n")]
    return "\n".join(lines)
