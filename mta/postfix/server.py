"""``mta policy-server``: our destination policy for Postfix's ``smtp_tls_policy_maps``,
served over the socketmap protocol (``socketmap:inet:127.0.0.1:8461:mta``).

For sites that keep Postfix's queue and delivery: Postfix asks, per next-hop domain,
which TLS policy applies, and the answer comes from the same ``DestinationResolver``
that ``mta check`` and our delivery ask (``mta.postfix.tlspolicy`` turns its decision
into Postfix's words). A process of its own, with no spool and no listener: Postfix's
``smtp(8)`` processes are the clients, each keeping a connection open for many lookups.

Every limit is bounded: request size (``socketmap.MAX_REQUEST``), connections
(``max_connections``; more are closed at once), the time a connection may stay silent
(``idle_timeout``) and the time one decision may take (``lookup_timeout``, then
``TEMP``: Postfix defers, never delivers under a weaker policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Final, Protocol

from mta.config import Config, PolicyServerConfig
from mta.policy.resolver import DomainPlan, HostPlan
from mta.postfix import tlspolicy
from mta.postfix.socketmap import (
    BadRequest,
    NetstringReader,
    ParseError,
    Reply,
    Request,
    encode,
    parse_request,
)

log = logging.getLogger(__name__)

READ_CHUNK: Final = 4096


class Destinations(Protocol):
    """What the server needs of ``DestinationResolver`` (fakes in tests)."""

    async def domain(self, domain: str) -> DomainPlan: ...

    async def host(self, plan: DomainPlan, host: str) -> HostPlan: ...


class PolicyService:
    """Answers socketmap requests, and serves them to Postfix's clients.

    Parameters:
        destinations: the destination resolver (``app.build_destinations``).
        settings: ``[policy_server]``.
    """

    def __init__(self, destinations: Destinations, settings: PolicyServerConfig) -> None:
        self._destinations = destinations
        self._settings = settings
        self._options = tlspolicy.Options(tlsrpt=settings.tlsrpt)
        self._clients = 0

    async def answer(self, request: Request) -> Reply:
        """The reply to one lookup: ``PERM`` for another map's name, ``NOTFOUND`` for keys
        that are not a domain we decide, else our policy (or ``TEMP``)."""
        if request.name != self._settings.map_name:
            return Reply.perm(f"unknown map name {request.name!r}")
        domain = tlspolicy.lookup_domain(request.key)
        if domain is None:
            return Reply.notfound()
        try:
            async with asyncio.timeout(self._settings.lookup_timeout):
                plan = await self._destinations.domain(domain)
                hosts = await asyncio.gather(
                    *(self._destinations.host(plan, name) for name in plan.hosts)
                )
        except TimeoutError:
            reply = Reply.temp(f"{domain}: policy lookup timed out")
        except Exception:  # one bad lookup must not end the connection, nor weaken policy
            log.exception("policy_server.lookup.failed", extra={"domain": domain})
            reply = Reply.temp(f"{domain}: policy lookup failed")
        else:
            reply = tlspolicy.translate(plan, hosts, self._options)
        log.info(
            "policy_server.answer",
            extra={"domain": domain, "status": reply.status.value, "policy": reply.data},
        )
        return reply

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One client connection: requests in order, until EOF, a protocol error or silence."""
        if self._clients >= self._settings.max_connections:
            log.warning("policy_server.client.refused", extra={"clients": self._clients})
            await _close(writer)
            return
        self._clients += 1
        netstrings = NetstringReader()
        try:
            while True:
                payload = netstrings.next_payload()
                if payload is None:
                    data = await asyncio.wait_for(
                        reader.read(READ_CHUNK), self._settings.idle_timeout
                    )
                    if not data:
                        break
                    netstrings.feed(data)
                    continue
                try:
                    reply = await self.answer(parse_request(payload))
                except BadRequest as err:
                    reply = Reply.perm(str(err))
                writer.write(encode(reply.payload()))
                await writer.drain()
        except ParseError as err:
            log.warning("policy_server.client.protocol_error", extra={"detail": str(err)})
        except TimeoutError:
            log.debug("policy_server.client.idle")
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients -= 1
            await _close(writer)

    async def start(self) -> asyncio.Server:
        """Listen on ``[policy_server] listen``."""
        server = await asyncio.start_server(
            self.serve_client, self._settings.host, self._settings.port
        )
        log.info(
            "policy_server.listening",
            extra={"address": self._settings.host, "port": self._settings.port},
        )
        return server


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def serve(config: Config) -> None:
    """Build the destination side as the relay does, serve until SIGTERM/SIGINT."""
    from mta import app  # the composition root builds DNS, MTA-STS and the resolver
    from mta.clock import SystemClock

    destinations = app.build_destinations(config, SystemClock())
    service = PolicyService(destinations.resolver, config.policy_server)
    tasks: list[asyncio.Task[None]] = []
    if destinations.sts is not None:
        refresher = destinations.sts.run_refresher(config.mta_sts.refresh_interval)
        tasks.append(asyncio.create_task(refresher, name="mta-sts-refresher"))
    if destinations.dnssec is not None:
        tasks.append(asyncio.create_task(destinations.dnssec.run(), name="dnssec-probe"))
    server = await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("policy_server.stopped")


__all__ = ["Destinations", "PolicyService", "serve"]
