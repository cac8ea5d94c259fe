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
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

__all__ = [
    "DailyTally",
    "FailureDetail",
    "PolicyType",
    "ReportPolicy",
    "ReportedSession",
    "render_report",
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
