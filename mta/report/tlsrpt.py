"""TLS-RPT aggregate reports (RFC 8460 §4): count sessions per policy per day, render JSON.

Pure: no I/O, no clock, no randomness. Each TLS session the relay tried (one per
connection attempt to an MX host) becomes one ``ReportedSession``; ``DailyTally`` adds
them up per policy domain and policy, and ``render_report`` turns one domain's day
into the JSON object of §4.4. The caller passes the report id, the organisation and the
contact; time is the UTC day the sessions fell on.

What a report counts (§4.3): a successful session is one where the policy's
requirements were met; a failed one carries its RFC 8460 result type, the sending
MTA's IP, the receiving MX host name and IP. Failure details with the same facts are
summed into one entry (``failed-session-count``).

``reported_sessions`` says which hosts of a ``DeliveryAttempt`` are sessions (§4.3):

- a connection where TLS was negotiated counts, as a success when the requirement was
  met (whatever SMTP said afterwards), else as a failure with its result type;
- a failure with a result type but no TLS counts too (``starttls-not-supported``,
  a handshake that failed) and so does a host the policy refused before connecting
  (an MX outside the MTA-STS policy, a failed TLSA lookup): no connection, but a TLS
  policy failure;
- MTA-STS ``testing`` (report-only): a failed check is reported as the failure it
  was, although the mail went (§4.3: a report-only failure is a failure);
- not counted: a connection that failed before any TLS (refused, timed out, a 4xx
  greeting: a TCP or SMTP failure, not a TLS result), and a plaintext delivery at
  level ``may``: the policy asked for no TLS, and the relay does not keep whether
  STARTTLS was missing or failed first, so a report would have to guess the type;
- never counted: our own report mail (``DeliveryAttempt.report``: no report loops).

The policy domain is the recipient domain; ``policy-type`` comes from
``HostPolicy.rpt_policy_type``, the policy strings and MX patterns from the host's
policy. A TLSA policy has no MX patterns, so its ``mx-host`` names the MX host that
published the records (each MX host has its own TLSA RRset).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

from mta.events import DeliveryAttempt
from mta.model import HostPolicy, SessionRecord

__all__ = [
    "DailyTally",
    "FailureDetail",
    "PolicyType",
    "ReportPolicy",
    "ReportedSession",
    "render_report",
    "reported_sessions",
    "utc_day",
]

MAX_FAILURE_DETAILS: Final = 1000  # per policy; the rest are summed into the summary only


class PolicyType(enum.Enum):
    """``policy-type`` (§4.4): which mechanism the session was held to."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy a session was evaluated against (the ``policy`` object of §4.4).

    ``policy_string`` is the MTA-STS policy's lines, or the TLSA records in
    presentation form; ``mx_hosts`` the MTA-STS ``mx`` patterns (empty otherwise).
    """

    policy_type: PolicyType
    domain: str
    policy_string: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailureDetail:
    """One kind of failure (a ``failure-details`` entry of §4.4, less the count)."""

    result_type: str
    sending_mta_ip: str = ""
    receiving_mx_hostname: str = ""
    receiving_ip: str = ""
    additional_information: str = ""


@dataclass(frozen=True, slots=True)
class ReportedSession:
    """One TLS session attempt, as a report sees it; ``failure`` is None on success."""

    day: date
    policy: ReportPolicy
    failure: FailureDetail | None = None


@dataclass(slots=True)
class _PolicyCounts:
    successes: int = 0
    failures: Counter[FailureDetail] = field(default_factory=Counter)


@dataclass(slots=True)
class DailyTally:
    """Session counts by (UTC day, policy domain, policy): the state a report is made of."""

    _counts: dict[tuple[date, str], dict[ReportPolicy, _PolicyCounts]] = field(default_factory=dict)

    def add(self, session: ReportedSession) -> None:
        policies = self._counts.setdefault((session.day, session.policy.domain), {})
        counts = policies.setdefault(session.policy, _PolicyCounts())
        if session.failure is None:
            counts.successes += 1
        else:
            counts.failures[session.failure] += 1

    def add_all(self, sessions: Iterable[ReportedSession]) -> None:
        for session in sessions:
            self.add(session)

    def add_counts(
        self, day: date, policy: ReportPolicy, successes: int, failures: Mapping[FailureDetail, int]
    ) -> None:
        """Add counts made elsewhere (another relay's, ``mta.shared.tlsrpt``)."""
        counts = self._counts.setdefault((day, policy.domain), {}).setdefault(
            policy, _PolicyCounts()
        )
        counts.successes += successes
        counts.failures.update(failures)

    def merge(self, other: DailyTally) -> None:
        """Add every count of ``other`` to ours: the fleet's day is the sum of its relays'."""
        for (day, _domain), policies in other._counts.items():
            for policy, counts in policies.items():
                self.add_counts(day, policy, counts.successes, counts.failures)

    def domains(self, day: date) -> list[str]:
        """The policy domains with at least one session on ``day``, sorted."""
        return sorted(domain for (when, domain) in self._counts if when == day)

    def days(self) -> list[date]:
        return sorted({when for (when, _) in self._counts})

    def policies(self, day: date, domain: str) -> Mapping[ReportPolicy, _PolicyCounts]:
        return self._counts.get((day, domain), {})

    def drop(self, day: date) -> None:
        """Forget a day (its reports were sent, or it is too old to report)."""
        for key in [key for key in self._counts if key[0] == day]:
            del self._counts[key]


def day_range(day: date) -> tuple[datetime, datetime]:
    """The UTC day as §4.4's ``date-range``: midnight to the last second of the day."""
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1, seconds=-1)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def render_report(
    tally: DailyTally,
    day: date,
    domain: str,
    *,
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The §4.4 JSON object for one policy domain's ``day`` (``json.dumps`` it)."""
    start, end = day_range(day)
    policies = tally.policies(day, domain)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _timestamp(start), "end-datetime": _timestamp(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [
            _policy_json(policy, counts)
            for policy, counts in sorted(policies.items(), key=lambda item: _sort_key(item[0]))
        ],
    }


def _sort_key(policy: ReportPolicy) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    return policy.policy_type.value, policy.policy_string, policy.mx_hosts


def _policy_json(policy: ReportPolicy, counts: _PolicyCounts) -> dict[str, Any]:
    described: dict[str, Any] = {
        "policy-type": policy.policy_type.value,
        "policy-domain": policy.domain,
    }
    if policy.policy_string:
        described["policy-string"] = list(policy.policy_string)
    if policy.mx_hosts:
        described["mx-host"] = list(policy.mx_hosts)
    ordered = sorted(counts.failures.items(), key=lambda item: (-item[1], _detail_key(item[0])))
    return {
        "policy": described,
        "summary": {
            "total-successful-session-count": counts.successes,
            "total-failure-session-count": sum(counts.failures.values()),
        },
        "failure-details": [
            _detail_json(detail, count) for detail, count in ordered[:MAX_FAILURE_DETAILS]
        ],
    }


def _detail_key(detail: FailureDetail) -> tuple[str, str, str, str]:
    return (
        detail.result_type,
        detail.receiving_mx_hostname,
        detail.receiving_ip,
        detail.sending_mta_ip,
    )


def _detail_json(detail: FailureDetail, count: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"result-type": detail.result_type}
    optional = (
        ("sending-mta-ip", detail.sending_mta_ip),
        ("receiving-mx-hostname", detail.receiving_mx_hostname),
        ("receiving-ip", detail.receiving_ip),
        ("additional-information", detail.additional_information),
    )
    entry.update((name, value) for name, value in optional if value)
    entry["failed-session-count"] = count
    return entry


# --- from events ----------------------------------------------------------------------

# Result types that only a DANE (TLSA) policy produces: a host refused for one of them
# before connecting carries no HostPolicy, but it failed a TLSA policy.
_TLSA_TYPES: Final = frozenset({"dnssec-invalid", "dane-required", "tlsa-invalid"})


def utc_day(at: float) -> date:
    """The UTC day an epoch time falls on (reports are per UTC day, §4.1)."""
    return datetime.fromtimestamp(at, UTC).date()


def reported_sessions(attempt: DeliveryAttempt) -> list[ReportedSession]:
    """The sessions of one attempt as a report counts them (module docstring)."""
    if attempt.report:
        return []
    day = utc_day(attempt.at)
    domain = attempt.result.domain
    found: list[ReportedSession] = []
    for session in attempt.result.sessions:
        reported = _reported(session, day, domain)
        if reported is not None:
            found.append(reported)
    return found


def _reported(session: SessionRecord, day: date, domain: str) -> ReportedSession | None:
    policy = session.policy
    result_type = session.result_type
    if result_type is None and policy is not None and policy.reported_failure is not None:
        result_type = policy.reported_failure  # MTA-STS testing: a failure all the same
    if result_type is None and session.tls is None:
        return None  # no TLS result: a connection failure, or plaintext at may
    described = _report_policy(policy, session, domain, result_type)
    if result_type is None:
        return ReportedSession(day, described)
    failure = FailureDetail(
        result_type,
        sending_mta_ip=session.local_address,
        receiving_mx_hostname=session.mx,
        receiving_ip=session.address,
    )
    return ReportedSession(day, described, failure)


def _report_policy(
    policy: HostPolicy | None, session: SessionRecord, domain: str, result_type: str | None
) -> ReportPolicy:
    if policy is None:  # refused before connecting, by a rule that left no HostPolicy
        kind = PolicyType.TLSA if result_type in _TLSA_TYPES else PolicyType.NO_POLICY_FOUND
        refused_at: tuple[str, ...] = (session.mx,) if kind is PolicyType.TLSA else ()
        return ReportPolicy(kind, domain, (), refused_at)
    kind = PolicyType(policy.rpt_policy_type)
    if kind is PolicyType.NO_POLICY_FOUND:  # nothing published: no string, no patterns
        return ReportPolicy(kind, domain)
    mx_hosts = policy.mx_patterns
    if kind is PolicyType.TLSA and not mx_hosts:
        mx_hosts = (session.mx,)
    return ReportPolicy(kind, domain, policy.policy_strings, mx_hosts)
