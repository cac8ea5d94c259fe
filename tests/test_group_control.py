"""Combining the workers' answers into the relay group's (``mta.group_control``)."""

from __future__ import annotations

from mta.group_control import (
    combine_counts,
    combine_figures,
    combine_picked,
    combine_stats,
    first_failure,
)
from mta.model import QueueId
from mta.queueops import Picked, parse_picked, picked_answer


def test_stats_are_totals_then_each_worker() -> None:
    answers = [
        "ok queued=3 in_flight=1 tasks=7 rss_kb=100 fds=10 py_blocks=5",
        "ok queued=4 in_flight=0 tasks=6 rss_kb=90 fds=12 py_blocks=6",
    ]
    line = combine_stats(answers)
    assert line.startswith("ok queued=7 in_flight=1 tasks=13 rss_kb=190 fds=22 py_blocks=11 ")
    assert " workers=2 " in line
    assert "worker0.queued=3" in line
    assert line.endswith("worker1.py_blocks=6")


def test_stats_say_which_worker_is_down() -> None:
    line = combine_stats(["ok queued=2 in_flight=0", None])
    assert "queued=2" in line
    assert line.endswith("workers=2 worker0.queued=2 worker0.in_flight=0 worker1=down")


def test_a_command_for_every_shard_fails_naming_the_worker() -> None:
    assert first_failure(["ok 1", "ok 2"]) is None
    assert first_failure(["ok 1", None]) == (
        "error worker 1 is not running (it is being restarted); try again"
    )
    assert first_failure(["error disk full", "ok"]) == "error worker 0: disk full"
    assert combine_counts(["ok 3", "ok 4"]) == "ok 7"
    assert combine_counts(["ok 3", None]).startswith("error worker 1")


def test_figures_add_up() -> None:
    assert combine_figures(["ok rewrapped=2 failed=0", "ok rewrapped=3 failed=1"]) == (
        "ok rewrapped=5 failed=1"
    )
    assert combine_figures(["ok active=k2", "ok active=k2"]) == "ok active=k2"


def test_a_queue_change_is_what_any_shard_did() -> None:
    a, b = QueueId("A" * 20), QueueId("B" * 20)
    first = picked_answer(Picked((a,), missing=(b,)))
    second = picked_answer(Picked((b,), missing=(a,), skipped=()))
    assert parse_picked(combine_picked([first, second])) == Picked((a, b), (), ())
    nowhere = picked_answer(Picked((), missing=("C" * 20,)))
    assert parse_picked(combine_picked([nowhere, nowhere])).missing == ("C" * 20,)
    assert combine_picked([first, "ok not json"]).startswith("error")
