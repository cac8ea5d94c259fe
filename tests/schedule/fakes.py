"""In-memory fakes of the scheduler's store and agent protocols, and a fake clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mta.errors import SpoolCorrupt, SpoolError
from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult
from mta.reply import SmtpReply

T0 = 1_700_000_000.0
OK = SmtpReply(250, "2.0.0", "OK")
LATER = SmtpReply(451, "4.7.5", "TLS policy not satisfied")
NO_USER = SmtpReply(550, "5.1.1", "No such user")


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.t = now
        self.reads = 0

    def now(self) -> float:
        self.reads += 1
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class MemoryStore:
    """The spool, in dicts. ``corrupt`` qids fail to read, as a bad AEAD tag would."""

    def __init__(self) -> None:
        self.messages: dict[QueueId, tuple[Envelope, bytes]] = {}
        self.states: dict[QueueId, bytes] = {}
        self.corrupt: set[QueueId] = set()
        self.quarantined: dict[QueueId, str] = {}
        self.removed: list[QueueId] = []
        self.put_error: Exception | None = None
        self.state_writes = 0
        self._serial = 0

    def add(self, envelope: Envelope, content: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> QueueId:
        self._serial += 1
        qid = QueueId(f"q{self._serial:04d}")
        self.messages[qid] = (envelope, content)
        return qid

    def added_after(self, qid: QueueId) -> list[QueueId]:
        return [q for q in self.messages if q > qid]

    async def put(self, envelope: Envelope, content: bytes) -> QueueId:
        await asyncio.sleep(0)
        if self.put_error is not None:
            raise self.put_error
        return self.add(envelope, content)

    async def read(self, qid: QueueId) -> tuple[Envelope, bytes]:
        await asyncio.sleep(0)
        if qid in self.corrupt:
            raise SpoolCorrupt(f"{qid}: authentication failed")
        if qid not in self.messages:
            raise SpoolError(f"{qid}: no such message")
        return self.messages[qid]

    async def write_state(self, qid: QueueId, payload: bytes) -> None:
        await asyncio.sleep(0)
        self.state_writes += 1
        self.states[qid] = payload

    async def read_state(self, qid: QueueId) -> bytes | None:
        await asyncio.sleep(0)
        return self.states.get(qid)

    async def remove(self, qid: QueueId) -> None:
        await asyncio.sleep(0)
        del self.messages[qid]
        self.states.pop(qid, None)
        self.removed.append(qid)

    async def quarantine(self, qid: QueueId, reason: str) -> None:
        await asyncio.sleep(0)
        self.messages.pop(qid, None)
        self.states.pop(qid, None)
        self.quarantined[qid] = reason

    def queue_ids(self) -> list[QueueId]:
        return sorted(self.messages)


@dataclass(frozen=True)
class Call:
    qid: QueueId
    envelope: Envelope
    domain: str
    rcpts: tuple[str, ...]
    content: bytes


def outcome_of(reply: SmtpReply) -> Outcome:
    if reply.code < 400:
        return Outcome.SENT
    return Outcome.DEFERRED if reply.code < 500 else Outcome.BOUNCED


class FakeAgent:
    """Answers each recipient with ``reply_for(domain, rcpt)``; counts concurrent calls.

    With ``gate`` set, every call waits for it (to hold attempts in flight).
    """

    def __init__(self, reply_for: Callable[[str, str], SmtpReply] | None = None) -> None:
        self.reply_for = reply_for or (lambda _domain, _rcpt: OK)
        self.calls: list[Call] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.max_running = 0
        self.running_by_domain: Counter[str] = Counter()
        self.max_by_domain: Counter[str] = Counter()
        self.finished = 0
        self.error: Exception | None = None

    async def deliver(
        self,
        qid: QueueId,
        envelope: Envelope,
        domain: str,
        rcpts: Sequence[str],
        content: bytes,
    ) -> DeliveryResult:
        self.calls.append(Call(qid, envelope, domain, tuple(rcpts), content))
        self.running += 1
        self.running_by_domain[domain] += 1
        self.max_running = max(self.max_running, self.running)
        self.max_by_domain[domain] = max(self.max_by_domain[domain], self.running_by_domain[domain])
        try:
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            results = []
            for rcpt in rcpts:
                reply = self.reply_for(domain, rcpt)
                results.append(RecipientResult(rcpt, outcome_of(reply), reply))
            return DeliveryResult(domain, tuple(results), mx=f"mx.{domain}")
        finally:
            self.running -= 1
            self.running_by_domain[domain] -= 1
            self.finished += 1


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``condition()`` holds; AssertionError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)
