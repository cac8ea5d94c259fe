"""Metrics: each event counted under bounded labels, the live gauges read at a scrape."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from mta.events import DeliveryAttempt, MessageReceived
from mta.model import (
    DeliveryResult,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    SessionRecord,
    TlsInfo,
    TlsLevel,
)
from mta.policy.dnssec import DnssecStatus
from mta.reply import SmtpReply
from mta.report.metrics import Metrics, attempt_result

T0 = 1_790_000_000.0
OK = SmtpReply(250, "2.0.0", "OK")
LATER = SmtpReply(451, "4.7.5", "TLS policy not satisfied")
NO_USER = SmtpReply(550, "5.1.1", "No such user")
TLS13 = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True)
DANE = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t


def _received(tls: str | None = "TLSv1.3", ack: float = 0.004) -> MessageReceived:
    return MessageReceived(T0, QueueId("q1"), "127.0.0.1:25", tls, False, 100, 1, ack)


def _attempt(
    *outcomes: Outcome,
    domain: str = "example.net",
    policy: HostPolicy | None = DANE,
    tls: TlsInfo | None = TLS13,
    sessions: tuple[SessionRecord, ...] = (),
    at: float = T0 + 2.0,
) -> DeliveryAttempt:
    replies = {Outcome.SENT: OK, Outcome.DEFERRED: LATER, Outcome.BOUNCED: NO_USER}
    results = tuple(
        RecipientResult(f"u{i}@{domain}", outcome, replies[outcome])
        for i, outcome in enumerate(outcomes)
    )
    result = DeliveryResult(domain, results, f"mx.{domain}", tls, "127.0.0.9", policy, sessions)
    return DeliveryAttempt(at, QueueId("q1"), T0, result)


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def _attempts(metrics: Metrics, **labels: str) -> float | None:
    return _value(metrics, "mta_delivery_attempts_total", **labels)


def test_received_is_counted_by_listener_and_tls_with_its_ack_latency() -> None:
    metrics = Metrics(Clock())
    metrics(_received("TLSv1.3", ack=0.004))
    metrics(_received(None, ack=0.02))
    metrics(_received("TLSv1.2"))
    metrics(_received("TLSv1"))  # older than the floor: not a label of its own
    for tls in ("TLSv1.3", "none", "TLSv1.2", "other"):
        assert (
            _value(metrics, "mta_messages_received_total", listener="127.0.0.1:25", tls=tls) == 1.0
        )
    assert _value(metrics, "mta_ack_latency_seconds_count") == 4.0
    assert _value(metrics, "mta_ack_latency_seconds_bucket", le="0.005") == 3.0
    assert _value(metrics, "mta_ack_latency_seconds_bucket", le="0.025") == 4.0


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ((Outcome.SENT, Outcome.SENT), "sent"),
        ((Outcome.SENT, Outcome.BOUNCED), "bounced"),
        ((Outcome.BOUNCED,), "bounced"),
        ((Outcome.SENT, Outcome.DEFERRED), "deferred"),
        ((Outcome.BOUNCED, Outcome.DEFERRED), "deferred"),
        ((), "deferred"),
    ],
)
def test_an_attempts_result_is_sent_bounced_or_deferred(
    outcomes: tuple[Outcome, ...], expected: str
) -> None:
    assert attempt_result(_attempt(*outcomes).result) == expected


@pytest.mark.parametrize(
    ("source", "label"),
    [
        (PolicySource.LOCAL, "local"),
        (PolicySource.DANE, "dane"),
        (PolicySource.MTA_STS, "mta-sts"),
        (PolicySource.MTA_STS_TESTING, "mta-sts"),
        (PolicySource.DEFAULT, "default"),
    ],
)
def test_the_policy_label_is_the_source(source: PolicySource, label: str) -> None:
    metrics = Metrics(Clock())
    metrics(_attempt(Outcome.SENT, policy=HostPolicy(source, TlsLevel.ENCRYPT, "none")))
    assert (
        _attempts(metrics, result="sent", policy=label, tls="TLSv1.3", authenticated="false") == 1.0
    )


def test_an_attempt_counts_result_policy_tls_and_authentication() -> None:
    metrics = Metrics(Clock())
    metrics(_attempt(Outcome.SENT, Outcome.SENT))
    metrics(_attempt(Outcome.DEFERRED, policy=None, tls=None))  # no host was tried
    assert (
        _attempts(metrics, result="sent", policy="dane", tls="TLSv1.3", authenticated="true") == 1.0
    )
    assert (
        _attempts(metrics, result="deferred", policy="default", tls="none", authenticated="false")
        == 1.0
    )


def test_delivery_latency_only_for_attempts_that_sent() -> None:
    metrics = Metrics(Clock())
    metrics(_attempt(Outcome.SENT, at=T0 + 2.0))
    metrics(_attempt(Outcome.DEFERRED, at=T0 + 1.0))
    metrics(_attempt(Outcome.SENT, Outcome.DEFERRED, at=T0 + 400.0))
    assert _value(metrics, "mta_delivery_latency_seconds_count") == 2.0
    assert _value(metrics, "mta_delivery_latency_seconds_sum") == 402.0


def test_tls_failures_by_session_result_type_unknown_ones_as_other() -> None:
    sessions = tuple(
        SessionRecord(f"mx{i}.example.net", "127.0.0.9", LATER, result_type)
        for i, result_type in enumerate(
            ["starttls-not-supported", "no-forward-secrecy", "made-up.example.net", None]
        )
    )
    metrics = Metrics(Clock())
    metrics(_attempt(Outcome.DEFERRED, sessions=sessions))
    for result_type in ("starttls-not-supported", "no-forward-secrecy", "other"):
        assert _value(metrics, "mta_tls_failures_total", result_type=result_type) == 1.0
    assert _value(metrics, "mta_tls_failures_total", result_type="made-up.example.net") is None


def test_observers_keep_labels_in_their_sets() -> None:
    metrics = Metrics(Clock())
    metrics.dns_lookup("TLSA", "ok")
    metrics.dns_lookup("SOA", "weird")
    metrics.sts_fetch("ok")
    metrics.sts_fetch("something-else")
    assert _value(metrics, "mta_dns_lookups_total", type="TLSA", result="ok") == 1.0
    assert _value(metrics, "mta_dns_lookups_total", type="other", result="other") == 1.0
    assert _value(metrics, "mta_sts_policy_fetches_total", result="ok") == 1.0
    assert _value(metrics, "mta_sts_policy_fetches_total", result="fetch-error") is None


@dataclass
class Queue:
    queued: int = 0
    oldest_received_at: float | None = None


def test_live_gauges_are_read_at_each_scrape() -> None:
    clock, queue = Clock(), Queue()
    probe = [DnssecStatus()]  # not probed yet: nothing to say
    metrics = Metrics(clock)
    metrics.watch(queue, lambda: probe[0])
    assert _value(metrics, "mta_queue_messages") == 0.0
    assert _value(metrics, "mta_queue_oldest_seconds") == 0.0
    assert _value(metrics, "mta_dnssec_probe_ok") is None
    queue.queued, queue.oldest_received_at = 3, T0 - 90.0
    probe[0] = DnssecStatus(ok=False, last_checked=T0)
    assert _value(metrics, "mta_queue_messages") == 3.0
    assert _value(metrics, "mta_queue_oldest_seconds") == 90.0
    assert _value(metrics, "mta_dnssec_probe_ok") == 0.0
    probe[0] = DnssecStatus(ok=True, last_checked=T0 + 5)
    assert _value(metrics, "mta_dnssec_probe_ok") == 1.0


def test_dnssec_gauge_absent_when_dane_is_off() -> None:
    metrics = Metrics(Clock())
    metrics.watch(Queue(), lambda: None)
    assert _value(metrics, "mta_dnssec_probe_ok") is None


def test_shared_state_gauge_only_with_redis() -> None:
    metrics = Metrics(Clock())
    assert _value(metrics, "mta_shared_state_up") is None  # no [shared] redis_url
    metrics.shared_state(True)
    assert _value(metrics, "mta_shared_state_up") == 1.0
    metrics.shared_state(False)
    assert _value(metrics, "mta_shared_state_up") == 0.0


def test_own_registry_never_the_global_one() -> None:
    first, second = Metrics(Clock()), Metrics(Clock())  # no clash: separate registries
    first(_received())
    assert (
        second.registry.get_sample_value(
            "mta_messages_received_total", {"listener": "127.0.0.1:25", "tls": "TLSv1.3"}
        )
        is None
    )
    assert REGISTRY.get_sample_value("mta_messages_received_total") is None


def _series(metrics: Metrics) -> int:
    return sum(len(family.samples) for family in metrics.registry.collect())


def test_series_do_not_grow_with_the_number_of_domains() -> None:
    """Cardinality: 500 destination domains give as many series as 5 do."""
    failing = (SessionRecord("mx.example.net", "127.0.0.9", LATER, "certificate-expired"),)

    def traffic(metrics: Metrics, domains: int) -> None:
        for n in range(domains):
            domain = f"d{n}.example"
            metrics(_received())
            metrics(_attempt(Outcome.SENT, domain=domain))
            metrics(_attempt(Outcome.DEFERRED, domain=domain, sessions=failing))
            metrics.dns_lookup("MX", "ok")
            metrics.sts_fetch("fetch-error")

    few, many = Metrics(Clock()), Metrics(Clock())
    few.watch(Queue(5, T0), lambda: None)
    many.watch(Queue(500, T0), lambda: None)
    traffic(few, 5)
    traffic(many, 500)
    assert _series(many) == _series(few)
    assert _value(many, "mta_messages_received_total", listener="127.0.0.1:25", tls="TLSv1.3") == (
        500.0
    )
    names = {
        value
        for family in many.registry.collect()
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert not any("example" in value for value in names)
