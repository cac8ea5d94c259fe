"""``/metrics`` of a relay group: the workers' expositions merged."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mta.report.group_metrics import merge


def exposition(
    received: int, ack: list[float], queued: int, oldest: float, ok: int, shared: int = 1
) -> str:
    registry = CollectorRegistry()
    counter = Counter("mta_messages_received", "r", ["listener"], registry=registry)
    counter.labels("relay").inc(received)
    histogram = Histogram("mta_ack_latency_seconds", "a", registry=registry, buckets=(0.1, 1))
    for value in ack:
        histogram.observe(value)
    Gauge("mta_queue_messages", "q", registry=registry).set(queued)
    Gauge("mta_queue_oldest_seconds", "o", registry=registry).set(oldest)
    Gauge("mta_dnssec_probe_ok", "d", registry=registry).set(ok)
    Gauge("mta_shared_state_up", "s", registry=registry).set(shared)
    return generate_latest(registry).decode()


def samples(texts: list[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in merge(texts)
        for s in family.samples
    }


def test_counters_histograms_and_the_queue_add_up_the_rest_by_their_meaning() -> None:
    got = samples([exposition(3, [0.05, 0.5], 2, 10.0, 1, 0), exposition(4, [0.05], 5, 30.0, 0, 1)])
    assert got["mta_messages_received_total", (("listener", "relay"),)] == 7
    assert got["mta_ack_latency_seconds_bucket", (("le", "0.1"),)] == 2
    assert got["mta_ack_latency_seconds_bucket", (("le", "+Inf"),)] == 3
    assert got["mta_ack_latency_seconds_count", ()] == 3
    assert got["mta_queue_messages", ()] == 7
    assert got["mta_queue_oldest_seconds", ()] == 30.0
    assert got["mta_dnssec_probe_ok", ()] == 0
    assert got["mta_shared_state_up", ()] == 0


def test_the_merge_is_a_valid_exposition() -> None:
    registry = CollectorRegistry()

    class Merged:
        def collect(self):  # type: ignore[no-untyped-def]
            return merge([exposition(1, [0.2], 0, 0.0, 1)] * 2)

    registry.register(Merged())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'mta_messages_received_total{listener="relay"} 2.0' in text
