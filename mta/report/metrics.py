"""Prometheus metrics: a live view of the events, and of the queue at each scrape.

``Metrics`` is an ``EventSink`` (``events.add(metrics)``) that counts what the relay did
into its own ``CollectorRegistry`` (never the process-wide one: two relays in one
process, or a test, never share counters). What is a state rather than a count — the
queue, the DNSSEC probe — is read when Prometheus scrapes (``watch``), never kept.

Every label value comes from a small fixed set (``_bounded``): never a domain, a host
or an address, so the number of series does not grow with traffic.

``mta_delivery_attempts_total{result}`` is one per attempt (one domain's recipients of
one message): ``sent`` when every recipient was sent, ``bounced`` when some bounced and
none is left deferred, else ``deferred`` (some recipient is still to be tried).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from mta.clock import Clock
from mta.events import DeliveryAttempt, Event, MessageReceived
from mta.model import DeliveryResult, Outcome, PolicySource, TlsInfo
from mta.policy.dnssec import DnssecStatus

__all__ = [
    "DNS_RESULTS",
    "DNS_TYPES",
    "RESULT_TYPES",
    "STS_FETCH_RESULTS",
    "Metrics",
    "attempt_result",
]

TLS_VERSIONS: Final = frozenset({"TLSv1.2", "TLSv1.3"})  # anything else (older): "other"
# RFC 8460 §4.3 result types, and the relay's own (DESIGN.md; mta.deliver.tlsclient).
RESULT_TYPES: Final = frozenset(
    {
        "starttls-not-supported",
        "certificate-host-mismatch",
        "certificate-expired",
        "certificate-not-trusted",
        "validation-failure",
        "tlsa-invalid",
        "dnssec-invalid",
        "dane-required",
        "sts-policy-fetch-error",
        "sts-policy-invalid",
        "sts-webpki-invalid",
        "no-forward-secrecy",
        "weak-key",
        "protocol-too-old",
    }
)
DNS_TYPES: Final = frozenset({"MX", "A", "AAAA", "TLSA", "TXT"})
DNS_RESULTS: Final = frozenset({"ok", "nxdomain", "nodata", "servfail", "timeout", "other"})
STS_FETCH_RESULTS: Final = frozenset({"ok", "fetch-error", "webpki-invalid", "invalid"})
_POLICIES: Final = {
    PolicySource.LOCAL: "local",
    PolicySource.DANE: "dane",
    PolicySource.MTA_STS: "mta-sts",
    PolicySource.MTA_STS_TESTING: "mta-sts",
    PolicySource.DEFAULT: "default",
}
# Seconds: an acknowledgement is a fsync (milliseconds); a delivery may wait for retries.
_ACK_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_DELIVERY_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
    5 * 86400.0,
)


class QueueView(Protocol):
    """What the scrape reads from the scheduler (``mta.schedule.scheduler.Scheduler``)."""

    @property
    def queued(self) -> int: ...

    @property
    def oldest_received_at(self) -> float | None: ...


def _bounded(value: str | None, allowed: Iterable[str], default: str = "other") -> str:
    return value if value is not None and value in allowed else default


def _tls_label(tls: TlsInfo | str | None) -> str:
    version = tls.version if isinstance(tls, TlsInfo) else tls
    return "none" if version is None else _bounded(version, TLS_VERSIONS)


def attempt_result(result: DeliveryResult) -> str:
    """``sent``, ``bounced`` or ``deferred`` for one attempt (see the module docstring)."""
    outcomes = {r.outcome for r in result.results}
    if Outcome.DEFERRED in outcomes or not outcomes:
        return "deferred"
    return "bounced" if Outcome.BOUNCED in outcomes else "sent"


class Metrics:
    """The relay's metrics, in ``registry``; call it with each event.

    Parameters:
        clock: wall-clock time, for the age of the oldest queued message at a scrape.
    """

    def __init__(self, clock: Clock) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        self._received = Counter(
            "mta_messages_received",
            "Messages accepted (250 sent), by listener and the client's TLS version.",
            ["listener", "tls"],
            registry=self.registry,
        )
        self._attempts = Counter(
            "mta_delivery_attempts",
            "Delivery attempts (one domain's recipients of one message), by result, the "
            "policy source, the TLS version and whether the peer was authenticated.",
            ["result", "policy", "tls", "authenticated"],
            registry=self.registry,
        )
        self._tls_failures = Counter(
            "mta_tls_failures",
            "Sessions that did not meet their TLS requirement, by RFC 8460 result type.",
            ["result_type"],
            registry=self.registry,
        )
        self._ack = Histogram(
            "mta_ack_latency_seconds",
            "From the end of DATA to the 250 (the record made durable).",
            buckets=_ACK_BUCKETS,
            registry=self.registry,
        )
        self._delivery = Histogram(
            "mta_delivery_latency_seconds",
            "From acceptance to the attempt that sent (attempts with a recipient sent).",
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )
        self._shared_up: Gauge | None = None
        self._sts_fetches = Counter(
            "mta_sts_policy_fetches",
            "MTA-STS policy fetches over HTTPS, by result.",
            ["result"],
            registry=self.registry,
        )
        self._dns = Counter(
            "mta_dns_lookups",
            "DNS queries sent to the resolver (cache hits not counted), by type and result.",
            ["type", "result"],
            registry=self.registry,
        )
        self._live: _LiveCollector | None = None

    def __call__(self, event: Event) -> None:
        """The ``EventSink``: count one event."""
        if isinstance(event, MessageReceived):
            self._received.labels(_listener_label(event.listener), _tls_label(event.tls)).inc()
            self._ack.observe(max(0.0, event.ack_seconds))
            return
        self._attempt(event)

    def _attempt(self, event: DeliveryAttempt) -> None:
        result = event.result
        policy = result.policy
        self._attempts.labels(
            attempt_result(result),
            "default" if policy is None else _POLICIES.get(policy.source, "default"),
            _tls_label(result.tls),
            "true" if policy is not None and policy.verified else "false",
        ).inc()
        for session in result.sessions:
            if session.result_type is not None:
                self._tls_failures.labels(_bounded(session.result_type, RESULT_TYPES)).inc()
        if any(r.outcome is Outcome.SENT for r in result.results):
            self._delivery.observe(max(0.0, event.at - event.received_at))

    def shared_state(self, up: bool) -> None:
        """The shared store's observer (``SharedStore(on_state=...)``): the gauge
        exists only on a relay with ``[shared] redis_url``."""
        if self._shared_up is None:
            self._shared_up = Gauge(
                "mta_shared_state_up",
                "Whether Redis (the fleet's shared state) answered the last call: 1 or 0.",
                registry=self.registry,
            )
        self._shared_up.set(int(up))

    def sts_fetch(self, result: str) -> None:
        """The MTA-STS fetcher's observer (``StsResolver(observe=...)``)."""
        self._sts_fetches.labels(_bounded(result, STS_FETCH_RESULTS)).inc()

    def dns_lookup(self, rdtype: str, result: str) -> None:
        """The DNS client's observer (``DnsClient(observe=...)``)."""
        self._dns.labels(_bounded(rdtype, DNS_TYPES), _bounded(result, DNS_RESULTS)).inc()

    def watch(self, queue: QueueView, dnssec: Callable[[], DnssecStatus | None]) -> None:
        """Read the queue and the DNSSEC probe's status (``None``: no probe, DANE is off)
        at every scrape (once; later calls replace)."""
        if self._live is not None:
            self.registry.unregister(self._live)
        self._live = _LiveCollector(queue, dnssec, self._clock.now)
        self.registry.register(self._live)


def _listener_label(listener: str) -> str:
    """The listener as configured (``address:port``): a handful per relay, so bounded."""
    return listener or "unknown"


class _LiveCollector:
    """``mta_queue_messages``, ``mta_queue_oldest_seconds`` and ``mta_dnssec_probe_ok``,
    read at each scrape."""

    def __init__(
        self,
        queue: QueueView,
        dnssec: Callable[[], DnssecStatus | None],
        now: Callable[[], float],
    ) -> None:
        self._queue = queue
        self._dnssec = dnssec
        self._now = now

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mta_queue_messages", _QUEUE_HELP)
        yield GaugeMetricFamily("mta_queue_oldest_seconds", _OLDEST_HELP)
        yield GaugeMetricFamily("mta_dnssec_probe_ok", _DNSSEC_HELP)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("mta_queue_messages", _QUEUE_HELP, value=self._queue.queued)
        oldest = self._queue.oldest_received_at
        age = 0.0 if oldest is None else max(0.0, self._now() - oldest)
        yield GaugeMetricFamily("mta_queue_oldest_seconds", _OLDEST_HELP, value=age)
        status = self._dnssec()
        if status is not None and status.last_checked is not None:  # absent: nothing known
            yield GaugeMetricFamily("mta_dnssec_probe_ok", _DNSSEC_HELP, value=int(status.ok))


_QUEUE_HELP: Final = "Messages in the queue (recipients left to try), in flight or waiting."
_OLDEST_HELP: Final = "Age of the oldest queued message (0 when the queue is empty)."
_DNSSEC_HELP: Final = (
    "1 when the resolver validated the last DNSSEC probe, 0 when not; absent before the "
    "first probe or when DANE is off."
)
