"""The transparency report's figures (issue 10 §4), computed from stored events. Pure.

For each UTC day of a period: the share of recipients delivered under each protection
(DANE, MTA-STS, a local authenticated policy, encrypted without authentication, in the
clear), the recipients deferred and bounced, the messages received and the share of them
received over TLS; over the whole period, the top destination domains by volume with
their protection mix, and the deferrals by reason. Shares count recipients, not messages
or sessions: one message to three recipients delivered over DANE is three.

Mail the relay wrote itself (TLS reports, ``DeliveryAttempt.report``) is left out and
counted apart, so the page can say so: a report is not mail we carry for anyone.
Time is a parameter (``now``); the events come from the receipt log.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

from mta.events import DeliveryAttempt, Event, MessageReceived
from mta.model import DeliveryResult, Outcome, PeerAuth, PolicySource

__all__ = [
    "DayFigures",
    "DomainFigures",
    "Mix",
    "Protection",
    "ReasonCount",
    "Transparency",
    "build",
    "deferral_reason",
    "is_tls_failure",
    "period",
    "protection_of",
    "reason_meaning",
]

DAY: Final = 86400.0
MAX_DAYS: Final = 366
TOP_DOMAINS: Final = 10


class Protection(enum.Enum):
    """How a delivered recipient's mail was protected on the wire, strongest first."""

    DANE = "dane"
    MTA_STS = "mta-sts"
    LOCAL = "local"
    ENCRYPTED = "encrypted"
    CLEAR = "clear"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def authenticated(self) -> bool:
        return self in (Protection.DANE, Protection.MTA_STS, Protection.LOCAL)


_LABELS: Final = {
    Protection.DANE: "DANE authenticated",
    Protection.MTA_STS: "MTA-STS authenticated",
    Protection.LOCAL: "Local policy, authenticated",
    Protection.ENCRYPTED: "Encrypted, not authenticated",
    Protection.CLEAR: "In the clear",
}
PROTECTIONS: Final = tuple(Protection)
_DANE_AUTH: Final = (PeerAuth.DANE_EE, PeerAuth.DANE_TA)
# RFC 3463 meanings of the enhanced codes deferrals carry most often (for the reader).
_ENHANCED: Final = {
    "4.0.0": "other temporary failure",
    "4.2.2": "mailbox full",
    "4.3.0": "mail system failure",
    "4.3.2": "system not accepting messages",
    "4.4.1": "no answer from host",
    "4.4.2": "bad connection",
    "4.4.3": "directory server failure (DNS)",
    "4.4.7": "delivery time expired",
    "4.7.0": "security or policy failure",
    "4.7.1": "delivery not authorized",
    "4.7.5": "cryptographic failure",
}
# RFC 8460 §4.3 result types and DESIGN.md's own: the TLS requirement was not met.
_TLS_FAILURES: Final = {
    "starttls-not-supported": "STARTTLS not offered",
    "certificate-host-mismatch": "certificate names another host",
    "certificate-expired": "certificate expired",
    "certificate-not-trusted": "certificate not trusted",
    "validation-failure": "validation failed",
    "tlsa-invalid": "TLSA records unusable",
    "dnssec-invalid": "DNSSEC validation failed",
    "dane-required": "DANE required, no usable TLSA",
    "sts-policy-fetch-error": "MTA-STS policy not fetched",
    "sts-policy-invalid": "MTA-STS policy invalid",
    "sts-webpki-invalid": "MTA-STS policy host not trusted",
    "no-forward-secrecy": "no forward secrecy",
    "weak-key": "weak server key",
    "protocol-too-old": "TLS version too old",
}
_STATUS: Final = re.compile(r"\d(\.\d{1,3}){2}|\d{3}")  # an enhanced code or a reply code


def protection_of(result: DeliveryResult) -> Protection:
    """The protection of the host that took the mail.

    DANE: the peer proved a DANE-EE/DANE-TA match (source ``dane``, or DANE auth under
    the MTA-STS/default rule: DANE wins, RFC 8461 §2). MTA-STS: PKIX-verified under an
    MTA-STS policy (``testing`` too: the check passed). Local: verified under the
    operator's own rule (a ``[domains]`` entry, or a verifying default level).
    """
    if result.tls is None:
        return Protection.CLEAR
    policy = result.policy
    if policy is None or not policy.verified:
        return Protection.ENCRYPTED
    if policy.source is PolicySource.LOCAL:
        return Protection.LOCAL
    if policy.source is PolicySource.DANE or policy.auth in _DANE_AUTH:
        return Protection.DANE
    if policy.source in (PolicySource.MTA_STS, PolicySource.MTA_STS_TESTING):
        return Protection.MTA_STS
    return Protection.LOCAL  # the default level asked for verification


def deferral_reason(reason: str | None, enhanced: str, code: int) -> str:
    """The RFC 8460 result type when there is one, else the reply's enhanced code."""
    if reason:
        return reason
    return enhanced or str(code)


def reason_meaning(reason: str) -> str:
    """What a deferral reason means in a few words ("" when unknown): an RFC 8460 result
    type, or an enhanced status code (RFC 3463)."""
    return _TLS_FAILURES.get(reason) or _ENHANCED.get(reason, "")


def is_tls_failure(reason: str) -> bool:
    """Whether a deferral reason says the TLS requirement was not met (a result type,
    not a status code from the reply)."""
    return _STATUS.fullmatch(reason) is None


@dataclass(frozen=True, slots=True)
class Mix:
    """Recipients counted per protection (in ``PROTECTIONS`` order)."""

    counts: tuple[int, ...] = (0,) * len(PROTECTIONS)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def count(self, protection: Protection) -> int:
        return self.counts[PROTECTIONS.index(protection)]

    def share(self, protection: Protection) -> float | None:
        """The fraction (0..1) of the total, None when nothing was delivered."""
        return self.count(protection) / self.total if self.total else None

    @property
    def authenticated(self) -> int:
        return sum(self.count(p) for p in PROTECTIONS if p.authenticated)

    @property
    def encrypted(self) -> int:
        return self.total - self.count(Protection.CLEAR)

    def plus(self, protection: Protection, number: int) -> Mix:
        index = PROTECTIONS.index(protection)
        counts = list(self.counts)
        counts[index] += number
        return Mix(tuple(counts))


@dataclass(frozen=True, slots=True)
class DayFigures:
    """One UTC day."""

    day: date
    delivered: Mix
    deferred: int  # recipients deferred (an attempt each: one recipient may count twice)
    bounced: int
    received: int  # messages accepted
    received_tls: int  # of them over TLS

    @property
    def received_tls_share(self) -> float | None:
        return self.received_tls / self.received if self.received else None


@dataclass(frozen=True, slots=True)
class DomainFigures:
    """One destination domain over the period."""

    domain: str
    delivered: Mix
    deferred: int
    bounced: int


@dataclass(frozen=True, slots=True)
class ReasonCount:
    reason: str  # RFC 8460 result type or enhanced status code
    count: int

    @property
    def meaning(self) -> str:
        return reason_meaning(self.reason)

    @property
    def tls(self) -> bool:
        """The TLS requirement was not met (an RFC 8460 result type)."""
        return is_tls_failure(self.reason)


@dataclass(frozen=True, slots=True)
class Transparency:
    """The figures of one report."""

    start: float  # epoch seconds, the first day's midnight (UTC)
    end: float  # the moment it was made
    days: tuple[DayFigures, ...]  # oldest first, every day of the period
    domains: tuple[DomainFigures, ...]  # by delivered recipients, most first
    domain_count: int  # destination domains in the period (the top ones are listed)
    deferrals: tuple[ReasonCount, ...]  # most first
    reports_excluded: int  # recipients of the relay's own report mail, left out

    @property
    def delivered(self) -> Mix:
        return _sum_mixes(day.delivered for day in self.days)

    @property
    def received(self) -> int:
        return sum(day.received for day in self.days)

    @property
    def received_tls(self) -> int:
        return sum(day.received_tls for day in self.days)

    @property
    def deferred(self) -> int:
        return sum(day.deferred for day in self.days)

    @property
    def bounced(self) -> int:
        return sum(day.bounced for day in self.days)


def period(now: float, days: int) -> tuple[float, float]:
    """``days`` UTC days ending with today: (the first day's midnight, ``now``)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days: expected 1 to {MAX_DAYS}, got {days}")
    today = datetime.fromtimestamp(now, UTC).date()
    first = today - timedelta(days=days - 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp(), now


def build(
    events: Iterable[Event], *, now: float, days: int, top: int = TOP_DOMAINS
) -> Transparency:
    """The figures of the ``days`` UTC days up to ``now``; events outside are ignored."""
    start, end = period(now, days)
    first = datetime.fromtimestamp(start, UTC).date()
    names = [first + timedelta(days=n) for n in range(days)]
    delivered = {name: Mix() for name in names}
    deferred: Counter[date] = Counter()
    bounced: Counter[date] = Counter()
    received: Counter[date] = Counter()
    received_tls: Counter[date] = Counter()
    by_domain: dict[str, DomainFigures] = {}
    reasons: Counter[str] = Counter()
    excluded = 0
    for event in events:
        if not start <= event.at <= end:
            continue
        day = datetime.fromtimestamp(event.at, UTC).date()
        if isinstance(event, MessageReceived):
            received[day] += 1
            received_tls[day] += event.tls is not None
            continue
        if event.report:
            excluded += len(event.result.results)
            continue
        sent, later, failed = _count(event, reasons)
        protection = protection_of(event.result)
        delivered[day] = delivered[day].plus(protection, sent)
        deferred[day] += later
        bounced[day] += failed
        name = event.domain.lower()
        seen = by_domain.get(name) or DomainFigures(name, Mix(), 0, 0)
        by_domain[name] = DomainFigures(
            name,
            seen.delivered.plus(protection, sent),
            seen.deferred + later,
            seen.bounced + failed,
        )
    ranked = sorted(
        by_domain.values(),
        key=lambda d: (-d.delivered.total, -(d.deferred + d.bounced), d.domain),
    )
    return Transparency(
        start=start,
        end=end,
        days=tuple(
            DayFigures(n, delivered[n], deferred[n], bounced[n], received[n], received_tls[n])
            for n in names
        ),
        domains=tuple(ranked[:top]),
        domain_count=len(by_domain),
        deferrals=tuple(
            ReasonCount(reason, count)
            for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        ),
        reports_excluded=excluded,
    )


def _count(event: DeliveryAttempt, reasons: Counter[str]) -> tuple[int, int, int]:
    """(sent, deferred, bounced) recipients of one attempt; deferrals tallied by reason."""
    sent = later = failed = 0
    for recipient in event.result.results:
        if recipient.outcome is Outcome.SENT:
            sent += 1
        elif recipient.outcome is Outcome.DEFERRED:
            later += 1
            reply = recipient.reply
            reasons[deferral_reason(recipient.reason, reply.enhanced, reply.code)] += 1
        else:
            failed += 1
    return sent, later, failed


def _sum_mixes(mixes: Iterable[Mix]) -> Mix:
    counts = [0] * len(PROTECTIONS)
    for mix in mixes:
        for index, number in enumerate(mix.counts):
            counts[index] += number
    return Mix(tuple(counts))
