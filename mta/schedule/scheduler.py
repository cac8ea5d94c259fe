"""The queue manager: decides when each queued message is tried, and applies the results.

Modelled on Postfix's qmgr. It keeps a small in-memory index of queued messages
(queue id -> envelope + per-recipient state, never the content) and a heap of due
times; it sleeps until the next due time or a wake-up (new mail, flush, an attempt
ending), whichever comes first. The unit of work is one (message, recipient domain)
with that domain's due recipients; the content is read from the spool for each
attempt and dropped after it. Concurrency is bounded globally
(``outbound.max_connections``) and per destination domain
(``outbound.max_per_destination``). After each attempt the state is written back to
the spool; a message leaves the queue when every recipient is SENT or BOUNCED.
Bounced recipients (5xx, or still pending after ``max_age``) get one RFC 3464 DSN,
queued as a new message from ``<>`` -- never for a message from ``<>``. Unreadable
records go to quarantine. The scheduler delivers nothing itself: the agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

from mta.clock import Clock
from mta.config import OutboundConfig
from mta.errors import SpoolCorrupt
from mta.events import DeliveryAttempt, EventSink
from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult
from mta.reply import S451_LOCAL_ERROR
from mta.report.dsn import EXPIRED_STATUS, FailedRecipient, build_dsn, header_block, status_of
from mta.schedule.state import (
    MessageState,
    QueueEntry,
    RecipientState,
    decode_state,
    encode_state,
    initial_state,
    queue_entry,
)

__all__ = ["Agent", "QueueEntry", "Scheduler", "Store", "queue_entry"]

log = logging.getLogger(__name__)

# The loop re-reads the clock at least this often, so a wall-clock jump delays
# nothing by more than a minute. It is a bound, not a poll: it only matters when idle.
MAX_SLEEP: Final = 60.0
# Just-received content kept for first attempts (no re-read and decrypt), within
# FRESH_BYTES in all and only for messages up to FRESH_LARGEST: content in flight is held
# by its delivery anyway, so what the cache adds is content waiting for a slot, and for
# large messages that is much memory to save little work. Measured with 1 MiB messages
# at one worker (benchmark, 2026-12-04): caching them took the peak RSS per process from
# 134-138 MB to 148-154 MB over 500 messages, at the same msg/s and CPU per message
# (re-reading 1 MiB costs well under 1 ms; sending it over TLS, far more).
FRESH_BYTES: Final = 16 * 1024 * 1024
FRESH_LARGEST: Final = 256 * 1024
# After an unexpected error in the loop itself, pause this long instead of spinning.
LOOP_ERROR_PAUSE: Final = 1.0
# How long stop() waits for cancelled attempts to unwind.
CANCEL_WAIT: Final = 5.0


class Store(Protocol):
    """The spool operations the scheduler uses (``mta.spool.store.SpoolStore``)."""

    async def put(self, envelope: Envelope, content: bytes) -> QueueId: ...

    async def read(self, qid: QueueId) -> tuple[Envelope, bytes]: ...

    async def write_state(self, qid: QueueId, payload: bytes) -> None: ...

    async def read_state(self, qid: QueueId) -> bytes | None: ...

    async def remove(self, qid: QueueId) -> None: ...

    async def quarantine(self, qid: QueueId, reason: str) -> None: ...

    def queue_ids(self) -> list[QueueId]: ...


class Agent(Protocol):
    """One delivery attempt (``mta.deliver.agent.DeliveryAgent``)."""

    async def deliver(
        self,
        qid: QueueId,
        envelope: Envelope,
        domain: str,
        rcpts: Sequence[str],
        content: bytes,
    ) -> DeliveryResult: ...


@dataclass(eq=False)
class _Queued:
    """One message in the index. ``active``: domains with an attempt in flight."""

    envelope: Envelope
    state: MessageState
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: set[str] = field(default_factory=set)
    content: bytes | None = None  # kept from receipt until the first deferral (no re-read)


class Scheduler:
    """Runs delivery attempts for the spooled messages when they are due.

    Parameters:
        store: the spool (durable, encrypted).
        agent: makes one delivery attempt for one domain's recipients.
        clock: wall-clock time.
        outbound: concurrency limits and the retry schedule (``retry_min``, ``retry_max``).
        max_age: seconds after which a message still pending is bounced.
        hostname: our name, for DSNs.
        events: told of every settled attempt (``events.DeliveryAttempt``).
    """

    def __init__(
        self,
        store: Store,
        agent: Agent,
        clock: Clock,
        *,
        outbound: OutboundConfig,
        max_age: float,
        hostname: str,
        events: EventSink | None = None,
    ) -> None:
        self._events = events
        self._store = store
        self._agent = agent
        self._clock = clock
        self._max_age = max_age
        self._hostname = hostname
        self._retry_min = outbound.retry_min
        self._retry_max = outbound.retry_max
        self._per_destination = max(1, outbound.max_per_destination)
        # The loop takes a slot before launching an attempt and the attempt gives it
        # back. The loop checks locked() first and so never waits on it: it stays free
        # to react to wake-ups and stop().
        self._slots = asyncio.Semaphore(max(1, outbound.max_connections))
        self._index: dict[QueueId, _Queued] = {}
        self._fresh_bytes = 0  # content held in memory for first attempts
        self._due: list[tuple[float, int, QueueId]] = []
        self._seq = itertools.count()
        self._busy: Counter[str] = Counter()
        # Messages waiting for a free slot at their domain, oldest first (an ordered set):
        # each attempt that ends lets exactly one of them back in, so a busy domain with
        # a long queue costs O(1) per attempt, not a rescan of everything that waits.
        self._blocked: dict[str, dict[QueueId, None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # attempts in flight
        self._chores: set[asyncio.Task[None]] = set()  # removals started by enqueue()
        self._wake = asyncio.Event()
        self._stopping = False

    # --- the public surface ---

    async def recover(self) -> int:
        """Index every message in the spool; returns how many were scheduled.

        A message without a state record is new: all its recipients are due now.
        Records that fail to read or decode are quarantined.
        """
        count = 0
        for qid in self._store.queue_ids():
            if qid in self._index:
                continue
            try:
                envelope = (await self._store.read(qid))[0]
                payload = await self._store.read_state(qid)
                state = initial_state(envelope) if payload is None else decode_state(payload)
            except SpoolCorrupt as err:
                await self._quarantine(qid, str(err))
                continue
            except Exception:
                log.error("schedule.recover.error", exc_info=True, extra={"qid": qid})
                continue
            if state.done:  # finished, but the removal did not happen
                await self._retire(qid, state)
                continue
            self._admit(qid, envelope, state)
            count += 1
        log.info("schedule.recovered", extra={"count": count})
        return count

    def enqueue(self, qid: QueueId, envelope: Envelope, content: bytes | None = None) -> None:
        """Schedule a message just stored in the spool: every recipient due now.

        ``content``, when given, is the message as just stored: the first attempts use it
        instead of reading and decrypting the record again (within ``FRESH_BYTES`` in all,
        and only when it is at most ``FRESH_LARGEST``).
        """
        if qid in self._index:
            return
        self._admit(qid, envelope, initial_state(envelope))
        entry = self._index.get(qid)
        if (
            entry is not None
            and content is not None
            and len(content) <= FRESH_LARGEST
            and self._fresh_bytes + len(content) <= FRESH_BYTES
        ):
            entry.content = content
            self._fresh_bytes += len(content)

    def reconfigure(self, agent: Agent, outbound: OutboundConfig, max_age: float) -> Agent:
        """A reload: new attempts use ``agent`` and the new retry schedule; attempts in
        flight finish with the agent they started with, which is returned (for the
        caller to close its idle connections). ``outbound.max_connections`` is fixed."""
        old, self._agent = self._agent, agent
        self._max_age = max_age
        self._retry_min = outbound.retry_min
        self._retry_max = outbound.retry_max
        self._per_destination = max(1, outbound.max_per_destination)
        self._wake.set()
        return old

    def flush(self) -> int:
        """Make every pending recipient due now; returns the number of messages affected."""
        now = self._clock.now()
        count = 0
        for qid, entry in self._index.items():
            if entry.state.done or entry.state.held:
                continue
            entry.state = entry.state.flush(now)
            self._push(now, qid)
            count += 1
        self._wake.set()
        log.info("schedule.flush", extra={"count": count})
        return count

    def snapshot(self) -> list[QueueEntry]:
        """The queue as ``mta queue list`` shows it, oldest first."""
        now = self._clock.now()
        entries = [queue_entry(qid, e.state, now) for qid, e in self._index.items()]
        return sorted(entries, key=lambda entry: -entry.age)

    def states(self) -> list[tuple[QueueId, MessageState]]:
        """Every queued message and its state now (``mta queue hold --domain`` picks)."""
        return [(qid, entry.state) for qid, entry in self._index.items()]

    async def change(
        self, qid: QueueId, alter: Callable[[MessageState], MessageState]
    ) -> MessageState | None:
        """Replace a message's state by ``alter(state)`` (hold, release, requeue), written
        to the spool before it takes effect; ``None`` when ``qid`` is not queued.

        Under the message's lock, as an attempt's result is applied: an attempt in
        flight applies its result to the altered state when it ends (a message held
        meanwhile stays held, and is not tried again).
        """
        entry = self._index.get(qid)
        if entry is None:
            return None
        async with entry.lock:
            if self._index.get(qid) is not entry:
                return None  # finished or deleted while we waited
            state = alter(entry.state)
            if state != entry.state:
                await self._store.write_state(qid, encode_state(state))
                entry.state = state
        if (due := state.next_due) is not None:
            self._push(due, qid)
            self._wake.set()
        return state

    async def delete(self, qid: QueueId) -> bool:
        """Remove a message from the queue and the spool without a DSN (``postsuper -d``);
        False when ``qid`` is not queued. An attempt in flight for it runs to its end,
        and its result is dropped: nothing writes the message back."""
        entry = self._index.get(qid)
        if entry is None:
            return False
        async with entry.lock:
            if self._index.get(qid) is not entry:
                return False
            await self._store.remove(qid)
            del self._index[qid]
            self._forget_content(entry)
        return True

    @property
    def in_flight(self) -> int:
        """Attempts running now."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Messages in the queue (pending recipients left), in flight or waiting."""
        return len(self._index)

    @property
    def oldest_received_at(self) -> float | None:
        """When the oldest queued message was accepted (``None``: the queue is empty).
        A pass over the index, for a metrics scrape now and then, not per message."""
        return min((e.envelope.received_at for e in self._index.values()), default=None)

    async def run(self) -> None:
        """The loop: launch due attempts, sleep until the next due time or a wake-up.

        Returns after ``stop()``. Errors are logged; the loop does not die of them.
        """
        log.info("schedule.start", extra={"queued": len(self._index)})
        while not self._stopping:
            self._wake.clear()
            pause: float | None = None
            try:
                await self._dispatch()
            except Exception:
                log.error("schedule.loop.error", exc_info=True)
                pause = LOOP_ERROR_PAUSE
            if self._stopping:
                break
            await self._sleep(self._delay() if pause is None else pause)

    async def run_once(self) -> int:
        """Launch the attempts due now and wait until every running attempt has ended.

        For tests and one-shot runs: drives the scheduler one step at a time.
        Returns the number of attempts launched.
        """
        launched = await self._dispatch()
        while self._tasks or self._chores:
            await asyncio.wait(self._tasks | self._chores)
        return launched

    async def stop(self, grace: float) -> None:
        """Launch nothing more; give running attempts ``grace`` seconds, then cancel them.

        A cancelled attempt leaves the message's state on disk as it was, so it is
        tried again after a restart (a duplicate is possible, a loss is not).
        """
        self._stopping = True
        self._wake.set()
        running = set(self._tasks)
        if running:
            _, running = await asyncio.wait(running, timeout=grace)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=CANCEL_WAIT)
        log.info("schedule.stopped", extra={"cancelled": len(running)})

    # --- the loop ---

    def _admit(self, qid: QueueId, envelope: Envelope, state: MessageState) -> None:
        due = state.next_due
        if due is None:  # no recipient left to try (none were given): nothing to keep
            chore = asyncio.get_running_loop().create_task(self._retire(qid, state))
            self._chores.add(chore)
            chore.add_done_callback(self._chores.discard)
            return
        self._index[qid] = _Queued(envelope, state)
        self._push(due, qid)
        self._wake.set()

    def _push(self, when: float, qid: QueueId) -> None:
        # Entries may be stale or repeated; _dispatch re-checks the state it pops.
        heapq.heappush(self._due, (when, next(self._seq), qid))

    def _delay(self) -> float | None:
        """Seconds to sleep, or None to sleep until woken."""
        if self._slots.locked() or not self._due:
            return None  # an ending attempt, new mail or a flush wakes the loop
        return min(MAX_SLEEP, max(0.0, self._due[0][0] - self._clock.now()))

    async def _sleep(self, delay: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _dispatch(self) -> int:
        """Launch every due (message, domain) that the limits allow; returns how many."""
        launched = 0
        now = self._clock.now()
        while not self._stopping and self._due and self._due[0][0] <= now:
            if self._slots.locked():
                break  # the ending attempt wakes the loop
            _, _, qid = heapq.heappop(self._due)
            entry = self._index.get(qid)
            if entry is None:
                continue
            for domain, rcpts in entry.state.due_by_domain(now).items():
                if domain in entry.active:
                    continue  # re-pushed when that attempt ends
                if self._busy[domain] >= self._per_destination:
                    self._blocked.setdefault(domain, {})[qid] = None
                    continue  # re-pushed when the domain has a free slot
                if self._slots.locked():
                    self._push(now, qid)
                    break
                await self._slots.acquire()  # never waits: checked just above
                self._launch(qid, entry, domain, rcpts)
                launched += 1
        return launched

    def _launch(self, qid: QueueId, entry: _Queued, domain: str, rcpts: tuple[str, ...]) -> None:
        entry.active.add(domain)
        self._busy[domain] += 1
        task = asyncio.create_task(self._attempt(qid, entry, domain, rcpts))
        self._tasks.add(task)
        # A done callback runs even for a task cancelled before it started.
        task.add_done_callback(lambda done: self._finished(done, qid, entry, domain))

    def _finished(
        self, task: asyncio.Task[None], qid: QueueId, entry: _Queued, domain: str
    ) -> None:
        self._tasks.discard(task)
        self._slots.release()
        self._busy[domain] -= 1
        if self._busy[domain] <= 0:
            del self._busy[domain]
        entry.active.discard(domain)
        now = self._clock.now()
        waiting = self._blocked.get(domain, {})
        while waiting:  # let the oldest waiting message that is still queued back in
            candidate = next(iter(waiting))
            del waiting[candidate]
            if candidate in self._index:
                self._push(now, candidate)
                break
        if not waiting:
            self._blocked.pop(domain, None)
        if self._index.get(qid) is entry and (due := entry.state.next_due) is not None:
            self._push(due, qid)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.error("schedule.attempt.crashed", exc_info=err, extra={"qid": qid})
        self._wake.set()

    # --- one attempt ---

    async def _attempt(
        self, qid: QueueId, entry: _Queued, domain: str, rcpts: tuple[str, ...]
    ) -> None:
        try:
            outcome = await self._deliver(qid, entry, domain, rcpts)
        except Exception:
            if self._index.get(qid) is not entry:
                return  # deleted meanwhile (``mta queue delete``): its record is gone
            log.error("schedule.attempt.error", exc_info=True, extra={"qid": qid, "domain": domain})
            outcome = (_all_deferred(domain, rcpts), b"")
        if outcome is None:
            return  # quarantined
        result, headers = outcome
        try:
            async with entry.lock:
                if self._index.get(qid) is entry:
                    await self._settle(qid, entry, rcpts, result, headers)
        except Exception:
            log.error("schedule.settle.error", exc_info=True, extra={"qid": qid, "domain": domain})

    async def _deliver(
        self, qid: QueueId, entry: _Queued, domain: str, rcpts: tuple[str, ...]
    ) -> tuple[DeliveryResult, bytes] | None:
        """Read the content, hand it to the agent; returns the result and the header
        section (for a DSN), or None when the record was corrupt and quarantined.
        The content goes out of scope when this returns."""
        content = entry.content
        if content is None:
            try:
                _, content = await self._store.read(qid)
            except SpoolCorrupt as err:
                await self._quarantine(qid, str(err))
                return None
        result = await self._agent.deliver(qid, entry.envelope, domain, rcpts, content)
        return result, header_block(content)

    async def _settle(
        self,
        qid: QueueId,
        entry: _Queued,
        rcpts: tuple[str, ...],
        result: DeliveryResult,
        headers: bytes,
    ) -> None:
        """Apply an attempt's result: new state, DSN for bounces, write or remove."""
        now = self._clock.now()
        result = _complete(result, rcpts)
        retry = {"retry_min": self._retry_min, "retry_max": self._retry_max}
        state, bounced = entry.state.apply(result, now, **retry)
        failed = [_failed(r, status_of(r.reply) if r.reply else "5.0.0", result) for r in bounced]
        state, expired = state.expire(now, self._max_age, rcpts)
        failed += [_failed(r, EXPIRED_STATUS, result) for r in expired]
        if expired:
            log.warning(
                "schedule.expired",
                extra={"qid": qid, "domain": result.domain, "rcpts": len(expired)},
            )
        settled = _expired(result, {r.rcpt for r in expired})
        sender = entry.envelope.mail_from
        if (
            failed
            and sender
            and not await self._queue_dsn(qid, entry.envelope, headers, failed, now)
        ):
            # Bouncing without a stored DSN would lose the news: stay pending instead.
            settled = _bounces_deferred(result)
            state, _ = entry.state.apply(settled, now, **retry)
            failed = []
        entry.state = state
        _log_result(qid, result, state, len(failed))
        if self._events is not None:
            envelope = entry.envelope
            self._events(
                DeliveryAttempt(now, qid, envelope.received_at, settled, report=envelope.report)
            )
        if not state.done and any(r.outcome is Outcome.DEFERRED for r in result.results):
            self._forget_content(entry)  # retries read the record: memory stays bounded
        if state.done:
            await self._retire(qid, state)
        else:
            await self._store.write_state(qid, encode_state(state))

    async def _queue_dsn(
        self,
        qid: QueueId,
        original: Envelope,
        headers: bytes,
        failed: Sequence[FailedRecipient],
        now: float,
    ) -> bool:
        """Store and schedule a DSN to the original sender; False if it could not be stored."""
        sender = original.mail_from
        envelope = Envelope(
            mail_from="",
            rcpt_tos=(sender,),
            received_at=now,
            helo=self._hostname,
            smtputf8=not sender.isascii(),
        )
        try:
            dsn = build_dsn(
                original=original,
                original_headers=headers,
                failed=failed,
                reporting_mta=self._hostname,
                now=now,
                message_id=f"<{secrets.token_hex(16)}@{self._hostname}>",
                queue_id=qid,
            )
            dsn_qid = await self._store.put(envelope, dsn)
        except Exception:
            log.error("schedule.dsn.error", exc_info=True, extra={"qid": qid})
            return False
        self.enqueue(dsn_qid, envelope)
        log.info(
            "schedule.dsn.queued", extra={"qid": qid, "dsn_qid": dsn_qid, "rcpts": len(failed)}
        )
        return True

    def _forget_content(self, entry: _Queued) -> None:
        if entry.content is not None:
            self._fresh_bytes -= len(entry.content)
            entry.content = None

    async def _retire(self, qid: QueueId, state: MessageState) -> None:
        """Remove a finished message. If removing fails, record it as finished instead,
        so that a restart does not deliver it again."""
        entry = self._index.pop(qid, None)
        if entry is not None:
            self._forget_content(entry)
        try:
            await self._store.remove(qid)
        except Exception:
            log.error("schedule.remove.error", exc_info=True, extra={"qid": qid})
            try:
                await self._store.write_state(qid, encode_state(state))
            except Exception:
                log.error("schedule.state.error", exc_info=True, extra={"qid": qid})
            return
        log.info("schedule.done", extra={"qid": qid})

    async def _quarantine(self, qid: QueueId, reason: str) -> None:
        entry = self._index.pop(qid, None)
        if entry is not None:
            self._forget_content(entry)
        try:
            await self._store.quarantine(qid, reason)
        except Exception:
            log.error("schedule.quarantine.error", exc_info=True, extra={"qid": qid})
        log.warning("schedule.quarantined", extra={"qid": qid, "reason": reason})


# --- helpers (pure) ---


def _all_deferred(domain: str, rcpts: Sequence[str]) -> DeliveryResult:
    """The result of an attempt that failed locally: every recipient deferred, 451 4.3.0."""
    return DeliveryResult(
        domain=domain,
        results=tuple(RecipientResult(r, Outcome.DEFERRED, S451_LOCAL_ERROR) for r in rcpts),
    )


def _complete(result: DeliveryResult, rcpts: Sequence[str]) -> DeliveryResult:
    """Only the attempted recipients; one the agent said nothing about is deferred."""
    attempted = set(rcpts)
    kept = [r for r in result.results if r.rcpt in attempted]
    seen = {r.rcpt for r in kept}
    missing = [
        RecipientResult(r, Outcome.DEFERRED, S451_LOCAL_ERROR) for r in rcpts if r not in seen
    ]
    if missing or len(kept) != len(result.results):
        log.warning(
            "schedule.result.mismatch",
            extra={"domain": result.domain, "missing": len(missing)},
        )
    return replace(result, results=tuple(kept + missing))


def _expired(result: DeliveryResult, expired: set[str]) -> DeliveryResult:
    """The result as settled: a recipient that expired in this attempt bounced."""
    return replace(
        result,
        results=tuple(
            replace(r, outcome=Outcome.BOUNCED) if r.rcpt in expired else r for r in result.results
        ),
    )


def _bounces_deferred(result: DeliveryResult) -> DeliveryResult:
    return replace(
        result,
        results=tuple(
            replace(r, outcome=Outcome.DEFERRED) if r.outcome is Outcome.BOUNCED else r
            for r in result.results
        ),
    )


def _failed(rcpt: RecipientState, status: str, result: DeliveryResult) -> FailedRecipient:
    return FailedRecipient(
        rcpt=rcpt.rcpt, status=status, diagnostic=rcpt.reply, remote_mta=result.mx
    )


def _log_result(qid: QueueId, result: DeliveryResult, state: MessageState, bounced: int) -> None:
    counts = Counter(r.outcome for r in result.results)
    deferred = next((r for r in result.results if r.outcome is Outcome.DEFERRED), None)
    log.info(
        "schedule.attempt.done",
        extra={
            "qid": qid,
            "domain": result.domain,
            "sent": counts[Outcome.SENT],
            "deferred": counts[Outcome.DEFERRED],
            "bounced": counts[Outcome.BOUNCED],
            "dsn_rcpts": bounced,
            # code and enhanced code only: reply texts may quote addresses
            "reply": "" if deferred is None else f"{deferred.reply.code} {deferred.reply.enhanced}",
            "next_due": state.next_due if state.next_due is not None else "",
        },
    )
