"""RFC 8460 §4: the aggregate report's counts and JSON shape."""

from __future__ import annotations

import json
from datetime import date

from mta.report.tlsrpt import (
    DailyTally,
    FailureDetail,
    PolicyType,
    ReportedSession,
    ReportPolicy,
    render_report,
)

DAY = date(2026, 12, 2)
STS = ReportPolicy(
    PolicyType.STS,
    "example.net",
    ("version: STSv1", "mode: enforce", "mx: *.mail.example.net", "max_age: 86400"),
    ("*.mail.example.net",),
)
TLSA = ReportPolicy(PolicyType.TLSA, "example.net", ("3 1 1 abcd",))
EXPIRED = FailureDetail("certificate-expired", "127.0.0.1", "mx1.mail.example.net", "127.0.0.9")


def _report(tally: DailyTally, domain: str = "example.net") -> dict[str, object]:
    report = render_report(
        tally, DAY, domain, organization="Example", contact="tls@x.test", report_id="r-1"
    )
    return json.loads(json.dumps(report))  # what goes on the wire


def test_sessions_are_counted_per_policy_and_equal_failures_summed() -> None:
    tally = DailyTally()
    tally.add_all([ReportedSession(DAY, STS)] * 3 + [ReportedSession(DAY, STS, EXPIRED)] * 2)
    tally.add(ReportedSession(DAY, STS, FailureDetail("starttls-not-supported")))
    tally.add(ReportedSession(DAY, TLSA))
    report = _report(tally)
    assert report["date-range"] == {
        "start-datetime": "2026-12-02T00:00:00Z",
        "end-datetime": "2026-12-02T23:59:59Z",
    }
    assert (report["organization-name"], report["contact-info"], report["report-id"]) == (
        "Example",
        "tls@x.test",
        "r-1",
    )
    sts, tlsa = report["policies"]  # type: ignore[misc]
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-domain": "example.net",
        "policy-string": list(STS.policy_string),
        "mx-host": ["*.mail.example.net"],
    }
    assert sts["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 3,
    }
    assert sts["failure-details"] == [
        {
            "result-type": "certificate-expired",
            "sending-mta-ip": "127.0.0.1",
            "receiving-mx-hostname": "mx1.mail.example.net",
            "receiving-ip": "127.0.0.9",
            "failed-session-count": 2,
        },
        {"result-type": "starttls-not-supported", "failed-session-count": 1},
    ]
    assert tlsa["summary"]["total-successful-session-count"] == 1
    assert tlsa["failure-details"] == []


def test_days_and_domains_are_kept_apart() -> None:
    tally = DailyTally()
    other = ReportPolicy(PolicyType.NO_POLICY_FOUND, "other.test")
    tally.add(ReportedSession(DAY, STS))
    tally.add(ReportedSession(date(2026, 12, 3), STS, EXPIRED))
    tally.add(ReportedSession(DAY, other, FailureDetail("validation-failure")))
    assert tally.domains(DAY) == ["example.net", "other.test"]
    assert tally.days() == [DAY, date(2026, 12, 3)]
    assert _report(tally)["policies"][0]["summary"] == {  # type: ignore[index]
        "total-successful-session-count": 1,
        "total-failure-session-count": 0,
    }
    tally.drop(DAY)
    assert tally.domains(DAY) == []
    assert tally.domains(date(2026, 12, 3)) == ["example.net"]


def test_a_domain_without_sessions_has_no_policies() -> None:
    assert _report(DailyTally())["policies"] == []
