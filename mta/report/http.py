"""The metrics listener: ``GET /metrics`` for Prometheus, ``GET /report`` for people.

An aiohttp server on ``[metrics] listen`` (loopback by default). ``/metrics`` is the
registry of ``mta.report.metrics.Metrics`` in the Prometheus text format; ``/report``
is the transparency report's HTML page for the last ``days`` days, from the provider
the relay passes in (404 while there is none). Nothing else is served, and every
request is a read: no state of the relay changes through this port.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mta.config import MetricsConfig
from mta.errors import ConfigError

__all__ = ["MAX_REPORT_DAYS", "MetricsServer", "ReportProvider", "parse_days", "start_http"]

log = logging.getLogger(__name__)

ReportProvider = Callable[[int], Awaitable[str]]
"""``days -> HTML``: the transparency report of the last ``days`` UTC days."""
DEFAULT_REPORT_DAYS: Final = 7
MAX_REPORT_DAYS: Final = 90
_SHUTDOWN_TIMEOUT: Final = 2.0  # seconds for requests in flight at close


def parse_days(text: str | None) -> int:
    """``?days=N``: 1 to ``MAX_REPORT_DAYS`` (default ``DEFAULT_REPORT_DAYS``);
    ``ValueError`` otherwise."""
    if text is None:
        return DEFAULT_REPORT_DAYS
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPORT_DAYS:
        raise ValueError(f"days: expected 1 to {MAX_REPORT_DAYS}, got {text[:10]!r}")
    return int(text)


@dataclass
class MetricsServer:
    """The running listener; ``close`` stops it."""

    runner: web.AppRunner
    address: str  # host:port as bound

    async def close(self) -> None:
        await self.runner.cleanup()


def make_app(registry: CollectorRegistry, report: ReportProvider | None) -> web.Application:
    """The two routes (split from ``start_http`` so the handlers can be tested alone)."""

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def transparency(request: web.Request) -> web.Response:
        if report is None:
            raise web.HTTPNotFound(text="the transparency report is not available\n")
        try:
            days = parse_days(request.query.get("days"))
        except ValueError as err:
            raise web.HTTPBadRequest(text=f"{err}\n") from None
        page = await report(days)
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/report", transparency)
    return app


async def start_http(
    config: MetricsConfig,
    registry: CollectorRegistry,
    report: ReportProvider | None,
    *,
    source: str,
) -> MetricsServer:
    """Listen on ``config``'s address; a bind failure is a ``ConfigError`` naming
    ``metrics.listen`` in ``source`` (the policy file)."""
    runner = web.AppRunner(
        make_app(registry, report), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    shown = (
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    )
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(
            source, "metrics.listen", f"cannot listen on {shown}: {err.strerror or err}"
        ) from None
    log.info("metrics.listening", extra={"listen": shown})
    return MetricsServer(runner, shown)
