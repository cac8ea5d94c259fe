"""The fleet's TLS-RPT counts: a day's tally survives the JSON of Redis unchanged, the
fleet's day is the sum of its relays', and a malformed document is refused."""

from __future__ import annotations

import json
from datetime import date

import pytest

from mta.report.tlsrpt import (
    DailyTally,
    FailureDetail,
    PolicyType,
    ReportedSession,
    ReportPolicy,
    render_report,
)
from mta.report.tlsrpt_send import Progress
from mta.shared.tlsrpt import _decode_progress, _encode_progress, decode_tally, encode_tally

DAY = date(2026, 12, 3)
STS = ReportPolicy(PolicyType.STS, "a.example", ("version: STSv1", "mode: enforce"), ("mx.a",))
NONE = ReportPolicy(PolicyType.NO_POLICY_FOUND, "b.example")
FAIL = FailureDetail("starttls-not-supported", "127.0.0.1", "mx.b.example", "127.0.0.2")


def tally(successes: int, failures: int, day: date = DAY) -> DailyTally:
    t = DailyTally()
    t.add_all(ReportedSession(day, STS) for _ in range(successes))
    t.add_all(ReportedSession(day, NONE, FAIL) for _ in range(failures))
    return t


def report(t: DailyTally, domain: str) -> dict[str, object]:
    return render_report(t, DAY, domain, organization="o", contact="c", report_id="r")


def test_round_trip_through_json() -> None:
    original = tally(3, 2)
    again = decode_tally(json.loads(json.dumps(encode_tally(original, DAY))))
    for domain in ("a.example", "b.example"):
        assert report(again, domain) == report(original, domain)
    assert again.domains(DAY) == ["a.example", "b.example"]


def test_only_the_day_asked_for() -> None:
    both = tally(1, 0)
    both.merge(tally(5, 5, date(2026, 12, 2)))
    assert decode_tally(encode_tally(both, DAY)).days() == [DAY]


def test_merge_sums_every_relay() -> None:
    fleet = DailyTally()
    for part in (tally(3, 1), tally(2, 0), tally(0, 4)):
        fleet.merge(decode_tally(encode_tally(part, DAY)))
    (sts,) = report(fleet, "a.example")["policies"]  # type: ignore[misc]
    (plain,) = report(fleet, "b.example")["policies"]  # type: ignore[misc]
    assert sts["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 0}
    assert plain["summary"]["total-failure-session-count"] == 5
    assert plain["failure-details"][0]["failed-session-count"] == 5
    assert plain["failure-details"][0]["receiving-mx-hostname"] == "mx.b.example"


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"v": 2, "day": "2026-12-03", "policies": []},
        {"v": 1, "day": "yesterday", "policies": []},
        {"v": 1, "day": "2026-12-03", "policies": [{"type": "sts"}]},
        {
            "v": 1,
            "day": "2026-12-03",
            "policies": [
                {"type": "sts", "domain": "a", "strings": [], "mx": [], "ok": -1, "failures": []}
            ],
        },
        {
            "v": 1,
            "day": "2026-12-03",
            "policies": [
                {"type": "x", "domain": "a", "strings": [], "mx": [], "ok": 1, "failures": []}
            ],
        },
    ],
)
def test_malformed_counts_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError: the caller logs it
        decode_tally(doc)


@pytest.mark.parametrize(
    "doc",
    [b"[]", b'{"done": "x", "tries": {}}', b'{"done": []}', b'{"done": [1], "tries": {}}', b"{"],
)
def test_a_malformed_sent_mark_is_a_value_error(doc: bytes) -> None:
    """Only a bad record, never a bug, is taken for an unreadable sent-mark (which stops
    that report rather than risk sending it twice)."""
    with pytest.raises(ValueError, match=r"sent-mark|expected a string|Expecting"):
        _decode_progress(doc)


def test_a_sent_mark_round_trips() -> None:
    progress = Progress(frozenset({"mailto:r@a.example"}), {"https://a.example/r": 2})
    assert _decode_progress(_encode_progress(progress)) == progress
