"""Which messages a queue selection names, what each action does, and the socket form."""

from __future__ import annotations

import pytest

from mta.model import Envelope, QueueId
from mta.queueops import (
    Action,
    Picked,
    Selection,
    SelectionError,
    altered,
    make_selection,
    parse_picked,
    parse_selection,
    pick,
    picked_answer,
    show_doc,
    show_text,
)
from mta.queueview import entry_dict, entry_line
from mta.schedule.state import MessageState, initial_state, queue_entry

T0 = 1_700_000_000.0
Q1, Q2, Q3 = QueueId("aaaa1"), QueueId("bbbb2"), QueueId("cccc3")


def state(*rcpts: str, held: bool = False) -> MessageState:
    fresh = initial_state(Envelope(mail_from="s@o.test", rcpt_tos=rcpts, received_at=T0))
    return fresh.hold() if held else fresh


QUEUE = [
    (Q1, state("a@x.test")),
    (Q2, state("b@x.test", "c@y.test", held=True)),
    (Q3, state("d@y.test")),
]


@pytest.mark.parametrize(
    ("argument", "selection"),
    [
        ("--all", Selection(all=True)),
        ("--domain X.Test.", Selection(domain="x.test")),
        ("aaaa1 bbbb2 aaaa1", Selection(qids=(Q1, Q2))),
    ],
)
def test_parse_selection(argument: str, selection: Selection) -> None:
    assert parse_selection(argument) == selection
    assert parse_selection(" ".join(selection.words())) == selection


@pytest.mark.parametrize(
    "argument",
    ["", "--all aaaa1", "--domain", "--domain a b", "../etc/passwd", "--domain x;rm", "q-1"],
)
def test_parse_selection_refuses(argument: str) -> None:
    with pytest.raises(SelectionError):
        parse_selection(argument)


def test_make_selection_wants_exactly_one_kind() -> None:
    with pytest.raises(SelectionError):
        make_selection(["aaaa1"], every=True)
    with pytest.raises(SelectionError):
        make_selection([], every=True, domain="x.test")


@pytest.mark.parametrize(
    ("action", "selection", "picked"),
    [
        (Action.HOLD, Selection(all=True), Picked((Q1, Q3))),  # Q2 is held already
        (Action.RELEASE, Selection(all=True), Picked((Q2,))),
        (Action.HOLD, Selection(domain="x.test"), Picked((Q1,))),
        (Action.RELEASE, Selection(domain="y.test"), Picked((Q2,))),
        (Action.REQUEUE, Selection(domain="y.test"), Picked((Q2, Q3))),
        # delete --domain never drops mail that also goes elsewhere
        (Action.DELETE, Selection(domain="x.test"), Picked((Q1,), (), (Q2,))),
        (Action.DELETE, Selection(domain="y.test"), Picked((Q3,), (), (Q2,))),
        (Action.DELETE, Selection(qids=(Q2, QueueId("zzzz9"))), Picked((Q2,), ("zzzz9",))),
        (Action.HOLD, Selection(domain="nowhere.test"), Picked(())),
    ],
)
def test_pick(action: Action, selection: Selection, picked: Picked) -> None:
    assert pick(action, selection, QUEUE) == picked


def test_altered() -> None:
    fresh = state("a@x.test")
    assert altered(Action.HOLD, fresh, T0).held
    assert altered(Action.RELEASE, fresh, T0 + 5) is fresh  # not held: nothing to do
    assert not altered(Action.RELEASE, fresh.hold(), T0 + 5).held
    assert altered(Action.REQUEUE, fresh, T0 + 5).recipients[0].next_attempt == T0 + 5
    with pytest.raises(ValueError, match="delete"):
        altered(Action.DELETE, fresh, T0)


def test_the_answer_round_trips() -> None:
    picked = Picked((Q1,), ("zzzz9",), (Q2,))
    assert parse_picked(picked_answer(picked)) == picked
    with pytest.raises(ValueError, match="done"):
        parse_picked('ok {"done": "aaaa1"}')


def test_list_marks_held_messages_like_mailq() -> None:
    entry = queue_entry(Q2, state("b@x.test", held=True), T0 + 90)
    line = entry_line(entry, T0 + 90)
    assert line.startswith("bbbb2! ")
    assert entry_dict(entry)["held"] is True
    assert "now" not in line  # never due while held
    assert entry_line(queue_entry(Q1, state("a@x.test"), T0 + 90), T0 + 90).startswith("aaaa1 ")


def test_show_doc_has_the_body_only_when_asked() -> None:
    envelope = Envelope(mail_from="s@o.test", rcpt_tos=("a@x.test",), received_at=T0)
    held = state("a@x.test", held=True)
    doc = show_doc(Q1, envelope, held, b"Subject: hi", 30, T0 + 10)
    assert "body" not in doc
    assert doc["envelope"]["mail_from"] == "s@o.test"
    assert doc["recipients"] == [
        {
            "rcpt": "a@x.test",
            "status": "pending",
            "attempts": 0,
            "next_attempt": None,
            "last_error": "",
        }
    ]
    assert show_doc(Q1, envelope, held, b"Subject: hi", 30, T0, body=b"text\r\n")["body"] == (
        "text\r\n"
    )
    text = show_text(doc, lambda _moment: "now")
    assert "(held)" in text
    assert "a@x.test  pending  attempts=0  next=held" in text
