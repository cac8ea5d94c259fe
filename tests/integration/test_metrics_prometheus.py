"""A real Prometheus (Debian ``prometheus``) scrapes a running relay's ``/metrics``.

One message goes through a relay process to a TLS receiver; then Prometheus, with a
private configuration and storage, scrapes the relay every second, and its query API
must show what happened: the target up, one message received, one attempt sent.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, policy
from tests.report.test_grafana_dashboard import expressions

PROMETHEUS = "/usr/bin/prometheus"
SCRAPE_DEADLINE = 30.0


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.stop()


def _query(api: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        doc = json.load(response)
    assert doc["status"] == "success", doc
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


def _value(api: int, expr: str) -> float | None:
    """The single value of ``expr`` now, ``None`` when Prometheus has none (yet)."""
    try:
        result = _query(api, expr)
    except OSError:  # not listening yet
        return None
    if len(result) != 1:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def _prometheus(tmp_path: Path, target: int, api: int) -> subprocess.Popen[bytes]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: mta\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target}']\n"
    )
    with (tmp_path / "prometheus.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{api}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.timeout(120)
def test_prometheus_scrapes_what_the_relay_did(
    tls_ca: trustme.CA, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    target, api = free_port(), free_port()
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca) as rx:
        metrics = f'[metrics]\nlisten = "127.0.0.1:{target}"\n'
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}", extra=metrics))
        processes.append(relay)
        relay.start()
        with relay.smtp() as smtp:
            smtp.sendmail("alice@sender.test", ["bob@dest.test"], b"Subject: hi\r\n\r\nhello\r\n")
        rx.wait_for(1, timeout=20)

        prometheus = _prometheus(tmp_path, target, api)
        try:
            deadline = time.monotonic() + SCRAPE_DEADLINE
            while _value(api, "sum(mta_delivery_attempts_total)") != 1.0:
                assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"no scrape with the attempt in {SCRAPE_DEADLINE}s:\n"
                        + (tmp_path / "prometheus.log").read_text()[-2000:]
                    )
                time.sleep(0.25)
            assert _value(api, 'up{job="mta"}') == 1.0
            [received] = _query(api, "mta_messages_received_total")
            assert received["metric"] == {
                "__name__": "mta_messages_received_total",
                "instance": f"127.0.0.1:{target}",
                "job": "mta",
                "listener": f"127.0.0.1:{relay.port}",
                "tls": "TLSv1.3",
            }
            assert _value(api, "mta_messages_received_total") == 1.0
            [sent] = _query(api, 'mta_delivery_attempts_total{result="sent"}')
            assert sent["value"][1] == "1"  # type: ignore[index]
            assert {k: v for k, v in sent["metric"].items() if k in ("policy", "tls")} == {  # type: ignore[union-attr]
                "policy": "default",
                "tls": "TLSv1.3",
            }
            assert _value(api, "mta_queue_messages") == 0.0
            assert _value(api, "mta_ack_latency_seconds_count") == 1.0
            assert _value(api, "mta_delivery_latency_seconds_count") == 1.0
            for expr in expressions():  # the dashboard's queries are valid PromQL here
                _query(api, expr.replace("$__rate_interval", "1m"))
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=20)
