"""Holding, releasing and requeueing a message's state (``mta queue hold|release|requeue``)."""

from __future__ import annotations

import pytest

from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult
from mta.reply import SmtpReply
from mta.schedule.state import (
    MessageState,
    RcptStatus,
    decode_state,
    encode_state,
    initial_state,
    queue_entry,
)

T0 = 1_700_000_000.0
RETRY = {"retry_min": 300.0, "retry_max": 4000.0}
LATER = SmtpReply(451, "4.4.1", "Connection refused")
OK = SmtpReply(250, "2.0.0", "OK")
MAX_AGE = 5 * 86400.0


def deferred_twice() -> MessageState:
    """a@x.test deferred twice (next retry T0+600+600), b@y.test sent."""
    state = initial_state(
        Envelope(mail_from="s@o.test", rcpt_tos=("a@x.test", "b@y.test"), received_at=T0)
    )
    defer = DeliveryResult("x.test", (RecipientResult("a@x.test", Outcome.DEFERRED, LATER),))
    state, _ = state.apply(defer, T0, **RETRY)
    state, _ = state.apply(defer, T0 + 300, **RETRY)
    sent = DeliveryResult("y.test", (RecipientResult("b@y.test", Outcome.SENT, OK),))
    state, _ = state.apply(sent, T0 + 300, **RETRY)
    return state


def test_a_held_message_has_nothing_due_however_late() -> None:
    held = deferred_twice().hold()
    assert held.held
    assert held.due_by_domain(T0 + 10 * MAX_AGE) == {}
    assert held.pending  # still queued: holding decides nothing about the recipients
    assert not held.done


def test_a_held_message_does_not_expire_and_expires_after_release_only_when_tried() -> None:
    held = deferred_twice().hold()
    late = T0 + MAX_AGE + 3600
    assert held.expire(late, MAX_AGE) == (held, ())
    released = held.release(late)
    assert not released.held
    assert released.due_by_domain(late) == {"x.test": ("a@x.test",)}
    # The age still counts from receipt (Postfix's rule): the attempt after release
    # that defers again bounces it for age.
    _, bounced = released.expire(late, MAX_AGE)
    assert [r.rcpt for r in bounced] == ["a@x.test"]


def test_release_makes_pending_due_now_and_leaves_final_recipients() -> None:
    state = deferred_twice()
    released = state.hold().release(T0 + 400)
    a, b = released.recipients
    assert (a.next_attempt, a.attempts, a.status) == (T0 + 400, 2, RcptStatus.PENDING)
    assert b == state.recipients[1]


def test_requeue_forgets_the_backoff_and_keeps_a_hold() -> None:
    state = deferred_twice()
    assert state.recipients[0].next_attempt == T0 + 300 + 600  # doubled: 2nd failure
    requeued = state.requeue(T0 + 400)
    a, b = requeued.recipients
    assert (a.next_attempt, a.attempts) == (T0 + 400, 0)
    assert a.last_error  # history kept: only the backoff is forgotten
    assert b == state.recipients[1]
    again, _ = requeued.apply(
        DeliveryResult("x.test", (RecipientResult("a@x.test", Outcome.DEFERRED, LATER),)),
        T0 + 400,
        **RETRY,
    )
    assert again.recipients[0].next_attempt == T0 + 400 + 300  # retry_min again
    assert state.hold().requeue(T0 + 400).held


def test_an_attempt_ending_on_a_held_message_keeps_it_held() -> None:
    held = deferred_twice().hold()
    after, _ = held.apply(
        DeliveryResult("x.test", (RecipientResult("a@x.test", Outcome.DEFERRED, LATER),)),
        T0 + MAX_AGE + 1,
        **RETRY,
    )
    assert after.held
    assert after.expire(T0 + MAX_AGE + 1, MAX_AGE)[1] == ()


@pytest.mark.parametrize("held", [False, True])
def test_hold_survives_encoding(held: bool) -> None:
    state = deferred_twice()
    state = state.hold() if held else state
    assert decode_state(encode_state(state)) == state
    assert decode_state(encode_state(state)).held is held


def test_a_version_1_record_decodes_as_not_held() -> None:
    old = (
        b'{"v":1,"received_at":1700000000.0,"rcpts":[{"rcpt":"a@x.test","status":"pending",'
        b'"attempts":1,"next_attempt":1700000300.0,"last_error":"451","reply":null}]}'
    )
    state = decode_state(old)
    assert not state.held
    assert state.recipients[0].attempts == 1


def test_queue_entry_marks_a_held_message_and_gives_no_next_attempt() -> None:
    entry = queue_entry(QueueId("q1"), deferred_twice().hold(), T0 + 60)
    assert entry.held
    assert entry.next_attempt is None
    assert not queue_entry(QueueId("q1"), deferred_twice(), T0 + 60).held
