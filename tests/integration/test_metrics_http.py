"""The metrics listener over real loopback HTTP: /metrics, /report, bind failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mta.config import MetricsConfig
from mta.errors import ConfigError
from mta.events import MessageReceived
from mta.model import QueueId
from mta.report.http import ReportProvider, start_http
from mta.report.metrics import Metrics
from tests.integration.relayproc import free_port


class Clock:
    def now(self) -> float:
        return 1_790_000_000.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def test_metrics_are_served_in_the_prometheus_text_format() -> None:
    async def main() -> None:
        metrics = Metrics(Clock())
        metrics(MessageReceived(1.0, QueueId("q"), "127.0.0.1:25", "TLSv1.3", False, 1, 1, 0.01))
        port = free_port()
        server = await start_http(
            MetricsConfig("127.0.0.1", port), metrics.registry, None, source="t.toml"
        )
        try:
            status, kind, body = await _get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            assert kind.startswith("text/plain; version=")
            families = {f.name: f for f in text_string_to_metric_families(body)}
            [sample] = [
                s for s in families["mta_messages_received"].samples if s.name.endswith("_total")
            ]
            assert (sample.labels, sample.value) == (
                {"listener": "127.0.0.1:25", "tls": "TLSv1.3"},
                1.0,
            )
            status, _kind, _body = await _get(f"http://127.0.0.1:{port}/report")
            assert status == 404  # no provider yet
            status, _kind, _body = await _get(f"http://127.0.0.1:{port}/other")
            assert status == 404
        finally:
            await server.close()
        with pytest.raises(aiohttp.ClientConnectionError):  # closed: nothing listens
            await _get(f"http://127.0.0.1:{port}/metrics")

    run(main)


def test_report_is_the_providers_page_for_bounded_days() -> None:
    asked: list[int] = []

    async def provider(days: int) -> str:
        asked.append(days)
        return f"<html><body>{days} days</body></html>"

    async def main() -> None:
        report: ReportProvider = provider
        port = free_port()
        server = await start_http(
            MetricsConfig("127.0.0.1", port), Metrics(Clock()).registry, report, source="t.toml"
        )
        base = f"http://127.0.0.1:{port}/report"
        try:
            status, kind, body = await _get(f"{base}?days=30")
            assert (status, body) == (200, "<html><body>30 days</body></html>")
            assert kind == "text/html; charset=utf-8"
            assert (await _get(base))[0] == 200  # the default
            for bad in ("0", "91", "-1", "x", "1e3"):
                assert (await _get(f"{base}?days={bad}"))[0] == 400
        finally:
            await server.close()
        assert asked == [30, 7]

    run(main)


def test_a_taken_port_is_a_config_error_naming_metrics_listen() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError) as caught:
                await start_http(
                    MetricsConfig("127.0.0.1", port),
                    Metrics(Clock()).registry,
                    None,
                    source="relay.toml",
                )
        assert caught.value.key == "metrics.listen"
        assert str(caught.value).startswith("relay.toml: metrics.listen: cannot listen on ")

    run(main)


def test_ipv6_loopback() -> None:
    async def main() -> None:
        port = free_port()
        server = await start_http(
            MetricsConfig("::1", port), Metrics(Clock()).registry, None, source="t.toml"
        )
        try:
            assert server.address == f"[::1]:{port}"
            assert (await _get(f"http://[::1]:{port}/metrics"))[0] == 200
        finally:
            await server.close()

    run(main)
