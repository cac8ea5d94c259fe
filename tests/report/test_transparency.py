"""The transparency report's figures: known events give known shares (no I/O)."""

from __future__ import annotations

from datetime import date

import pytest

from mta.events import DeliveryAttempt, Event, MessageReceived
from mta.model import (
    DeliveryResult,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    TlsInfo,
    TlsLevel,
)
from mta.reply import SmtpReply
from mta.report.metrics import RESULT_TYPES
from mta.report.transparency import (
    Protection,
    build,
    deferral_reason,
    is_tls_failure,
    period,
    protection_of,
    reason_meaning,
)

T0 = 1_709_251_200.0  # 2024-03-01T00:00:00Z
DAY = 86400.0
OK = SmtpReply(250, "2.0.0", "OK")
TLS = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True)
DANE_EE = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)
DANE_TA = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_TA)
DANE_UNMET = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane")  # report-only, failed
STS = HostPolicy(PolicySource.MTA_STS, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)
STS_TESTING = HostPolicy(
    PolicySource.MTA_STS_TESTING, TlsLevel.ENCRYPT, "pkix", PeerAuth.PKIX, report_only=True
)
STS_TESTING_FAILED = HostPolicy(
    PolicySource.MTA_STS_TESTING,
    TlsLevel.ENCRYPT,
    "pkix",
    report_only=True,
    reported_failure="certificate-expired",
)
LOCAL = HostPolicy(PolicySource.LOCAL, TlsLevel.VERIFY, "fingerprint", PeerAuth.FINGERPRINT)
LOCAL_DANE = HostPolicy(PolicySource.LOCAL, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)
LOCAL_ENCRYPT = HostPolicy(PolicySource.LOCAL, TlsLevel.ENCRYPT, "none")
DEFAULT = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
DEFAULT_VERIFY = HostPolicy(PolicySource.DEFAULT, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)


def _result(
    policy: HostPolicy | None, tls: TlsInfo | None = TLS, domain: str = "a.test"
) -> DeliveryResult:
    return DeliveryResult(
        domain, (RecipientResult(f"x@{domain}", Outcome.SENT, OK),), tls=tls, policy=policy
    )


@pytest.mark.parametrize(
    ("policy", "tls", "expected"),
    [
        (DANE_EE, TLS, Protection.DANE),
        (DANE_TA, TLS, Protection.DANE),
        (DANE_UNMET, TLS, Protection.ENCRYPTED),
        (STS, TLS, Protection.MTA_STS),
        (STS_TESTING, TLS, Protection.MTA_STS),
        (STS_TESTING_FAILED, TLS, Protection.ENCRYPTED),
        (LOCAL, TLS, Protection.LOCAL),
        (LOCAL_DANE, TLS, Protection.LOCAL),
        (LOCAL_ENCRYPT, TLS, Protection.ENCRYPTED),
        (DEFAULT, TLS, Protection.ENCRYPTED),
        (DEFAULT_VERIFY, TLS, Protection.LOCAL),
        (None, TLS, Protection.ENCRYPTED),
        (DEFAULT, None, Protection.CLEAR),
        (STS_TESTING_FAILED, None, Protection.CLEAR),
    ],
)
def test_protection_of_the_host_that_took_the_mail(
    policy: HostPolicy | None, tls: TlsInfo | None, expected: Protection
) -> None:
    assert protection_of(_result(policy, tls)) is expected


@pytest.mark.parametrize(
    ("reason", "enhanced", "code", "expected"),
    [
        ("starttls-not-supported", "4.7.5", 451, "starttls-not-supported"),
        (None, "4.4.1", 451, "4.4.1"),
        ("", "4.2.2", 452, "4.2.2"),
        (None, "", 421, "421"),
    ],
)
def test_deferral_reason(reason: str | None, enhanced: str, code: int, expected: str) -> None:
    assert deferral_reason(reason, enhanced, code) == expected


def test_every_tls_failure_the_relay_reports_has_a_meaning() -> None:
    for result_type in RESULT_TYPES:
        assert is_tls_failure(result_type)
        assert reason_meaning(result_type), result_type
    for status in ("4.4.1", "4.7.5", "4.2.2", "421", "4.0.0"):
        assert not is_tls_failure(status)
    assert reason_meaning("4.4.1") == "no answer from host"
    assert reason_meaning("4.9.9") == ""
    assert is_tls_failure("some-new-type")  # a word, not a code


def _attempt(
    at: float,
    domain: str,
    policy: HostPolicy | None,
    outcomes: tuple[Outcome, ...] = (Outcome.SENT,),
    *,
    tls: TlsInfo | None = TLS,
    reply: SmtpReply = OK,
    reason: str | None = None,
    report: bool = False,
) -> DeliveryAttempt:
    results = tuple(
        RecipientResult(
            f"r{n}@{domain}",
            outcome,
            OK if outcome is Outcome.SENT else reply,
            None if outcome is Outcome.SENT else reason,
        )
        for n, outcome in enumerate(outcomes)
    )
    return DeliveryAttempt(
        at, QueueId(f"q{at}"), at, DeliveryResult(domain, results, tls=tls, policy=policy), report
    )


def _received(at: float, tls: str | None) -> MessageReceived:
    return MessageReceived(at, QueueId(f"m{at}"), "127.0.0.1:25", tls, False, 100, 1)


SENT3 = (Outcome.SENT,) * 3
DEFER = SmtpReply(451, "4.4.1", "no answer")
TLS_DEFER = SmtpReply(451, "4.7.5", "TLS required")
EVENTS: list[Event] = [
    # day 1: 3 DANE + 1 MTA-STS + 1 clear recipients delivered; 2 received, 1 over TLS
    _received(T0 + 10, "TLSv1.3"),
    _received(T0 + 11, None),
    _attempt(T0 + 100, "Dane.Test", DANE_EE, SENT3),
    _attempt(T0 + 200, "sts.test", STS),
    _attempt(T0 + 300, "clear.test", DEFAULT, tls=None),
    _attempt(T0 + 400, "sts.test", STS, (Outcome.DEFERRED,), reply=DEFER),
    # day 2 (the last): 1 local, 1 encrypted; deferrals and a bounce; a TLS report
    _received(T0 + DAY + 10, "TLSv1.2"),
    _attempt(T0 + DAY + 100, "local.test", LOCAL, (Outcome.SENT, Outcome.BOUNCED)),
    _attempt(T0 + DAY + 200, "enc.test", DEFAULT),
    _attempt(
        T0 + DAY + 300,
        "dane.test",
        DANE_EE,
        (Outcome.DEFERRED, Outcome.DEFERRED),
        tls=None,
        reply=TLS_DEFER,
        reason="starttls-not-supported",
    ),
    _attempt(T0 + DAY + 400, "sts.test", STS, (Outcome.SENT, Outcome.SENT), report=True),
    # outside the period: before it, and after now
    _attempt(T0 - 1, "old.test", DANE_EE),
    _attempt(T0 + DAY + 7200, "future.test", DANE_EE),
]
NOW = T0 + DAY + 3600  # 2024-03-02T01:00Z


def test_known_events_give_known_daily_shares() -> None:
    figures = build(EVENTS, now=NOW, days=2)
    first, second = figures.days
    assert (first.day, second.day) == (date(2024, 3, 1), date(2024, 3, 2))
    assert first.delivered.total == 5
    assert first.delivered.share(Protection.DANE) == pytest.approx(0.6)
    assert first.delivered.share(Protection.MTA_STS) == pytest.approx(0.2)
    assert first.delivered.share(Protection.CLEAR) == pytest.approx(0.2)
    assert first.delivered.share(Protection.LOCAL) == 0.0
    assert (first.deferred, first.bounced, first.received, first.received_tls) == (1, 0, 2, 1)
    assert first.received_tls_share == pytest.approx(0.5)
    assert second.delivered.total == 2
    assert second.delivered.share(Protection.LOCAL) == pytest.approx(0.5)
    assert second.delivered.share(Protection.ENCRYPTED) == pytest.approx(0.5)
    assert (second.deferred, second.bounced, second.received, second.received_tls) == (
        2,
        1,
        1,
        1,
    )
    assert figures.delivered.total == 7
    assert figures.delivered.authenticated == 5  # 3 DANE, 1 MTA-STS, 1 local
    assert figures.delivered.encrypted == 6
    assert figures.reports_excluded == 2  # the report's recipients, counted apart only


def test_top_domains_by_volume_with_their_protection_and_deferrals_by_reason() -> None:
    figures = build(EVENTS, now=NOW, days=2, top=3)
    # local.test and sts.test tie (1 delivered, 1 not): by name
    assert [d.domain for d in figures.domains] == ["dane.test", "local.test", "sts.test"]
    assert figures.domain_count == 5  # the report's domain is not one
    dane, local, sts = figures.domains
    assert (dane.delivered.count(Protection.DANE), dane.deferred) == (3, 2)
    assert (sts.delivered.count(Protection.MTA_STS), sts.deferred) == (1, 1)
    assert (local.delivered.count(Protection.LOCAL), local.bounced) == (1, 1)
    assert [(r.reason, r.count) for r in figures.deferrals] == [
        ("starttls-not-supported", 2),
        ("4.4.1", 1),
    ]
    assert figures.deferrals[1].meaning == "no answer from host"


def test_a_quiet_period_has_every_day_and_no_shares() -> None:
    figures = build([], now=NOW, days=3)
    assert [d.day.isoformat() for d in figures.days] == ["2024-02-29", "2024-03-01", "2024-03-02"]
    assert all(d.delivered.share(Protection.DANE) is None for d in figures.days)
    assert figures.days[0].received_tls_share is None
    assert (figures.domains, figures.deferrals) == ((), ())


@pytest.mark.parametrize("days", [0, -1, 367])
def test_period_refuses_nonsense(days: int) -> None:
    with pytest.raises(ValueError, match="days"):
        period(NOW, days)


def test_period_starts_at_the_first_days_utc_midnight() -> None:
    assert period(NOW, 1) == (T0 + DAY, NOW)
    assert period(NOW, 7) == (T0 + DAY - 6 * DAY, NOW)
