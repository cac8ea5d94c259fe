"""Hold, release, delete and requeue in a running scheduler (what the control socket
commands do), with the fakes: never a race with an attempt in flight."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mta.model import QueueId
from mta.queuetools import control_commands
from mta.schedule.state import decode_state

from .fakes import LATER, NO_USER, T0, FakeAgent, until
from .test_scheduler import MAX_AGE, Rig, by_domain, envelope, run


def held_in_store(rig: Rig, qid: QueueId) -> bool:
    return decode_state(rig.store.states[qid]).held


def test_a_held_message_is_never_attempted_nor_expired_and_release_makes_it_due() -> None:
    async def main() -> None:
        rig = Rig()
        qid = rig.submit(envelope("bob@b.test"))
        held = await rig.scheduler.change(qid, lambda s: s.hold())
        assert held is not None
        assert held.held
        assert held_in_store(rig, qid)  # sealed before it takes effect
        assert await rig.scheduler.run_once() == 0
        rig.clock.advance(2 * MAX_AGE)
        assert rig.scheduler.flush() == 0  # flush leaves held mail alone
        assert await rig.scheduler.run_once() == 0
        assert rig.agent.calls == []
        assert [e.held for e in rig.scheduler.snapshot()] == [True]
        assert rig.store.added_after(qid) == []  # no DSN for age while held

        now = rig.clock.t
        released = await rig.scheduler.change(qid, lambda s: s.release(now))
        assert released is not None
        assert not released.held
        assert await rig.scheduler.run_once() == 1
        assert rig.store.removed == [qid]

    run(main)


def test_delete_during_an_attempt_is_not_undone_by_its_result() -> None:
    async def main() -> None:
        # The attempt would bounce (a DSN) for one recipient and defer the other (a
        # state write): neither may happen to a message deleted while in flight.
        agent = FakeAgent(lambda _d, rcpt: NO_USER if rcpt.startswith("gone") else LATER)
        agent.gate = asyncio.Event()
        rig = Rig(agent)
        qid = rig.submit(envelope("gone@b.test", "later@b.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: agent.running == 1)
        assert await rig.scheduler.delete(qid)
        assert qid not in rig.store.messages
        agent.gate.set()
        await until(lambda: agent.finished == 1 and rig.scheduler.in_flight == 0)
        for _ in range(20):
            await asyncio.sleep(0)
        rig.clock.advance(3600)
        rig.scheduler.flush()
        for _ in range(20):
            await asyncio.sleep(0)
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)
        assert qid not in rig.store.messages
        assert qid not in rig.store.states
        assert rig.store.added_after(qid) == []  # no DSN
        assert rig.scheduler.queued == 0
        assert len(agent.calls) == 1
        assert not await rig.scheduler.delete(qid)  # gone: nothing to delete twice

    run(main)


def test_hold_during_an_attempt_takes_effect_when_it_ends() -> None:
    async def main() -> None:
        agent = FakeAgent(by_domain({"b.test": LATER}))
        agent.gate = asyncio.Event()
        rig = Rig(agent)
        qid = rig.submit(envelope("bob@b.test"))
        runner = asyncio.create_task(rig.scheduler.run())
        await until(lambda: agent.running == 1)
        assert await rig.scheduler.change(qid, lambda s: s.hold()) is not None
        agent.gate.set()
        await until(lambda: agent.finished == 1 and rig.scheduler.in_flight == 0)
        rig.clock.advance(2 * MAX_AGE)  # far past the retry and the maximum age
        rig.scheduler.flush()
        for _ in range(50):
            await asyncio.sleep(0)
        await rig.scheduler.stop(1.0)
        await asyncio.wait_for(runner, 1.0)
        assert len(agent.calls) == 1
        state = decode_state(rig.store.states[qid])
        assert state.held
        assert state.recipients[0].attempts == 1  # the attempt's result was applied
        assert rig.store.added_after(qid) == []

    run(main)


def test_requeue_after_a_deferral_attempts_now_with_the_backoff_forgotten() -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"b.test": LATER})))
        qid = rig.submit(envelope("bob@b.test"))
        for _ in range(3):  # three deferrals: the next retry is 1200 s away
            await rig.scheduler.run_once()
            rig.clock.t = decode_state(rig.store.states[qid]).recipients[0].next_attempt
        assert await rig.scheduler.run_once() == 1
        assert decode_state(rig.store.states[qid]).recipients[0].next_attempt == rig.clock.t + 2400
        assert await rig.scheduler.run_once() == 0  # not due
        now = rig.clock.t
        assert await rig.scheduler.change(qid, lambda s: s.requeue(now)) is not None
        assert await rig.scheduler.run_once() == 1
        assert decode_state(rig.store.states[qid]).recipients[0].next_attempt == now + 300

    run(main)


def test_control_commands_select_by_domain_and_answer_what_they_did(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        rig = Rig(FakeAgent(by_domain({"b.test": LATER, "c.test": LATER})))
        q1 = rig.submit(envelope("x@b.test"))
        q2 = rig.submit(envelope("y@b.test", "z@c.test"))
        q3 = rig.submit(envelope("w@c.test"))
        commands = control_commands(rig.scheduler, rig.clock)
        answer = await commands["queue-hold"]("--domain b.test")
        assert answer == f'ok {{"done":["{q1}","{q2}"],"missing":[],"skipped":[]}}'
        assert await rig.scheduler.run_once() == 1  # only q3
        answer = await commands["queue-delete"]("--domain b.test")
        assert answer == f'ok {{"done":["{q1}"],"missing":[],"skipped":["{q2}"]}}'
        answer = await commands["queue-release"](f"{q2} nosuch")
        assert answer == f'ok {{"done":["{q2}"],"missing":["nosuch"],"skipped":[]}}'
        assert (await commands["queue-requeue"]("../x")).startswith("error not a queue id")
        with caplog.at_level(logging.INFO, logger="mta.queuetools"):
            assert commands["queue-show-body"](q3) == "ok"
        [logged] = [r for r in caplog.records if r.getMessage() == "queue.show.body"]
        assert logged.__dict__["qid"] == q3
        assert rig.store.added_after(q3) == []
        assert sorted(rig.store.messages) == [q2, q3]

    run(main)


def test_a_version_1_state_on_disk_is_recovered_as_not_held() -> None:
    async def main() -> None:
        rig = Rig()
        qid = rig.store.add(envelope("bob@b.test"))
        rig.store.states[qid] = (
            b'{"v":1,"received_at":%r,"rcpts":[{"rcpt":"bob@b.test","status":"pending",'
            b'"attempts":1,"next_attempt":%r,"last_error":"451","reply":null}]}' % (T0, T0)
        )
        assert await rig.scheduler.recover() == 1
        assert await rig.scheduler.run_once() == 1

    run(main)
