"""Per-recipient state: the transition table, grouping by domain, expiry, JSON round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult
from mta.reply import SmtpReply
from mta.schedule.state import (
    TRANSITIONS,
    MessageState,
    QueueEntry,
    RcptStatus,
    RecipientState,
    StateError,
    decode_state,
    encode_state,
    initial_state,
    queue_entry,
)

T0 = 1_700_000_000.0
RETRY = {"retry_min": 300.0, "retry_max": 4000.0}
OK = SmtpReply(250, "2.0.0", "OK")
LATER = SmtpReply(451, "4.7.5", "TLS policy not satisfied")
NO = SmtpReply(550, "5.1.1", "No such user")
REPLY_FOR = {Outcome.SENT: OK, Outcome.DEFERRED: LATER, Outcome.BOUNCED: NO}

P, S, B = RcptStatus.PENDING, RcptStatus.SENT, RcptStatus.BOUNCED


def envelope(*rcpts: str, received_at: float = T0) -> Envelope:
    return Envelope(mail_from="alice@example.org", rcpt_tos=rcpts, received_at=received_at)


def result(
    domain: str, *outcomes: tuple[str, Outcome], reason: str | None = None
) -> DeliveryResult:
    return DeliveryResult(
        domain=domain,
        results=tuple(RecipientResult(r, o, REPLY_FOR[o], reason) for r, o in outcomes),
    )


@pytest.mark.parametrize(
    ("before", "outcome", "after"),
    [
        (P, Outcome.SENT, S),
        (P, Outcome.DEFERRED, P),
        (P, Outcome.BOUNCED, B),
        # final states never change again
        (S, Outcome.SENT, S),
        (S, Outcome.DEFERRED, S),
        (S, Outcome.BOUNCED, S),
        (B, Outcome.SENT, B),
        (B, Outcome.DEFERRED, B),
        (B, Outcome.BOUNCED, B),
    ],
)
def test_transition_table(before: RcptStatus, outcome: Outcome, after: RcptStatus) -> None:
    state = MessageState(T0, (RecipientState("bob@b.test", status=before),))
    new, bounced = state.apply(result("b.test", ("bob@b.test", outcome)), T0 + 10, **RETRY)
    assert new.recipients[0].status is after
    assert TRANSITIONS.get((before, outcome), before) is after
    assert len(bounced) == (before is P and outcome is Outcome.BOUNCED)
    changed = before is P
    assert new.recipients[0].attempts == (1 if changed else 0)


def test_initial_state_all_due_and_duplicates_collapsed() -> None:
    state = initial_state(envelope("a@x.test", "b@y.test", "a@x.test", received_at=T0))
    assert [r.rcpt for r in state.recipients] == ["a@x.test", "b@y.test"]
    assert all(r.status is P and r.attempts == 0 for r in state.recipients)
    assert state.next_due == T0
    assert state.due_by_domain(T0) == {"x.test": ("a@x.test",), "y.test": ("b@y.test",)}
    assert not state.done


def test_due_by_domain_groups_and_lowercases() -> None:
    state = initial_state(envelope("a@X.test", "b@y.test", "c@x.TEST"))
    assert state.due_by_domain(T0) == {"x.test": ("a@X.test", "c@x.TEST"), "y.test": ("b@y.test",)}
    assert state.due_by_domain(T0 - 1) == {}
    assert state.domains == ("x.test", "y.test")


def test_deferral_backs_off_by_doubling() -> None:
    state = initial_state(envelope("a@x.test"))
    now = T0
    delays = []
    for _ in range(6):
        state, bounced = state.apply(result("x.test", ("a@x.test", Outcome.DEFERRED)), now, **RETRY)
        assert bounced == ()
        delays.append(state.recipients[0].next_attempt - now)
        now = state.recipients[0].next_attempt
    assert delays == [300.0, 600.0, 1200.0, 2400.0, 4000.0, 4000.0]
    assert state.recipients[0].attempts == 6


def test_deferral_records_reply_and_reason() -> None:
    state = initial_state(envelope("a@x.test"))
    deferred = result("x.test", ("a@x.test", Outcome.DEFERRED), reason="starttls-not-supported")
    state, _ = state.apply(deferred, T0, **RETRY)
    rcpt = state.recipients[0]
    assert rcpt.last_error == "451 4.7.5 TLS policy not satisfied (starttls-not-supported)"
    assert rcpt.reply == LATER


def test_two_domains_tracked_separately() -> None:
    state = initial_state(envelope("a@x.test", "b@y.test"))
    state, _ = state.apply(result("x.test", ("a@x.test", Outcome.DEFERRED)), T0, **RETRY)
    state, _ = state.apply(result("y.test", ("b@y.test", Outcome.SENT)), T0, **RETRY)
    assert [r.status for r in state.recipients] == [P, S]
    assert state.domains == ("x.test",)
    assert state.due_by_domain(T0 + 299) == {}
    assert state.due_by_domain(T0 + 300) == {"x.test": ("a@x.test",)}
    assert state.next_due == T0 + 300
    state, _ = state.apply(result("x.test", ("a@x.test", Outcome.SENT)), T0 + 300, **RETRY)
    assert state.done
    assert state.next_due is None
    assert state.recipients[0].last_error == ""


def test_results_for_unknown_recipients_are_ignored() -> None:
    state = initial_state(envelope("a@x.test"))
    new, bounced = state.apply(result("x.test", ("z@x.test", Outcome.BOUNCED)), T0, **RETRY)
    assert new == state
    assert bounced == ()


def test_bounce_reported_once() -> None:
    state = initial_state(envelope("a@x.test", "b@x.test"))
    bounce = result("x.test", ("a@x.test", Outcome.BOUNCED), ("b@x.test", Outcome.DEFERRED))
    state, bounced = state.apply(bounce, T0, **RETRY)
    assert [r.rcpt for r in bounced] == ["a@x.test"]
    assert bounced[0].reply == NO
    state, again = state.apply(bounce, T0 + 300, **RETRY)
    assert again == ()


@pytest.mark.parametrize(
    ("age", "rcpts", "bounced"),
    [
        (99.0, None, []),
        (100.0, None, ["a@x.test", "c@z.test"]),
        (100.0, ("a@x.test",), ["a@x.test"]),
        (1e6, ("b@y.test",), []),  # already sent: not touched
    ],
)
def test_expire(age: float, rcpts: tuple[str, ...] | None, bounced: list[str]) -> None:
    state = initial_state(envelope("a@x.test", "b@y.test", "c@z.test"))
    state, _ = state.apply(result("x.test", ("a@x.test", Outcome.DEFERRED)), T0, **RETRY)
    state, _ = state.apply(result("y.test", ("b@y.test", Outcome.SENT)), T0, **RETRY)
    new, gone = state.expire(T0 + age, 100.0, rcpts)
    assert [r.rcpt for r in gone] == bounced
    assert all(r.status is B for r in gone)
    if "a@x.test" in bounced:
        a = next(r for r in new.recipients if r.rcpt == "a@x.test")
        assert a.last_error.startswith("message expired; last error: 451 4.7.5")
        assert a.reply == LATER
    if not bounced:
        assert new == state


def test_flush_makes_pending_due_now() -> None:
    state = initial_state(envelope("a@x.test", "b@y.test"))
    state, _ = state.apply(result("x.test", ("a@x.test", Outcome.DEFERRED)), T0, **RETRY)
    state, _ = state.apply(result("y.test", ("b@y.test", Outcome.SENT)), T0, **RETRY)
    flushed = state.flush(T0 + 1)
    assert flushed.due_by_domain(T0 + 1) == {"x.test": ("a@x.test",)}
    assert flushed.recipients[1] == state.recipients[1]


def test_queue_entry() -> None:
    state = initial_state(envelope("a@x.test", "b@y.test", "c@z.test"))
    state, _ = state.apply(result("x.test", ("a@x.test", Outcome.SENT)), T0, **RETRY)
    state, _ = state.apply(result("y.test", ("b@y.test", Outcome.DEFERRED)), T0 + 5, **RETRY)
    entry = queue_entry(QueueId("q1"), state, T0 + 60)
    assert entry == QueueEntry(
        qid=QueueId("q1"),
        age=60.0,
        domains=("y.test", "z.test"),
        next_attempt=T0,  # c@z.test has not been tried yet
        last_error="451 4.7.5 TLS policy not satisfied",
    )


def test_queue_entry_shows_no_address_a_server_quoted() -> None:
    """``mta queue list`` shows domains only, even when the remote reply names the
    recipient (``state`` keeps the reply whole: it is sealed)."""
    state = initial_state(envelope("bob@y.test"))
    deferred = RecipientResult(
        "bob@y.test", Outcome.DEFERRED, SmtpReply(450, "4.2.1", "<bob@y.test>: mailbox busy")
    )
    state, _ = state.apply(DeliveryResult("y.test", (deferred,)), T0, **RETRY)
    entry = queue_entry(QueueId("q1"), state, T0 + 60)
    assert "bob@" not in entry.last_error
    assert entry.last_error.startswith("450 4.2.1 <h:")
    assert "@y.test>: mailbox busy" in entry.last_error


# --- encode / decode ---

replies = st.builds(
    SmtpReply,
    code=st.integers(200, 599),
    enhanced=st.text(max_size=10),
    text=st.text(max_size=40),
)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
recipient_states = st.builds(
    RecipientState,
    rcpt=st.text(max_size=30),
    status=st.sampled_from(RcptStatus),
    attempts=st.integers(0, 10**6),
    next_attempt=finite,
    last_error=st.text(max_size=60),
    reply=st.none() | replies,
)
states = st.builds(
    MessageState,
    received_at=finite,
    recipients=st.tuples() | st.lists(recipient_states).map(tuple),
    held=st.booleans(),
)


@given(states)
def test_encode_decode_round_trip(state: MessageState) -> None:
    assert decode_state(encode_state(state)) == state


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"v":3,"received_at":0,"rcpts":[],"held":false}',
        b'{"v":2,"received_at":0,"rcpts":[]}',
        b'{"v":2,"received_at":0,"rcpts":[],"held":1}',
        b'{"v":1,"received_at":"0","rcpts":[]}',
        b'{"v":1,"received_at":NaN,"rcpts":[]}',
        b'{"v":1,"received_at":0,"rcpts":{}}',
        b'{"v":1,"received_at":0,"rcpts":[1]}',
        b'{"v":1,"received_at":0,"rcpts":[{"rcpt":"a"}]}',
        b'{"v":1,"received_at":0,"rcpts":[{"rcpt":"a","status":"lost","attempts":0,'
        b'"next_attempt":0,"last_error":"","reply":null}]}',
        b'{"v":1,"received_at":0,"rcpts":[{"rcpt":"a","status":"pending","attempts":-1,'
        b'"next_attempt":0,"last_error":"","reply":null}]}',
        b'{"v":1,"received_at":0,"rcpts":[{"rcpt":"a","status":"pending","attempts":0,'
        b'"next_attempt":0,"last_error":"","reply":[250,"2.0.0"]}]}',
    ],
)
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(StateError):
        decode_state(data)
