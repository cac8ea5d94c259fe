"""The scheduler, driven step by step with a fake clock, an in-memory spool and a fake agent."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from email.message import EmailMessage, Message

import pytest

from mta.config import OutboundConfig
from mta.errors import SpoolError
from mta.events import DeliveryAttempt, Event
from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult
from mta.reply import SmtpReply
from mta.schedule.scheduler import FRESH_LARGEST, QueueEntry, Scheduler
from mta.schedule.state import RcptStatus, decode_state, encode_state, initial_state

from .fakes import LATER, NO_USER, OK, T0, FakeAgent, FakeClock, MemoryStore, until

MAX_AGE = 5 * 86400.0
SENDER = "alice@example.org"


def envelope(*rcpts: str, sender: str = SENDER, received_at: float = T0) -> Envelope:
    return Envelope(mail_from=sender, rcpt_tos=rcpts, received_at=received_at)


class Rig:
    def __init__(
        self,
        agent: FakeAgent | None = None,
        *,
        max_connections: int = 10,
        max_per_destination: int = 5,
        max_age: float = MAX_AGE,
    ) -> None:
        self.events: list[Event] = []
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.agent = agent or FakeAgent()
        self.scheduler = Scheduler(
            self.store,
            self.agent,
            self.clock,
            outbound=OutboundConfig(
                max_connections=max_connections,
                max_per_destination=max_per_destination,
                retry_min=300.0,
                retry_max=4000.0,
            ),
            max_age=max_age,
            hostname="relay.example.org",
            events=self.events.append,
        )

    def submit(self, env: Envelope, content: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> QueueId:
        qid = self.store.add(env, content)
        self.scheduler.enqueue(qid, env)
        return qid

    def status(self, qid: QueueId) -> dict[str, RcptStatus]:
        state = decode_state(self.store.states[qid])
        return {r.rcpt: r.status for r in state.recipients}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def by_domain(replies: dict[str, SmtpReply]) -> Callable[[str, str], SmtpReply]:
    return lambda domain, _rcpt: replies.get(domain, OK)


def parse_dsn(data: bytes) -> tuple[EmailMessage, list[Message]]:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    status = list(message.iter_parts())[1].get_payload()
    assert isinstance(status, list)
    return message, [block for block in status if isinstance(block, Message)]


def test_delivered_message_is_removed() -> None:
    async def main() -> None:
        rig = Rig()
        qid = rig.submit(envelope("bob@b.test", "carol@b.test"), b"Subject: x\r\n\r\nhello\r\n")
        assert await rig.scheduler.run_once() == 1
        [call] = rig.agent.calls
        assert (call.qid, call.domain, call.rcpts) == (
            qid,
            "b.test",
            ("bob@b.test", "carol@b.test"),
        )
        assert call.content == b"Subject: x\r\n\r\nhello\r\n"
        assert rig.store.removed == [qid]
        assert rig.store.messages == {}
        assert rig.scheduler.snapshot() == []
        assert await rig.scheduler.run_once() == 0

    run(main)


def test_message_without_recipients_is_removed() -> None:
    async def main() -> None:
        rig = Rig()
        qid = rig.submit(envelope())
        assert await rig.scheduler.run_once() == 0
        assert rig.store.removed == [qid]
        assert rig.scheduler.snapshot() == []

    run(main)


def test_deferred_message_retried_after_backoff() -> None:
    async def main() -> None:
        answers = iter([LATER, LATER, OK])
        rig = Rig(FakeAgent(lambda _d, _r: next(answers)))
        qid = rig.submit(envelope("bob@b.test"))
        assert await rig.scheduler.run_once() == 1
        state = decode_state(rig.store.states[qid])
        assert state.recipients[0].attempts == 1
        assert state.recipients[0].next_attempt == T0 + 300
        assert state.recipients[0].last_error == "451 4.7.5 TLS policy not satisfied"

        assert await rig.scheduler.run_once() == 0  # not due yet
        rig.clock.advance(299)
        assert await rig.scheduler.run_once() == 0
        rig.clock.advance(1)
        assert await rig.scheduler.run_once() == 1
        assert decode_state(rig.store.states[qid]).recipients[0].next_attempt == T0 + 300 + 600

        rig.clock.advance(599)
        assert await rig.scheduler.run_once() == 0
        rig.clock.advance(1)
        assert await rig.scheduler.run_once() == 1
        assert rig.store.removed == [qid]
        assert len(rig.agent.calls) == 3

    run(main)


def test_global_concurrency_limit() -> None:
    async def main() -> None:
        rig = Rig(max_connections=2)
        for n in range(6):
            rig.submit(envelope(f"user@d{n}.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: not rig.store.messages)
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)
        assert len(rig.agent.calls) == 6
        assert rig.agent.max_running == 2

    run(main)


def test_per_destination_limit() -> None:
    async def main() -> None:
        agent = FakeAgent()
        agent.gate = asyncio.Event()
        rig = Rig(agent, max_connections=10, max_per_destination=2)
        for _ in range(5):
            rig.submit(envelope("bob@busy.test"))
        rig.submit(envelope("carol@quiet.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: agent.running == 3)
        for _ in range(20):
            await asyncio.sleep(0)
        assert agent.running_by_domain["busy.test"] == 2
        assert agent.running_by_domain["quiet.test"] == 1
        agent.gate.set()
        await until(lambda: not rig.store.messages)
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)
        assert agent.max_by_domain["busy.test"] == 2
        assert len(agent.calls) == 6

    run(main)


def test_two_domains_tracked_separately() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"slow.test": LATER})))
        qid = rig.submit(envelope("a@slow.test", "b@fast.test", "c@slow.test"))
        assert await rig.scheduler.run_once() == 2
        assert rig.status(qid) == {
            "a@slow.test": RcptStatus.PENDING,
            "b@fast.test": RcptStatus.SENT,
            "c@slow.test": RcptStatus.PENDING,
        }
        [entry] = rig.scheduler.snapshot()
        assert entry.domains == ("slow.test",)

        rig.clock.advance(300)
        rig.agent.calls.clear()
        rig.agent.reply_for = by_domain({})
        assert await rig.scheduler.run_once() == 1
        [call] = rig.agent.calls
        assert (call.domain, call.rcpts) == ("slow.test", ("a@slow.test", "c@slow.test"))
        assert rig.store.removed == [qid]

    run(main)


def test_permanent_failure_sends_dsn_to_sender() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(lambda _d, rcpt: NO_USER if rcpt.startswith("bob") else OK))
        qid = rig.submit(
            envelope("bob@b.test", "carol@b.test"),
            b"Subject: Quarterly\r\nFrom: alice@example.org\r\n\r\nsecret body\r\n",
        )
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]
        [dsn_qid] = rig.store.added_after(qid)
        dsn_env, dsn = rig.store.messages[dsn_qid]
        assert dsn_env.mail_from == ""
        assert dsn_env.rcpt_tos == (SENDER,)
        message, (per_message, bob) = parse_dsn(dsn)
        assert message["To"] == SENDER
        assert per_message["Reporting-MTA"] == "dns; relay.example.org"
        assert bob["Final-Recipient"] == "rfc822; bob@b.test"
        assert bob["Action"] == "failed"
        assert bob["Status"] == "5.1.1"
        assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
        assert bob["Remote-MTA"] == "dns; mx.b.test"
        assert "Subject: Quarterly" in list(message.iter_parts())[2].get_content()
        assert b"secret body" not in dsn

        # the DSN is queued like any message, and goes to the sender's domain
        [entry] = rig.scheduler.snapshot()
        assert entry.qid == dsn_qid
        rig.agent.calls.clear()
        await rig.scheduler.run_once()
        [call] = rig.agent.calls
        assert (call.qid, call.domain, call.rcpts) == (dsn_qid, "example.org", (SENDER,))
        assert call.envelope.mail_from == ""
        assert rig.store.messages == {}

    run(main)


def test_null_sender_gets_no_dsn() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(lambda _d, _r: NO_USER))
        qid = rig.submit(envelope("bob@b.test", sender=""))
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]
        assert rig.store.messages == {}
        assert rig.scheduler.snapshot() == []

    run(main)


def test_max_age_bounces_with_dsn() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(lambda _d, _r: LATER), max_age=1000.0)
        qid = rig.submit(envelope("bob@b.test"))
        await rig.scheduler.run_once()
        assert rig.status(qid) == {"bob@b.test": RcptStatus.PENDING}
        rig.clock.advance(1000)
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]
        [dsn_qid] = rig.store.added_after(qid)
        _, (_, bob) = parse_dsn(rig.store.messages[dsn_qid][1])
        assert bob["Status"] == "4.4.7"
        assert bob["Action"] == "failed"
        assert bob["Diagnostic-Code"] == "smtp; 451 4.7.5 TLS policy not satisfied"

    run(main)


def test_max_age_only_bounces_the_domain_just_tried() -> None:
    async def main() -> None:
        agent = FakeAgent(lambda _d, _r: LATER)
        rig = Rig(agent, max_age=1000.0)
        qid = rig.submit(envelope("a@one.test", "b@two.test"))
        await rig.scheduler.run_once()
        rig.clock.advance(1000)
        agent.reply_for = by_domain({"one.test": LATER})  # two.test now accepts
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]
        [dsn_qid] = rig.store.added_after(qid)
        _, (_, only) = parse_dsn(rig.store.messages[dsn_qid][1])
        assert only["Final-Recipient"] == "rfc822; a@one.test"

    run(main)


def test_dsn_not_stored_keeps_recipient_pending() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(lambda _d, _r: NO_USER))
        rig.store.put_error = SpoolError("disk full")
        qid = rig.submit(envelope("bob@b.test"))
        await rig.scheduler.run_once()
        assert rig.status(qid) == {"bob@b.test": RcptStatus.PENDING}
        assert qid in rig.store.messages

        rig.store.put_error = None
        rig.clock.advance(300)
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]
        assert len(rig.store.added_after(qid)) == 1

    run(main)


def test_corrupt_record_quarantined_and_others_delivered(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rig = Rig()
        bad = rig.submit(envelope("bob@b.test"))
        good = rig.submit(envelope("carol@c.test"))
        rig.store.corrupt.add(bad)
        await rig.scheduler.run_once()
        assert set(rig.store.quarantined) == {bad}
        assert "authentication failed" in rig.store.quarantined[bad]
        assert rig.store.removed == [good]
        assert [c.qid for c in rig.agent.calls] == [good]
        assert rig.scheduler.snapshot() == []

    with caplog.at_level(logging.WARNING, logger="mta.schedule"):
        run(main)
    assert any(r.getMessage() == "schedule.quarantined" for r in caplog.records)


def test_agent_exception_defers_with_local_error(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rig = Rig()
        rig.agent.error = RuntimeError("bug")
        qid = rig.submit(envelope("bob@b.test"))
        await rig.scheduler.run_once()
        rcpt = decode_state(rig.store.states[qid]).recipients[0]
        assert rcpt.status is RcptStatus.PENDING
        assert rcpt.last_error.startswith("451 4.3.0")
        rig.clock.advance(300)
        await rig.scheduler.run_once()
        assert rig.store.removed == [qid]

    with caplog.at_level(logging.ERROR, logger="mta.schedule"):
        run(main)
    [record] = [r for r in caplog.records if r.getMessage() == "schedule.attempt.error"]
    assert record.exc_info is not None


def test_loop_survives_agent_exceptions() -> None:
    async def main() -> None:
        rig = Rig()
        rig.agent.error = RuntimeError("bug")
        first = rig.submit(envelope("bob@b.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: first in rig.store.states)
        second = rig.submit(envelope("carol@c.test"))
        await until(lambda: second in rig.store.removed)
        assert not runner.done()
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)

    run(main)


def test_agent_result_missing_a_recipient_defers_it() -> None:
    async def main() -> None:
        rig = Rig()
        real = rig.agent.deliver

        async def forgetful(
            qid: QueueId, env: Envelope, domain: str, rcpts: Sequence[str], content: bytes
        ) -> DeliveryResult:
            result = await real(qid, env, domain, rcpts, content)
            return DeliveryResult(result.domain, result.results[:1], result.mx)

        rig.agent.deliver = forgetful  # type: ignore[method-assign, assignment]
        qid = rig.submit(envelope("a@b.test", "c@b.test"))
        await rig.scheduler.run_once()
        assert rig.status(qid) == {"a@b.test": RcptStatus.SENT, "c@b.test": RcptStatus.PENDING}
        assert await rig.scheduler.run_once() == 0  # deferred by backoff, not retried at once

    run(main)


def test_recover_schedules_spooled_messages() -> None:
    async def main() -> None:
        rig = Rig()
        fresh = rig.store.add(envelope("bob@b.test"))
        waiting_env = envelope("carol@c.test")
        waiting = rig.store.add(waiting_env)
        state = initial_state(waiting_env).flush(T0)
        state = state.apply(
            _deferred("c.test", "carol@c.test"), T0, retry_min=300.0, retry_max=4000.0
        )[0]
        rig.store.states[waiting] = encode_state(state)
        broken = rig.store.add(envelope("dave@d.test"))
        rig.store.corrupt.add(broken)
        garbled = rig.store.add(envelope("erin@e.test"))
        rig.store.states[garbled] = b"not json"

        assert await rig.scheduler.recover() == 2
        assert set(rig.store.quarantined) == {broken, garbled}
        assert {e.qid for e in rig.scheduler.snapshot()} == {fresh, waiting}

        await rig.scheduler.run_once()
        assert [c.qid for c in rig.agent.calls] == [fresh]
        rig.clock.advance(300)
        await rig.scheduler.run_once()
        assert [c.qid for c in rig.agent.calls] == [fresh, waiting]
        assert rig.store.messages == {}

    run(main)


def test_recover_removes_finished_messages() -> None:
    async def main() -> None:
        rig = Rig()
        env = envelope("bob@b.test")
        qid = rig.store.add(env)
        done = initial_state(env).apply(
            _sent("b.test", "bob@b.test"), T0, retry_min=300.0, retry_max=4000.0
        )[0]
        rig.store.states[qid] = encode_state(done)
        assert await rig.scheduler.recover() == 0
        assert rig.store.removed == [qid]

    run(main)


def test_flush_makes_deferred_due_now() -> None:
    async def main() -> None:
        answers = iter([LATER, OK])
        rig = Rig(FakeAgent(lambda _d, _r: next(answers)))
        qid = rig.submit(envelope("bob@b.test"))
        await rig.scheduler.run_once()
        assert await rig.scheduler.run_once() == 0
        assert rig.scheduler.flush() == 1
        assert await rig.scheduler.run_once() == 1
        assert rig.store.removed == [qid]
        assert rig.scheduler.flush() == 0

    run(main)


def test_oldest_received_at_follows_the_queue() -> None:
    """What mta_queue_oldest_seconds reads: the oldest message still queued."""

    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"late.test": LATER})))
        assert rig.scheduler.oldest_received_at is None
        rig.submit(envelope("bob@b.test", received_at=T0 - 50))
        rig.submit(envelope("carol@late.test", received_at=T0 - 10))
        assert rig.scheduler.oldest_received_at == T0 - 50
        await rig.scheduler.run_once()  # b.test delivered, late.test deferred
        assert rig.scheduler.oldest_received_at == T0 - 10

    run(main)


def test_run_wakes_on_enqueue_and_sleeps_otherwise() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"slow.test": LATER})))
        slow = rig.submit(envelope("bob@slow.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: slow in rig.store.states)
        # the next attempt is 300 (fake) seconds away: the loop must be asleep
        reads = rig.clock.reads
        await asyncio.sleep(0.05)
        assert rig.clock.reads - reads <= 2
        fast = rig.submit(envelope("carol@fast.test"))
        await until(lambda: fast in rig.store.removed)
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)
        assert [c.qid for c in rig.agent.calls] == [slow, fast]

    run(main)


def test_stop_waits_for_in_flight_attempts() -> None:
    async def main() -> None:
        agent = FakeAgent()
        agent.gate = asyncio.Event()
        rig = Rig(agent)
        qid = rig.submit(envelope("bob@b.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: agent.running == 1)
        stopping = asyncio.create_task(rig.scheduler.stop(10.0))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not stopping.done()
        later = rig.submit(envelope("carol@c.test"))  # not launched while stopping
        agent.gate.set()
        await asyncio.wait_for(stopping, 5.0)
        await asyncio.wait_for(runner, 1.0)
        assert rig.store.removed == [qid]
        assert [c.qid for c in agent.calls] == [qid]
        assert later in rig.store.messages

    run(main)


def test_stop_cancels_after_grace_and_leaves_state_alone() -> None:
    async def main() -> None:
        agent = FakeAgent()
        agent.gate = asyncio.Event()  # never opened
        rig = Rig(agent)
        qid = rig.submit(envelope("bob@b.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: agent.running == 1)
        await asyncio.wait_for(rig.scheduler.stop(0.05), 5.0)
        await asyncio.wait_for(runner, 1.0)
        assert agent.running == 0
        assert rig.scheduler.in_flight == 0
        assert qid in rig.store.messages
        assert qid not in rig.store.states

    run(main)


def test_snapshot() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"slow.test": LATER})))
        old = rig.submit(envelope("a@slow.test", "b@fast.test", received_at=T0 - 60))
        await rig.scheduler.run_once()
        new = rig.submit(envelope("c@other.test", received_at=T0))
        rig.clock.advance(10)
        assert rig.scheduler.snapshot() == [
            QueueEntry(old, 70.0, ("slow.test",), T0 + 300, "451 4.7.5 TLS policy not satisfied"),
            QueueEntry(new, 10.0, ("other.test",), T0, ""),
        ]

    run(main)


def _deferred(domain: str, rcpt: str) -> DeliveryResult:
    return DeliveryResult(domain, (RecipientResult(rcpt, Outcome.DEFERRED, LATER),))


def _sent(domain: str, rcpt: str) -> DeliveryResult:
    return DeliveryResult(domain, (RecipientResult(rcpt, Outcome.SENT, OK),))


def test_each_settled_attempt_is_one_event_with_expiry_applied() -> None:
    """DESIGN.md: one typed event per attempt, as settled. A deferral past the maximum
    age is reported as the bounce it became, not as the agent's deferral."""

    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"b.test": LATER})), max_age=1000.0)
        qid = rig.submit(envelope("bob@b.test", "carol@c.test"))
        await rig.scheduler.run_once()
        rig.clock.advance(1000)
        await rig.scheduler.run_once()
        attempts = [e for e in rig.events if isinstance(e, DeliveryAttempt)]
        assert [(e.qid, e.domain, e.received_at) for e in attempts] == [
            (qid, "b.test", T0),
            (qid, "c.test", T0),
            (qid, "b.test", T0),
        ]
        assert [[r.outcome for r in e.result.results] for e in attempts] == [
            [Outcome.DEFERRED],
            [Outcome.SENT],
            [Outcome.BOUNCED],
        ]
        assert [e.at for e in attempts] == [T0, T0, T0 + 1000]

    run(main)


def test_an_attempt_for_our_own_report_mail_is_marked_as_one() -> None:
    """TLS reports the relay wrote are never counted in a report (no report loops): the
    envelope's flag reaches the event."""

    async def main() -> None:
        rig = Rig()
        rig.submit(replace(envelope("tlsrpt@b.test"), report=True))
        rig.submit(envelope("bob@b.test"))
        await rig.scheduler.run_once()
        attempts = [e for e in rig.events if isinstance(e, DeliveryAttempt)]
        assert sorted(e.report for e in attempts) == [False, True]

    run(main)


@pytest.mark.parametrize(("size", "cached"), [(FRESH_LARGEST, True), (FRESH_LARGEST + 1, False)])
def test_only_small_fresh_content_skips_the_spool(size: int, cached: bool) -> None:
    """Content handed over at enqueue serves the first attempt only up to
    ``FRESH_LARGEST``; a larger message is read back from the spool instead of being
    held while it waits for a slot."""

    async def main() -> None:
        rig = Rig()
        env = envelope("bob@b.test")
        fresh = b"S" * size
        qid = rig.store.add(env, b"T" * size)  # what the spool would give back
        rig.scheduler.enqueue(qid, env, fresh)
        assert await rig.scheduler.run_once() == 1
        [call] = rig.agent.calls
        assert (call.content == fresh) is cached

    run(main)
