"""RFC 8460 §4: the aggregate report's counts and JSON shape."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date

import pytest

from mta.events import DeliveryAttempt
from mta.model import (
    DeliveryResult,
    HostPolicy,
    PeerAuth,
    PolicySource,
    QueueId,
    SessionRecord,
    TlsInfo,
    TlsLevel,
)
from mta.reply import SmtpReply
from mta.report.tlsrpt import (
    DailyTally,
    FailureDetail,
    PolicyType,
    ReportedSession,
    ReportPolicy,
    render_report,
    reported_sessions,
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


# --- which hosts of an attempt are sessions (reported_sessions) ---

NOON = 1_796_212_800.0  # 2026-12-02T12:00:00Z
OK = SmtpReply(250, "2.0.0", "OK")
NO = SmtpReply(451, "4.7.5", "no")
TLS13 = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, "EC-256")
DANE = HostPolicy(
    PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE, policy_strings=("3 1 1 abcd",)
)
STS_LINES = ("version: STSv1", "mode: enforce", "mx: *.example.net", "max_age: 86400")
STS_POLICY = HostPolicy(
    PolicySource.MTA_STS,
    TlsLevel.VERIFY,
    "pkix",
    PeerAuth.PKIX,
    policy_strings=STS_LINES,
    mx_patterns=("*.example.net",),
)
TESTING = HostPolicy(
    PolicySource.MTA_STS_TESTING,
    TlsLevel.VERIFY,
    "pkix",
    report_only=True,
    reported_failure="certificate-host-mismatch",
    policy_strings=("version: STSv1", "mode: testing", "mx: *.example.net", "max_age: 86400"),
    mx_patterns=("*.example.net",),
)
DEFAULT = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
MAY = HostPolicy(PolicySource.LOCAL, TlsLevel.MAY, "none")
MX = "mx1.example.net"


def _attempt(*sessions: SessionRecord, report: bool = False) -> DeliveryAttempt:
    result = DeliveryResult("example.net", (), sessions=sessions)
    return DeliveryAttempt(NOON, QueueId("q"), NOON - 5, result, report=report)


def _session(
    result_type: str | None,
    tls: TlsInfo | None,
    policy: HostPolicy | None,
    address: str = "192.0.2.25",
) -> SessionRecord:
    local = "192.0.2.1" if address else ""
    return SessionRecord(MX, address, NO if result_type else OK, result_type, tls, policy, local)


def _failure(result_type: str, address: str = "192.0.2.25") -> FailureDetail:
    return FailureDetail(result_type, "192.0.2.1" if address else "", MX, address)


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        # TLS negotiated, requirement met: a success (DANE: mx-host names the MX host)
        (
            _session(None, TLS13, DANE),
            ReportedSession(
                DAY, ReportPolicy(PolicyType.TLSA, "example.net", ("3 1 1 abcd",), (MX,))
            ),
        ),
        (
            _session(None, TLS13, STS_POLICY),
            ReportedSession(
                DAY, ReportPolicy(PolicyType.STS, "example.net", STS_LINES, ("*.example.net",))
            ),
        ),
        (
            _session(None, TLS13, DEFAULT),
            ReportedSession(DAY, ReportPolicy(PolicyType.NO_POLICY_FOUND, "example.net")),
        ),
        # TLS negotiated, requirement failed: a failure with both ends' addresses
        (
            _session("certificate-expired", TLS13, DANE),
            ReportedSession(
                DAY,
                ReportPolicy(PolicyType.TLSA, "example.net", ("3 1 1 abcd",), (MX,)),
                _failure("certificate-expired"),
            ),
        ),
        # no TLS at all, but TLS was required: a failure
        (
            _session("starttls-not-supported", None, DEFAULT),
            ReportedSession(
                DAY,
                ReportPolicy(PolicyType.NO_POLICY_FOUND, "example.net"),
                _failure("starttls-not-supported"),
            ),
        ),
        # MTA-STS testing: the mail went, the failed check is reported as a failure
        (
            _session(None, TLS13, TESTING),
            ReportedSession(
                DAY,
                ReportPolicy(
                    PolicyType.STS, "example.net", TESTING.policy_strings, ("*.example.net",)
                ),
                _failure("certificate-host-mismatch"),
            ),
        ),
        # an MX outside the MTA-STS policy, refused before connecting
        (
            _session("validation-failure", None, STS_POLICY, address=""),
            ReportedSession(
                DAY,
                ReportPolicy(PolicyType.STS, "example.net", STS_LINES, ("*.example.net",)),
                _failure("validation-failure", address=""),
            ),
        ),
        # a failed TLSA lookup refused the host before connecting (no HostPolicy)
        (
            _session("dnssec-invalid", None, None, address=""),
            ReportedSession(
                DAY,
                ReportPolicy(PolicyType.TLSA, "example.net", (), (MX,)),
                _failure("dnssec-invalid", address=""),
            ),
        ),
        # not TLS results: a connection that failed before TLS, plaintext at may
        (_session(None, None, DEFAULT), None),
        (_session(None, None, MAY), None),
    ],
)
def test_which_hosts_are_sessions(session: SessionRecord, expected: ReportedSession | None) -> None:
    assert reported_sessions(_attempt(session)) == ([expected] if expected else [])


def test_our_own_report_mail_is_never_counted() -> None:
    failed = _session("starttls-not-supported", None, DEFAULT)
    assert reported_sessions(_attempt(failed, report=True)) == []
    assert len(reported_sessions(_attempt(failed, failed))) == 2


def test_a_session_counts_on_the_utc_day_of_its_attempt() -> None:
    late = DeliveryAttempt(
        NOON + 12 * 3600 - 1,
        QueueId("q"),
        NOON,
        DeliveryResult("example.net", (), sessions=(_session(None, TLS13, DEFAULT),)),
    )
    (first,) = reported_sessions(late)
    (second,) = reported_sessions(replace(late, at=NOON + 12 * 3600))
    assert (first.day, second.day) == (DAY, date(2026, 12, 3))
