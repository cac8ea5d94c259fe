"""Composition root: the one place that builds the I/O objects, wires them and shuts down.

receive -> spool -> schedule -> deliver: the listeners only store a message durably and
hand its queue id to the scheduler; the scheduler alone drives delivery. SIGTERM stops
the listeners, lets deliveries in flight finish (bounded), and exits; the spool is the
only state, so the next start picks the queue up where this one left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import random
import resource
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from prometheus_client import generate_latest

from mta import allocator, fdbudget, privileges, shards
from mta import reload as reloading
from mta.clock import Clock, SystemClock
from mta.config import DEFAULT_POLICY_NAME, Config, ListenerConfig, load, load_default
from mta.control import process_stats, start_control
from mta.deliver.agent import DeliveryAgent
from mta.errors import ConfigError, KeyFileError, MtaError
from mta.events import Events
from mta.model import Envelope, QueueId
from mta.policy.dns import AddressesFound, DnsClient, resolver_is_trusted
from mta.policy.dnssec import DnssecStatus
from mta.policy.dnssec_probe import DnssecProbe
from mta.policy.resolver import DestinationResolver
from mta.policy.sts_cache import StsCache, StsResolver
from mta.policy.sts_fetch import StsFetcher
from mta.policy.verify import TrustStore, load_trust_store
from mta.queuetools import control_commands as queue_commands
from mta.receive.auth import PasswordFile
from mta.receive.handler import Accept
from mta.receive.server import (
    Listeners,
    Serving,
    Sessions,
    bind_listener,
    bind_listeners,
    serving_for,
)
from mta.receive.tls import ensure_self_signed, server_context, warn_certificates
from mta.report.http import MetricsServer, parse_days, start_http
from mta.report.metrics import Metrics
from mta.report.receipt_log import (
    ReceiptLog,
    read_events,
    receipt_dirs,
    receipts_dir,
    retired_receipt_dirs,
)
from mta.report.tlsrpt_send import TlsReporter, build_reporter
from mta.report.transparency_cli import make_report_provider
from mta.schedule.scheduler import Scheduler
from mta.shared.state import SharedState, open_shared
from mta.shared.sts import SharedPolicies
from mta.shared.tlsrpt import FleetReports
from mta.spool import keycheck
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolDirectory, SpoolStore
from mta.tlsbase import harden

log = logging.getLogger(__name__)

SHUTDOWN_GRACE: Final = 30.0


def hostname_of(config: Config) -> str:
    """Our name in banners and headers: the policy's ``hostname``, else the system's."""
    return config.hostname or socket.getfqdn()


@dataclass(frozen=True)
class OpenedKeys:
    """The spool keys at start: the ring, whether it was just created, and the queued
    messages with a record under a key this spool never had (qid -> key id)."""

    keyring: KeyRing
    created: bool
    foreign: Mapping[QueueId, str]


def open_keyring(config: Config, spool: SpoolDirectory) -> OpenedKeys:
    """Load the spool keys, creating them only for an empty spool.

    A missing key file next to spooled messages is an operator error (a lost or
    unmounted key): refuse to start rather than quarantine every message. Likewise
    when the ring fails the rule of ``keycheck`` (a lost key, a different key under a
    record's key id). Records under a key this spool never had are for the caller to
    quarantine; every key of the ring leaves its key check.
    """
    key_file = config.spool.key_file
    spooled = spool.queue_ids()
    if not key_file.exists() and not key_file.is_symlink():
        if spooled:
            raise KeyFileError(
                f"{key_file}: missing, but the spool holds {len(spooled)} messages; "
                "restore the key file (refusing to start)"
            )
        keyring = KeyRing.create(key_file)
        keycheck.write_checks(spool, keyring.ids(), keyring.get)
        return OpenedKeys(keyring, True, {})
    keyring = KeyRing.load(key_file)
    verdict = keycheck.assess(key_file, keyring.ids(), keyring.get, spool)
    if verdict.refusal is not None:
        raise KeyFileError(f"{verdict.refusal} (refusing to start; the spool is untouched)")
    keycheck.write_checks(spool, verdict.unchecked, keyring.get)
    return OpenedKeys(keyring, False, verdict.foreign)


def assess_keyring(keyring: KeyRing, spool: SpoolDirectory) -> tuple[KeyRing, keycheck.Verdict]:
    """The key file re-read for the running relay, and its verdict under the start-up
    rule: a ring that lacks a key a queued record needs is refused."""
    try:
        candidate = KeyRing.load(keyring.path)
        verdict = keycheck.assess(
            keyring.path, candidate.ids(), candidate.get, spool, held=keyring.ids()
        )
    except MtaError as err:
        return keyring, keycheck.Verdict(str(err))
    return candidate, verdict


def reload_keyring(keyring: KeyRing, spool: SpoolDirectory) -> str:
    """Re-read the key file for the running relay, under the start-up rule: a ring that
    lacks a key a queued record needs is refused (the keys in use stay), so only
    ``mta keys prune`` ever drops a key. Returns the control socket's answer."""
    candidate, verdict = assess_keyring(keyring, spool)
    if verdict.refusal is not None:
        log.error("spool.keys.reload_refused", extra={"detail": verdict.refusal})
        return f"error {verdict.refusal} (reload refused; the relay keeps its keys)"
    keycheck.write_checks(spool, verdict.unchecked, candidate.get)
    keyring.adopt(candidate)
    log.info("spool.keys.reloaded", extra={"key_id": keyring.active_id})
    return f"ok active={keyring.active_id}"


@dataclass
class Destinations:
    """The policy side of delivery, shared by the relay and ``mta check``."""

    resolver: DestinationResolver
    sts: StsResolver | None
    dnssec: DnssecProbe | None = None  # None: DANE is off, nothing to probe
    dns: DnsClient | None = None  # the relay's DNS (TLS-RPT's _smtp._tls lookups)
    metrics: Metrics | None = None  # told of each DNS query and MTA-STS fetch
    shared: SharedState | None = None  # [shared] redis_url: the fleet's state


def _trust_store(files: list[Path], *, system: bool, key: str) -> TrustStore:
    try:
        return load_trust_store(files, system=system)
    except ConfigError as err:  # it names the file; we name the policy key
        raise ConfigError(err.source, key, err.problem) from None


def _sts_context(config: Config) -> ssl.SSLContext:
    """HTTPS for MTA-STS policies: PKIX against the system store plus ``tls.ca_file``,
    with the same floor as every outbound connection (``tlsbase.harden``)."""
    context = harden(ssl.create_default_context())
    if config.tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.tls.ca_file))
        except (OSError, ValueError) as err:
            raise ConfigError(config.tls.ca_file, "tls.ca_file", f"cannot load: {err}") from None
    return context


def build_destinations(
    config: Config,
    clock: Clock,
    previous: tuple[Config, Destinations] | None = None,
    *,
    metrics: Metrics | None = None,
    shared: SharedState | None = None,
) -> Destinations:
    """DNS, trust stores, MTA-STS and the destination resolver, as ``config`` says.

    ``previous``: the running relay's (a reload). Its DNS client and DNSSEC probe are
    kept while ``dns`` and ``dane`` are unchanged, its MTA-STS resolver (and cache) while
    ``dns``, ``mta_sts`` and ``tls`` are; trust stores are always read afresh.

    Says once, at WARNING, when DANE cannot be trusted (the resolver is neither on
    loopback nor marked ``dns.trusted``): DNSSEC status is then never believed.
    Otherwise the resolver's validation is probed (``dns.dnssec_probe``, ``dnssec``).
    """
    old_config, old = previous if previous is not None else (None, None)
    metrics = metrics or (old.metrics if old is not None else None)  # counted on a reload too
    shared = shared or (old.shared if old is not None else None)  # opened once, at start

    def unchanged(*sections: str) -> bool:
        return old_config is not None and all(
            getattr(old_config, name) == getattr(config, name) for name in sections
        )

    dns = old.dns if old is not None and unchanged("dns") else None
    dns = dns or DnsClient(
        config.dns.resolvers, config.dns.timeout, observe=metrics.dns_lookup if metrics else None
    )
    dane_trusted = resolver_is_trusted(dns.resolvers, config.dns.trusted)
    if config.dane.enabled and not dane_trusted:
        log.warning(
            "dane.untrusted_resolver",
            extra={
                "detail": "the DNS resolver is not on loopback and dns.trusted is false: "
                "DANE is off (run a validating resolver such as unbound on 127.0.0.1)"
            },
        )
    dnssec: DnssecProbe | None = None
    if old is not None and unchanged("dns", "dane"):
        dnssec = old.dnssec
    elif config.dane.enabled and dane_trusted:  # is the AD bit worth anything? (issue 8 §2)
        names = ", ".join(f"{r.host}:{r.port}" for r in dns.resolvers)
        dnssec = DnssecProbe(dns, config.dns.dnssec_probe, names, clock)
    extra = [config.tls.ca_file] if config.tls.ca_file else []
    trust = _trust_store(extra, system=True, key="tls.ca_file")
    domain_trust = {
        policy.name: _trust_store([policy.ca_file], system=False, key="domain.ca_file")
        for policy in config.domains
        if policy.ca_file is not None
    }
    sts: StsResolver | None = None
    if old is not None and unchanged("dns", "mta_sts", "tls"):
        sts = old.sts
    elif config.mta_sts.enabled:

        async def resolve(host: str) -> list[str]:
            found = await dns.addresses(host)
            return list(found.addresses) if isinstance(found, AddressesFound) else []

        fetcher = StsFetcher(
            resolve=resolve,
            ssl_context=_sts_context(config),
            port=config.mta_sts.port,
            timeout=config.mta_sts.timeout,
        )
        sts = StsResolver(
            dns,
            fetcher,
            StsCache.load(config.mta_sts.cache_file),
            clock,
            observe=metrics.sts_fetch if metrics else None,
            shared=SharedPolicies(shared.store, shared.key, clock) if shared else None,
        )
    resolver = DestinationResolver(
        config,
        dns,
        sts,
        trust,
        domain_trust=domain_trust,
        dane_trusted=dane_trusted,
        rand=random.Random(),  # noqa: S311 - MX tie-break, not crypto
        dnssec=dnssec,
    )
    return Destinations(resolver, sts, dnssec, dns, metrics, shared)


@dataclass
class Relay:
    """The running relay's parts, kept together for shutdown."""

    store: SpoolStore
    scheduler: Scheduler
    events: Events
    servers: list[asyncio.Server]
    control: asyncio.Server
    destinations: Destinations
    agent: DeliveryAgent
    tasks: list[asyncio.Task[None]]
    spool_lock: int = -1  # the descriptor holding the spool's flock, released at close
    sessions: Sessions | None = None  # the inbound sessions: told 421 4.3.2 at close
    reloader: Reloader | None = None  # ``mta reload`` and SIGHUP
    metrics_http: MetricsServer | None = None  # [metrics] listen: /metrics, /report

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        for server in self.servers:
            server.close()
        if self.sessions is not None:
            await self.sessions.shut_down()
        await self.scheduler.stop(grace)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.agent.close()
        self.control.close()
        if self.metrics_http is not None:
            await self.metrics_http.close()
        if self.destinations.shared is not None:
            await self.destinations.shared.store.close()
        for server in self.servers:
            await server.wait_closed()
        if self.spool_lock >= 0:
            os.close(self.spool_lock)
            self.spool_lock = -1


def _tls_contexts(
    config: Config, hostname: str
) -> tuple[Callable[[ListenerConfig], ssl.SSLContext], Path | None]:
    """One server context per listener; a self-signed pair where none is configured.

    Each certificate's problems (expiry, SHA-1, not naming ``hostname``) are logged
    once, as ``receive.tls.certificate`` warnings.
    """
    created: Path | None = None
    contexts: dict[int, ssl.SSLContext] = {}
    warned: set[Path] = set()
    for listener in config.listeners:
        chains = list(listener.tls_chains)
        if not chains:
            chains, made = ensure_self_signed(config.home / "tls", hostname)
            created = created or (chains[0][0] if made else None)
        contexts[id(listener)] = server_context(
            chains, listener.tls_client_ca, require_client=listener.require_client_cert
        )
        warn_certificates([pair for pair in chains if pair[0] not in warned], hostname)
        warned.update(cert for cert, _key in chains)
    return (lambda listener: contexts[id(listener)]), created


def _as_read(config: Config) -> Config:
    return config


async def start(
    config: Config,
    *,
    shape: Callable[[Config], Config] = _as_read,
    ready: str = "mta.ready",
    worker: bool = False,
) -> Relay:
    """Build and start everything; return once the listeners accept connections.

    Started as root with ``server.user``, the listeners are bound first and the relay
    becomes that user before anything else (``mta.privileges``). The spool is locked
    first after that (``SpoolDirectory.lock``): one relay per spool. A single relay
    (``workers = 1``) then adopts the records a former group left in its shards.

    ``shape``: what a worker of a group (``mta.group``) makes of its policy file, read
    again at each reload (its shard as its spool); ``ready``: the line said once the
    listeners accept (a worker's is not the group's ``mta.ready``); ``worker``: the
    shard's lock is waited for (``shards.lock_waiting``), as the worker of a group whose
    supervisor died may still be draining it.
    """
    bound: list[socket.socket] | None = None
    account = privileges.account_for(config, os.geteuid())
    if account is not None:
        bound = bind_listeners(config)
        try:
            privileges.become(config, account)
        except BaseException:
            for sock in bound:
                sock.close()
            raise
    spool = SpoolDirectory(config.spool.path)
    spool.ensure_dirs()
    spool_lock = shards.lock_waiting(spool) if worker else spool.lock()
    try:
        if config.spool.path in shards.live_dirs(config):  # not a worker's shard
            shards.adopt(config)
        relay = await _start(config, bound, shape=shape, ready=ready)
    except BaseException:
        os.close(spool_lock)
        raise
    relay.spool_lock = spool_lock
    return relay


def fit_descriptors(config: Config) -> Config:
    """``config`` with its connection caps fitted to RLIMIT_NOFILE (``fdbudget``): the
    soft limit is raised towards the hard one if need be, and what still does not fit
    is clamped, said in one line, so the control socket always has descriptors left."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inbound, outbound = config.limits.connections, config.outbound.max_connections
    want = fdbudget.soft_limit(soft, hard, fdbudget.needed(inbound, outbound))
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("mta.nofile_raised", extra={"soft": want, "was": soft, "hard": hard})
            soft = want
    try:
        budget = fdbudget.fit(soft, inbound, outbound)
    except ValueError as err:
        raise ConfigError(config.source, "limits.connections", str(err)) from None
    if (budget.connections, budget.deliveries) == (inbound, outbound):
        return config
    log.warning(
        "mta.connections_clamped",
        extra={
            "nofile": soft,
            "connections": f"{inbound}->{budget.connections}",
            "max_connections": f"{outbound}->{budget.deliveries}",
            "reserve": fdbudget.RESERVE,
        },
    )
    return replace(
        config,
        limits=replace(config.limits, connections=budget.connections),
        outbound=replace(config.outbound, max_connections=budget.deliveries),
    )


async def _start(
    config: Config,
    bound: list[socket.socket] | None = None,
    *,
    shape: Callable[[Config], Config] = _as_read,
    ready: str = "mta.ready",
) -> Relay:
    config = fit_descriptors(config)
    hostname = hostname_of(config)
    keys = open_keyring(config, SpoolDirectory(config.spool.path))
    keyring, key_created = keys.keyring, keys.created
    store = SpoolStore(config.spool.path, keyring)
    store.sweep_tmp()
    for qid, key_id in keys.foreign.items():  # before the scheduler ever sees them
        await store.quarantine_foreign(qid, key_id)
    tls_for, cert_created = _tls_contexts(config, hostname)
    if key_created or cert_created:
        log.info(
            "mta.init",
            extra={
                "home": str(config.home),
                "spool_key": str(config.spool.key_file) if key_created else "(existing)",
                "certificate": str(cert_created) if cert_created else "(existing)",
            },
        )
    passwords = PasswordFile.load(config.auth.password_file) if config.auth.password_file else None

    clock = SystemClock()
    # What happened, for the views of it (receipts, TLS-RPT, metrics, the report): the
    # sinks are added below, as each view is built.
    events = Events()
    # Every event kept, sealed and chained (mta receipts show|verify, TLS-RPT, the report).
    receipts = await asyncio.to_thread(
        ReceiptLog.open,
        receipts_dir(config),
        keyring,
        max_age=config.receipts.max_age,
        clock=clock,
        retired=retired_receipt_dirs(config),
    )
    events.add(receipts)
    metrics = Metrics(clock)  # Prometheus, served on [metrics] listen
    events.add(metrics)
    shared = open_shared(config, hostname, on_state=metrics.shared_state)
    destinations = build_destinations(config, clock, metrics=metrics, shared=shared)
    agent = DeliveryAgent(config, destinations.resolver)
    scheduler = Scheduler(
        store,
        agent,
        clock,
        outbound=config.outbound,
        max_age=config.spool.max_age,
        hostname=hostname,
        events=events,
    )
    recovered = await scheduler.recover()
    report_page = make_report_provider(  # GET /report: the transparency page
        receipt_dirs(config),
        keyring,
        clock,
        flush=receipts.flush,
        title=f"Transparency report: {hostname}",
    )
    metrics_http = (  # a taken port stops the start here, before any mail is accepted
        await start_http(config.metrics, metrics.registry, report_page, source=config.source)
        if config.metrics.enabled
        else None
    )

    async def accept(envelope: Envelope, content: bytes) -> QueueId:
        # Scheduled as soon as it is durable, even if the client has hung up by then.
        return await store.put(
            envelope, content, lambda qid: scheduler.enqueue(qid, envelope, content)
        )

    tasks = [
        asyncio.create_task(scheduler.run(), name="scheduler"),
        asyncio.create_task(receipts.run(), name="receipts"),  # flushes last when cancelled
    ]
    if destinations.sts is not None:
        refresher = destinations.sts.run_refresher(config.mta_sts.refresh_interval)
        tasks.append(asyncio.create_task(refresher, name="mta-sts-refresher"))
    if destinations.dnssec is not None:
        tasks.append(asyncio.create_task(destinations.dnssec.run(), name="dnssec-probe"))
    reporter: TlsReporter | None = None
    if config.tlsrpt.enabled and destinations.dns is not None:  # TLS reports (RFC 8460)
        reporter = build_reporter(
            config,
            hostname=hostname,
            dns=destinations.dns,
            keyring=keyring,
            ssl_context=_sts_context(config),
            mail=accept,
            source=functools.partial(read_events, receipt_dirs(config), keyring),
            clock=clock,
            fleet=FleetReports(shared.store, shared.key, shared.relay_id) if shared else None,
            flush=receipts.flush,
        )
        tasks.append(asyncio.create_task(reporter.run(), name="tlsrpt"))
        if shared is not None:  # our counts into the fleet's, now and then
            tasks.append(asyncio.create_task(reporter.run_publisher(), name="tlsrpt-publish"))
    authenticator = passwords.authenticator if passwords else None
    sessions = Sessions(config.limits)
    listeners = Listeners(sessions, config.limits)
    try:
        serving = serving_for(config, accept, tls_for, authenticator, hostname, events)
    except BaseException:
        for sock in bound or ():
            sock.close()
        raise
    await listeners.start(serving, bound)
    servers = listeners.servers

    async def rewrap() -> str:
        done = await store.rewrap()
        return f"ok rewrapped={done.rewrapped} failed={done.failed}"

    def stats() -> str:
        figures = {
            "queued": scheduler.queued,
            "in_flight": scheduler.in_flight,
            **process_stats(),
        }
        return "ok " + " ".join(f"{name}={value}" for name, value in figures.items())

    control = await start_control(
        config.control_socket,
        {
            "flush": lambda: f"ok {scheduler.flush()}",
            # Off the loop: it reads every queued record's header.
            "reload-keys": lambda: asyncio.to_thread(reload_keyring, keyring, store),
            # ``reloader`` is made below, before this function returns to the loop.
            "reload": lambda: reloader.reload(),
            "rewrap": rewrap,
            "ping": lambda: "ok",
            "stats": stats,
            # The exposition, for a group's supervisor to merge (``report.group_metrics``).
            "metrics": lambda: "ok " + json.dumps(generate_latest(metrics.registry).decode()),
            "receipts-flush": lambda: _flushed(receipts),
        },
        {
            # The reports are read from the receipt log: what it buffers is written first.
            "tlsrpt-show": _after_flush(receipts, reporter.show_command)
            if reporter
            else _tlsrpt_off,
            "tlsrpt-send": _after_flush(receipts, reporter.send_command)
            if reporter
            else _tlsrpt_off,
            **queue_commands(scheduler, clock),
            # GET /report of a relay group: its supervisor asks worker 0 (no keys there).
            "report-page": functools.partial(_report_page, report_page),
        },
    )
    log.info(
        ready,
        extra={
            "listen": ",".join(f"{lc.address}:{lc.port}/{lc.mode}" for lc in config.listeners),
            "spool": str(config.spool.path),
            "queued": recovered,
            "default_level": config.outbound.default_level.label,
        },
    )
    relay = Relay(
        store, scheduler, events, servers, control, destinations, agent, tasks, sessions=sessions
    )
    reloader = Reloader(
        relay,
        config,
        listeners,
        hostname=hostname,
        accept=accept,
        keyring=keyring,
        clock=clock,
        shape=shape,
    )
    relay.reloader = reloader
    relay.metrics_http = metrics_http
    # The queue and the DNSSEC probe, read at each scrape (a reload may replace the probe).
    metrics.watch(scheduler, lambda: _probe_status(relay.destinations.dnssec))
    return relay


def _probe_status(probe: DnssecProbe | None) -> DnssecStatus | None:
    return probe.status if probe is not None else None


def _after_flush(
    receipts: ReceiptLog, command: Callable[[str], Awaitable[str]]
) -> Callable[[str], Awaitable[str]]:
    """``command``, run once the receipt log has written out what it buffered."""

    async def run(argument: str) -> str:
        await receipts.flush()
        return await command(argument)

    return run


async def _flushed(receipts: ReceiptLog) -> str:
    return f"ok {await receipts.flush()}"


async def _report_page(make: Callable[[int], Awaitable[str]], argument: str) -> str:
    try:
        days = parse_days(argument)
    except ValueError as err:
        return f"error {err}"
    return "ok " + json.dumps(await make(days))


def _tlsrpt_off(_argument: str) -> str:
    return "error TLS reports are off ([tlsrpt] enabled = false)"


def reread(config: Config) -> Config:
    """The policy the running relay was started with, read again (its includes too)."""
    if config.source == f"(embedded {DEFAULT_POLICY_NAME})":
        return load_default(config.home)
    return load(Path(config.source), config.home)


@dataclass
class _Next:
    """A new configuration, built whole and checked, ready to swap in."""

    config: Config
    serving: list[Serving]
    destinations: Destinations
    agent: DeliveryAgent
    keys: tuple[KeyRing, keycheck.Verdict]
    bound: dict[int, socket.socket | None]  # added listeners: bound now, or at the swap
    changes: reloading.Changes


class Reloader:
    """``mta reload`` and SIGHUP (Postfix's ``postfix reload``).

    Everything is read and built first, off the event loop: the policy file and its
    includes, every listener's TLS context, the password file, the trust stores and
    client certificates (a new ``DeliveryAgent``), the spool key file (``keycheck``),
    the sockets of added listeners. Anything wrong, and the relay keeps what it runs
    with and says one line. Then the swap, on the loop: new sessions and new delivery
    attempts use the new configuration; those in progress finish under the old one.
    """

    def __init__(
        self,
        relay: Relay,
        config: Config,
        listeners: Listeners,
        *,
        hostname: str,
        accept: Accept,
        keyring: KeyRing,
        clock: Clock,
        shape: Callable[[Config], Config] = _as_read,
    ) -> None:
        self.shape = shape  # a group's worker: its shard, read anew each time
        self.relay = relay
        self.config = config
        self.listeners = listeners
        self.hostname = hostname
        self.accept = accept
        self.keyring = keyring
        self.clock = clock
        self._lock = asyncio.Lock()

    async def reload(self) -> str:
        """Reload; the control socket's answer (``ok ...`` or ``error <one line>``)."""
        async with self._lock:
            try:
                built = await asyncio.to_thread(self._prepare)
            except (MtaError, OSError, ValueError) as err:
                line = str(err)
                log.error("mta.reload_refused", extra={"error": line})
                return f"error {line}"
            await self._swap(built)
            facts = built.changes.facts()
            log.info("mta.reloaded", extra=facts)
            return "ok " + " ".join(f"{name}={value}" for name, value in facts.items())

    def _prepare(self) -> _Next:
        old = self.config
        new = fit_descriptors(self.shape(reread(old)))
        refused = reloading.refusal(old, new)
        if refused is not None:
            raise refused
        new = replace(new, server=old.server)  # whom we run as: fixed at start
        tls_for, _ = _tls_contexts(new, self.hostname)
        password_file = new.auth.password_file
        authenticator = PasswordFile.load(password_file).authenticator if password_file else None
        serving = serving_for(
            new, self.accept, tls_for, authenticator, self.hostname, self.relay.events
        )
        destinations = build_destinations(new, self.clock, (old, self.relay.destinations))
        agent = DeliveryAgent(new, destinations.resolver)
        keys = assess_keyring(self.keyring, self.relay.store)
        if keys[1].refusal is not None:
            raise KeyFileError(keys[1].refusal)
        changes = reloading.changes(old, new)
        return _Next(new, serving, destinations, agent, keys, self._bind(new, changes), changes)

    def _bind(self, new: Config, changes: reloading.Changes) -> dict[int, socket.socket | None]:
        """Sockets for the added listeners, bound now so that a busy port refuses the
        reload; one taking the place of a removed listener is bound once that closed."""
        removed = {
            (self.config.listeners[index].address, self.config.listeners[index].port)
            for index in changes.listeners.removed
        }
        bound: dict[int, socket.socket | None] = {}
        try:
            for index in changes.listeners.added:
                listener = new.listeners[index]
                replaces = (listener.address, listener.port) in removed
                bound[index] = None if replaces else bind_listener(new, index)
        except BaseException:
            for sock in bound.values():
                if sock is not None:
                    sock.close()
            raise
        return bound

    async def _swap(self, built: _Next) -> None:
        relay = self.relay
        candidate, verdict = built.keys
        await asyncio.to_thread(
            keycheck.write_checks, relay.store, verdict.unchecked, candidate.get
        )
        self.keyring.adopt(candidate)
        relay.scheduler.reconfigure(built.agent, built.config.outbound, built.config.spool.max_age)
        old_agent, old = relay.agent, relay.destinations
        relay.agent, relay.destinations = built.agent, built.destinations
        sts, dnssec = built.destinations.sts, built.destinations.dnssec
        if sts is not old.sts:
            interval = built.config.mta_sts.refresh_interval
            self._restart("mta-sts-refresher", sts.run_refresher(interval) if sts else None)
        if dnssec is not old.dnssec:
            self._restart("dnssec-probe", dnssec.run() if dnssec else None)
        await self.listeners.swap(built.serving, built.changes.listeners.kept, built.bound)
        relay.servers[:] = self.listeners.servers
        self.config = built.config
        await old_agent.close()  # its idle connections; attempts in flight go on

    def _restart(self, name: str, work: Coroutine[object, object, None] | None) -> None:
        """Replace the background task ``name`` by one running ``work`` (None: none)."""
        for task in [task for task in self.relay.tasks if task.get_name() == name]:
            task.cancel()
            self.relay.tasks.remove(task)
        if work is not None:
            self.relay.tasks.append(asyncio.create_task(work, name=name))


async def serve(config: Config, worker: Worker | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. A worker of a group also
    stops when its supervisor is gone (``Worker``)."""
    if worker is None:
        relay = await start(config)
    else:
        relay = await start(config, shape=worker.shape, ready="mta.worker.ready", worker=True)
    # The handlers first: ``mta.ready`` is out, and a signal now must not kill us outright.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if worker is not None:
        worker.attend(loop, stop)
    reloads: set[asyncio.Task[str]] = set()

    def hangup() -> None:  # SIGHUP: as ``mta reload`` (its outcome is logged)
        if relay.reloader is not None:
            task = asyncio.create_task(relay.reloader.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    # Some 54,000 objects from start-up (modules, the policy, trust stores) would be
    # traversed by every full garbage collection: 15-28 ms with the loop stopped and
    # every session waiting (the tail of the acknowledgement latency). Frozen, they are
    # left alone: a full collection then took 1.6 ms.
    gc.collect()
    gc.freeze()
    await stop.wait()
    log.info("mta.stopping", extra={"grace_s": SHUTDOWN_GRACE})
    await relay.close()
    log.info("mta.stopped")


@dataclass
class Worker:
    """One relay of a group (``mta.group``): shard ``index``, and ``channel``, its end of
    a socket pair whose other end only the supervisor holds. The worker says ``ready``
    on it once it accepts mail; end of file on it means the supervisor is gone (even by
    SIGKILL), and the worker then shuts down as on SIGTERM."""

    index: int
    channel: socket.socket

    def shape(self, config: Config) -> Config:
        return shards.worker_config(config, self.index)

    def attend(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        self.channel.setblocking(False)
        with contextlib.suppress(OSError):  # the supervisor may be gone already
            self.channel.send(b"ready\n")

        def readable() -> None:
            try:
                data = self.channel.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.channel.fileno())
                log.warning("mta.worker.orphaned", extra={"worker": self.index})
                stop.set()

        loop.add_reader(self.channel.fileno(), readable)


def run(config: Config, worker: Worker | None = None) -> None:
    """Entry point for ``mta run`` (and a group's workers): uvloop where available;
    never as root unless the policy says whom to become (``server.user``) or
    ``server.allow_root``."""
    refusal = privileges.root_refusal(config, os.geteuid())
    if refusal is not None:
        raise refusal
    allocator.limit_arenas()  # before any thread starts: see ``mta.allocator``
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, worker))
    else:
        uvloop.run(serve(config, worker))
