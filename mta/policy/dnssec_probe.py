"""The DNSSEC probe at the edge: ask the resolver at start and periodically, keep the status.

The question and the state machine are ``mta.policy.dnssec`` (pure); this module only
asks (through ``DnsClient.probe_dnssec``), applies the answer, says in one log line
when validation stops or comes back, and sleeps. The first caller of ``current`` before
any probe has run waits for that probe, so no delivery decides on an unknown state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Protocol

from mta.clock import Clock
from mta.policy.dnssec import (
    DnssecStatus,
    ProbeAnswer,
    ProbeSpec,
    after_probe,
    news,
)

log = logging.getLogger(__name__)

PROBE_INTERVAL: Final = 3600.0  # seconds between probes while validation works
RETRY_INTERVAL: Final = 60.0  # seconds between probes while it does not (notice recovery)


class DnssecAsker(Protocol):
    """The one query the probe needs (``mta.policy.dns.DnsClient``; fakes in tests)."""

    async def probe_dnssec(self, spec: ProbeSpec) -> ProbeAnswer: ...


class DnssecProbe:
    """The resolver's DNSSEC status, kept fresh by ``run``.

    Parameters:
        dns: asks the probe question.
        spec: the question (``dns.dnssec_probe``); ``None`` means never probe (the status
            stays ``not-probed``, ``ok``).
        resolver: the nameservers asked, for the log line and reports.
        clock: wall-clock time of each probe (``last_checked``).
    """

    def __init__(
        self, dns: DnssecAsker, spec: ProbeSpec | None, resolver: str, clock: Clock
    ) -> None:
        self._dns = dns
        self._spec = spec
        self._clock = clock
        self._status = DnssecStatus(resolver=resolver, probe=str(spec) if spec else "")
        self._lock = asyncio.Lock()

    @property
    def status(self) -> DnssecStatus:
        """The status now, without waiting (``not-probed`` before the first probe)."""
        return self._status

    async def current(self) -> DnssecStatus:
        """The status, after the first probe when one is configured and none has run."""
        if self._spec is not None and self._status.last_checked is None:
            async with self._lock:
                if self._status.last_checked is None:
                    await self._probe(self._spec)
        return self._status

    async def check(self) -> DnssecStatus:
        """Probe now (one probe at a time) and return the new status."""
        if self._spec is None:
            return self._status
        async with self._lock:
            await self._probe(self._spec)
        return self._status

    async def run(self) -> None:
        """Probe now, then every ``PROBE_INTERVAL`` (``RETRY_INTERVAL`` while failing)."""
        if self._spec is None:
            return
        while True:
            status = await self.check()
            await asyncio.sleep(PROBE_INTERVAL if status.ok else RETRY_INTERVAL)

    async def _probe(self, spec: ProbeSpec) -> None:
        answer = await self._dns.probe_dnssec(spec)
        before = self._status
        self._status = after_probe(before, answer, self._clock.now())
        facts = {
            "resolver": self._status.resolver,
            "probe": str(spec),
            "detail": answer.detail,
            "failures": self._status.failures,
        }
        told = news(before, self._status)
        if told == "failed":
            log.warning("dns.dnssec_probe.failed", extra=facts)
        elif told == "ok":
            log.info("dns.dnssec_probe.ok", extra=facts)
