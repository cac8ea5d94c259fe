"""``/metrics`` of a relay group: the workers' expositions merged into one.

Each worker keeps its own registry and answers the control command ``metrics`` with
its exposition (one JSON string on the line). The supervisor's collector asks each at
scrape time and merges samples of the same name and labels: counters and histograms
(their buckets, counts and sums) add up, as does the queue gauge; the age of the
oldest message is the largest, the DNSSEC probe is fine only if it is in every
worker (the smallest), and ``_created`` is the earliest. A worker that does not answer
is left out of that scrape; ``mta_group_workers_up`` says how many did.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

ASK_TIMEOUT: Final = 5.0
MAX_ANSWER: Final = 16 * 1024 * 1024

Merge = Callable[[float, float], float]
GAUGES: Final[dict[str, Merge]] = {
    "mta_queue_oldest_seconds": max,
    "mta_dnssec_probe_ok": min,
    "mta_shared_state_up": min,  # 0 when any worker has lost Redis
}


def _add(a: float, b: float) -> float:
    return a + b


def merge(expositions: Iterable[str]) -> list[Metric]:
    """The families of every exposition, samples of one name and labels merged."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            kept = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                key = (kept.name, sample.name, tuple(sorted(sample.labels.items())))
                how = _how(kept, sample.name)
                values[key] = how(values[key], sample.value) if key in values else sample.value
    for (name, sample_name, labels), value in values.items():
        families[name].add_sample(sample_name, dict(labels), value)
    return list(families.values())


def _how(family: Metric, sample: str) -> Merge:
    if sample.endswith("_created"):
        return min
    if family.type == "gauge":
        return GAUGES.get(family.name, _add)
    return _add


def ask_metrics(path: Path) -> str | None:
    """A worker's exposition, or None. Blocking: a scrape runs on the supervisor's
    loop, which does no mail work, and the workers answer on theirs."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(ASK_TIMEOUT)
            sock.connect(str(path))
            sock.sendall(b"metrics\n")
            answer = b""
            while not answer.endswith(b"\n") and len(answer) < MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError:
        return None
    line = answer.decode("utf-8", "replace").strip()
    if not line.startswith("ok "):
        return None
    text = json.loads(line[3:])
    return text if isinstance(text, str) else None


class GroupCollector:
    """A prometheus_client collector over the workers' control sockets."""

    def __init__(self, sockets: Sequence[Path]) -> None:
        self.sockets = list(sockets)

    def collect(self) -> Iterator[Metric]:
        texts = [ask_metrics(path) for path in self.sockets]
        answered = [text for text in texts if text is not None]
        yield from merge(answered)
        yield GaugeMetricFamily(
            "mta_group_workers_up",
            "Worker processes of the relay group that answered this scrape.",
            value=len(answered),
        )
