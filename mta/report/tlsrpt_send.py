"""Sending TLS reports (RFC 8460 §3, §5): where to, how, once a day, and never twice.

The I/O edge of TLS-RPT; the counting and rendering are pure (``tlsrpt``,
``tlsrpt_mail``). The counts come from the stored events (``EventSource``: the
receipt log), so they survive restarts; nothing is counted in memory.

- Where: ``_smtp._tls.<policy domain>`` TXT through the relay's DNS (cached like every
  answer), parsed strictly (``tlsrpt_record``); no valid record, no report.
- How: ``https:`` by POST of the gzip JSON (PKIX with the system store and
  ``tls.ca_file``, no redirects, a total timeout; a 2xx is success); ``mailto:`` by
  putting the report mail into our own spool (``Envelope.report``, null sender) so it
  leaves through our queue, encryption and destination policy, and is never counted
  in a report itself.
- Once: what was done for each (day, policy domain) is a sealed record under
  ``<spool>/tlsrpt/<day>/<domain>`` (the spool's sealing, kind "state"; the spool
  root's, also in a relay group: ``SentState``): the destinations reached and the
  tries made. A destination reached is never tried
  again; one that failed is retried by the next run, up to ``MAX_TRIES`` in all. A
  record that no longer opens (a pruned key) counts as done: a report never goes twice.
- When: after each UTC midnight plus a random jitter (up to ``MAX_JITTER``), the day
  before; then every ``RETRY_INTERVAL`` while something is left to retry. A domain
  with no sessions that day has no report.
- A fleet (``[shared] redis_url``, ``Fleet``: ``mta.shared.tlsrpt``): every relay adds
  its day's counts to Redis now and then (``run_publisher``) and right before a
  report; a report carries the fleet's sum and is sent by the one relay that takes
  its lock; what was done is shared, so no relay sends it again. The send waits
  ``FLEET_DELAY`` more after midnight, for every relay to add its last counts. Redis
  away: each relay reports its own sessions, as alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from email.utils import make_msgid
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints

from mta import shards
from mta.clock import Clock
from mta.config import Config
from mta.durable import DIR_MODE, read_file, replace_durably
from mta.errors import ConfigError
from mta.events import DeliveryAttempt, EventSource
from mta.model import Envelope, QueueId
from mta.policy.dns import AddressesFound, DnsClient, TxtAnswer, TxtLookup
from mta.policy.sts_fetch import _InjectedResolver, _OneFetchConnector
from mta.report.tlsrpt import DailyTally, day_range, render_report, reported_sessions
from mta.report.tlsrpt_mail import (
    CONTENT_TYPE,
    DkimKey,
    ReportSender,
    compress_report,
    dkim_sign,
    report_id,
    report_message,
)
from mta.report.tlsrpt_record import TlsRptRecord, parse_tlsrpt_txt
from mta.spool.keys import KeyRing
from mta.spool.record import RecordError, RecordKind, seal, unseal

log = logging.getLogger(__name__)

MAX_TRIES: Final = 4  # per destination and report
MAX_JITTER: Final = 3600.0  # seconds after UTC midnight
RETRY_INTERVAL: Final = 2 * 3600.0
POST_TIMEOUT: Final = 60.0
KEEP_DAYS: Final = 7  # sent-state records older than this are removed
FLEET_DELAY: Final = 900.0  # a fleet sends after midnight + this + jitter
_STATE_FORMAT: Final = 1


class TxtResolver(Protocol):
    async def txt(self, name: str) -> TxtLookup: ...


class Fleet(Protocol):
    """The counts and sent marks several relays share (``mta.shared.tlsrpt``); never
    raises: Redis away is None from ``share``, True from ``claim``."""

    async def publish(self, day: date, tally: DailyTally) -> bool: ...

    async def share(self, day: date, tally: DailyTally) -> DailyTally | None: ...

    async def progress(self, day: date, domain: str) -> Progress | None: ...

    async def claim(self, day: date, domain: str) -> bool: ...

    async def record(self, day: date, domain: str, progress: Progress) -> None: ...


Post = Callable[[str, bytes], Awaitable[str | None]]  # url, body -> None or why it failed
Mail = Callable[[Envelope, bytes], Awaitable[QueueId]]  # into our spool and queue


def report_sender(config: Config, hostname: str) -> ReportSender:
    """``[tlsrpt]`` with its defaults filled in from ``hostname``."""
    tlsrpt = config.tlsrpt
    address = tlsrpt.from_address or f"tlsrpt-noreply@{hostname}"
    return ReportSender(tlsrpt.organization or hostname, tlsrpt.contact or address, address)


def load_dkim_key(config: Config) -> DkimKey | None:
    """The DKIM key of ``[tlsrpt]``, read and tried once at start (``ConfigError`` if it
    cannot sign), or None when report mail goes unsigned."""
    tlsrpt = config.tlsrpt
    if tlsrpt.dkim_key is None:
        return None
    try:
        pem = tlsrpt.dkim_key.read_bytes()
    except OSError as err:
        raise ConfigError(config.source, "tlsrpt.dkim_key", f"cannot read: {err}") from None
    key = DkimKey(tlsrpt.dkim_domain, tlsrpt.dkim_selector, pem)
    probe = b"From: a@example.org\r\nSubject: key check\r\n\r\nkey check\r\n"
    try:
        dkim_sign(probe, key)
    except (dkim.DKIMException, ValueError) as err:
        raise ConfigError(
            str(tlsrpt.dkim_key), "tlsrpt.dkim_key", f"not a usable DKIM key: {err}"
        ) from None
    return key


# --- where reports go ---


async def discover(dns: TxtResolver, domain: str) -> TlsRptRecord | None:
    """The domain's ``rua`` (RFC 8460 §3), or None: no record, a bad one, or no answer."""
    answer = await dns.txt(f"_smtp._tls.{domain}")
    if not isinstance(answer, TxtAnswer):
        return None
    return parse_tlsrpt_txt(answer.strings)


# --- HTTPS ---


class HttpsPoster:
    """POSTs a gzip report (RFC 8460 §5.2): PKIX, no redirects, a total timeout.

    Parameters:
        ssl_context: verifies chains and names (system store plus ``tls.ca_file``).
        resolve: the relay's DNS (host -> addresses), as the MTA-STS fetcher uses it.
        timeout: seconds for the whole request.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        resolve: Callable[[str], Awaitable[list[str]]],
        timeout: float = POST_TIMEOUT,
    ) -> None:
        self._ssl_context, self._resolve, self._timeout = ssl_context, resolve, timeout

    async def __call__(self, url: str, body: bytes) -> str | None:
        connector = _OneFetchConnector(
            resolver=_InjectedResolver(self._resolve),
            ssl=self._ssl_context,
            use_dns_cache=False,
            force_close=True,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        try:
            async with session:
                try:
                    async with asyncio.timeout(self._timeout + 5):
                        response = await session.post(
                            url,
                            data=body,
                            headers={"Content-Type": CONTENT_TYPE},
                            allow_redirects=False,
                        )
                        async with response:
                            status = response.status
                finally:
                    connector.abort_all()
        except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as err:
            return f"{type(err).__name__}: {err}".splitlines()[0][:200]
        return None if 200 <= status < 300 else f"HTTP {status}"


# --- what was done, sealed ---


@dataclass(frozen=True, slots=True)
class Progress:
    """One report's delivery so far: destinations reached, tries per destination."""

    done: frozenset[str] = frozenset()
    tries: dict[str, int] = field(default_factory=dict)

    def finished(self, destinations: Sequence[str]) -> bool:
        return all(d in self.done or self.tries.get(d, 0) >= MAX_TRIES for d in destinations)


class SentState:
    """Sealed (day, domain) -> ``Progress`` records under ``<spool>/tlsrpt/``.

    One place for the whole relay group: the spool root's ``tlsrpt/``, whatever
    ``[server] workers`` is. A single relay always kept it there, and a group's only
    sender is worker 0, so a change of worker count (1 -> N, N -> 1) finds what was
    sent where it was left, with one writer and nothing to move (moving it at start
    would need the spool keys, which a group's supervisor never opens). ``also``:
    directories where earlier groups kept it (``<spool>/shards/<k>``), still read until
    their days expire; a destination done in any of them is done.
    """

    def __init__(
        self,
        spool: Path,
        keyring: KeyRing,
        random: Callable[[int], bytes],
        *,
        also: Sequence[Path] = (),
    ) -> None:
        self.root = spool / "tlsrpt"
        self._older = [path / "tlsrpt" for path in also if path != spool]
        self._keyring, self._random = keyring, random

    @classmethod
    def of_group(
        cls, config: Config, keyring: KeyRing, random: Callable[[int], bytes]
    ) -> SentState:
        """The sent-state of the relay or relay group ``config`` (a worker's) runs in."""
        group = shards.group_config(config)
        return cls(group.spool.path, keyring, random, also=shards.spool_dirs(group))

    def _path(self, day: date, domain: str) -> tuple[Path, str]:
        name = f"tlsrpt.{day.isoformat()}.{domain}"
        return self.root / day.isoformat() / domain, name

    def load(self, day: date, domain: str) -> Progress | None:
        """What was done; None if nothing yet. A record that does not open counts as
        done for every destination (never send twice)."""
        name = self._path(day, domain)[1]
        found = [
            progress
            for root in (self.root, *self._older)
            if (progress := self._load(root / day.isoformat() / domain, name)) is not None
        ]
        if not found:
            return None
        done = frozenset().union(*(p.done for p in found))
        tries: dict[str, int] = {}
        for progress in found:
            for destination, count in progress.tries.items():
                tries[destination] = max(count, tries.get(destination, 0))
        return Progress(done, tries)

    def _load(self, path: Path, name: str) -> Progress | None:
        try:
            data = read_file(path, 1 << 20)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(unseal(data, kind=RecordKind.STATE, qid=name, keys=self._keyring.get))
            if doc.get("v") != _STATE_FORMAT:
                raise ValueError("unknown format")
            return Progress(
                frozenset(doc["done"]), {str(k): int(v) for k, v in doc["tries"].items()}
            )
        except (RecordError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("tlsrpt.state.unreadable", extra={"path": str(path), "error": str(err)})
            return Progress(frozenset({"*"}), {"*": MAX_TRIES})

    def save(self, day: date, domain: str, progress: Progress) -> None:
        path, name = self._path(day, domain)
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.root.chmod(DIR_MODE)
        doc = {"v": _STATE_FORMAT, "done": sorted(progress.done), "tries": progress.tries}
        key_id = self._keyring.active_id
        kek = self._keyring.get(key_id)
        assert kek is not None
        record = seal(
            json.dumps(doc).encode(),
            kind=RecordKind.STATE,
            qid=name,
            key_id=key_id,
            kek=kek,
            random=self._random,
        )
        replace_durably(path.with_name(f".{domain}.tmp"), path, record)

    def expire(self, today: date) -> None:
        """Forget the records of days older than ``KEEP_DAYS`` (earlier groups' too)."""
        for root in (self.root, *self._older):
            if not root.is_dir():
                continue
            for directory in root.iterdir():
                try:
                    day = date.fromisoformat(directory.name)
                except ValueError:
                    continue
                if day < today - timedelta(days=KEEP_DAYS):
                    for file in directory.iterdir():
                        file.unlink(missing_ok=True)
                    directory.rmdir()


def _sealed_done(progress: Progress | None) -> bool:
    return progress is not None and "*" in progress.done


# --- the reports ---


@dataclass(frozen=True, slots=True)
class PlannedReport:
    """One policy domain's report for a day, and where it goes (None: nowhere)."""

    day: date
    domain: str
    report: dict[str, Any]
    record: TlsRptRecord | None
    progress: Progress | None = None
    fleet: bool = False  # the fleet's counts: sent under the fleet's lock

    @property
    def destinations(self) -> tuple[str, ...]:
        if self.record is None:
            return ()
        return tuple(self.record.https) + tuple(f"mailto:{a}" for a in self.record.mailto)

    @property
    def sent(self) -> bool:
        if _sealed_done(self.progress):
            return True
        return self.progress is not None and self.progress.finished(self.destinations)


@dataclass(frozen=True, slots=True)
class SendSummary:
    sent: int = 0  # destinations reached now
    failed: int = 0  # destinations that failed now (retried later, up to MAX_TRIES)
    already: int = 0  # reports done before
    nowhere: int = 0  # domains with sessions but no (valid) _smtp._tls record

    @property
    def pending(self) -> bool:
        return self.failed > 0

    def line(self) -> str:
        return (
            f"sent={self.sent} failed={self.failed} already={self.already} no_record={self.nowhere}"
        )


def tally_day(source: EventSource, day: date) -> DailyTally:
    """The day's sessions from the stored events (attempts settled that UTC day)."""
    start, _ = day_range(day)
    begin = start.timestamp()
    tally = DailyTally()
    for event in source(begin, begin + 86400.0):
        if isinstance(event, DeliveryAttempt):
            tally.add_all(reported_sessions(event))
    return tally


class TlsReporter:
    """Builds and sends the daily reports.

    Parameters:
        sender: who reports (``report_sender``); dkim_key: signs report mail, or None.
        source: the stored events (the receipt log); dns: ``_smtp._tls`` lookups.
        post: HTTPS delivery (``HttpsPoster``); mail: into our spool and queue.
        state: the sealed sent-state; clock: now; rand: jitter in [0, 1).
        hostname: for the Message-ID.
        fleet: the counts shared with other relays, or None (alone).
        flush: writes out the receipts held in memory (before a publish).
        publish_interval: seconds between two publishes of our counts to the fleet.
        fleet_delay: how long after midnight a fleet's send waits (``FLEET_DELAY``:
            longer than ``[shared] publish_interval`` may be; a test's is short).
    """

    def __init__(
        self,
        *,
        sender: ReportSender,
        dkim_key: DkimKey | None,
        source: EventSource,
        dns: TxtResolver,
        post: Post,
        mail: Mail,
        state: SentState,
        clock: Clock,
        rand: Callable[[], float],
        hostname: str,
        fleet: Fleet | None = None,
        flush: Callable[[], Awaitable[object]] | None = None,
        publish_interval: float = 300.0,
        fleet_delay: float = FLEET_DELAY,
    ) -> None:
        self._fleet, self._flush, self._publish_interval = fleet, flush, publish_interval
        self._fleet_delay = fleet_delay
        self._sender, self._dkim = sender, dkim_key
        self._source, self._dns, self._post, self._mail = source, dns, post, mail
        self._state, self._clock, self._rand = state, clock, rand
        self._hostname = hostname
        self._lock = asyncio.Lock()  # the daily run and ``mta tlsrpt send`` take turns

    async def plan(self, day: date) -> list[PlannedReport]:
        """The reports of ``day`` as they stand (one per policy domain with sessions)."""
        tally = await asyncio.to_thread(tally_day, self._source, day)
        shared = await self._fleet.share(day, tally) if self._fleet is not None else None
        planned = await plan_reports(shared or tally, day, self._sender, self._dns, self._state)
        if shared is None or self._fleet is None:
            return planned
        fleet = self._fleet
        return [
            replace(p, progress=await fleet.progress(day, p.domain) or p.progress, fleet=True)
            for p in planned
        ]

    async def publish(self, day: date) -> bool:
        """Put our counts of ``day`` into the fleet's (False: Redis away, or alone)."""
        if self._fleet is None:
            return False
        if self._flush is not None:
            await self._flush()
        return await self._fleet.publish(day, await asyncio.to_thread(tally_day, self._source, day))

    async def run_publisher(self) -> None:
        """Forever: every ``publish_interval``, today's counts, and yesterday's until
        they have been published once after midnight (its last sessions included)."""
        final: date | None = None
        while True:
            await asyncio.sleep(self._publish_interval)
            today = datetime.fromtimestamp(self._clock.now(), UTC).date()
            try:
                await self.publish(today)
                yesterday = today - timedelta(days=1)
                if final != yesterday and await self.publish(yesterday):
                    final = yesterday
            except Exception:  # a bad round must not end the loop
                log.exception("tlsrpt.publish.failed")

    async def send_day(self, day: date) -> SendSummary:
        """Send what is left of ``day``'s reports; record each destination reached."""
        async with self._lock:
            summary = SendSummary()
            for planned in await self.plan(day):
                summary = _add(summary, await self._send(planned))
            log.info("tlsrpt.sent", extra={"day": day.isoformat(), **_figures(summary)})
            return summary

    async def _send(self, planned: PlannedReport) -> SendSummary:
        if planned.record is None:
            return SendSummary(nowhere=1)
        if planned.sent:
            return SendSummary(already=1)
        if planned.fleet and self._fleet is not None:
            if not await self._fleet.claim(planned.day, planned.domain):
                return SendSummary(already=1)  # another relay is sending it now
            # The lock is ours: what was done may have changed since the plan.
            latest = await self._fleet.progress(planned.day, planned.domain)
            planned = replace(planned, progress=latest or planned.progress)
            if planned.sent:
                await self._fleet.record(
                    planned.day, planned.domain, planned.progress or Progress()
                )
                return SendSummary(already=1)
        progress = planned.progress or Progress()
        done, tries = set(progress.done), dict(progress.tries)
        sent = failed = 0
        todo = [d for d in planned.destinations if d not in done and tries.get(d, 0) < MAX_TRIES]
        https = [d for d in todo if d.startswith("https:")]
        mailto = [d for d in todo if d.startswith("mailto:")]
        for url in https:
            problem = await self._post(url, compress_report(planned.report))
            tries[url] = tries.get(url, 0) + 1
            if problem is None:
                done.add(url)
                sent += 1
            else:
                failed += 1
                log.warning(
                    "tlsrpt.post.failed",
                    extra={"domain": planned.domain, "url": url, "error": problem},
                )
        if mailto:
            problem = await self._send_mail(planned, [d.removeprefix("mailto:") for d in mailto])
            for destination in mailto:
                tries[destination] = tries.get(destination, 0) + 1
                if problem is None:
                    done.add(destination)
            sent, failed = (sent + len(mailto), failed) if problem is None else (sent, failed + 1)
        progress = Progress(frozenset(done), tries)
        self._state.save(planned.day, planned.domain, progress)
        if planned.fleet and self._fleet is not None:
            await self._fleet.record(planned.day, planned.domain, progress)
        return SendSummary(sent=sent, failed=failed)

    async def _send_mail(self, planned: PlannedReport, addresses: list[str]) -> str | None:
        now = self._clock.now()
        content = report_message(
            planned.report,
            day=planned.day,
            domain=planned.domain,
            sender=self._sender,
            to=addresses,
            now=datetime.fromtimestamp(now, UTC),
            message_id=make_msgid("tlsrpt", self._hostname),
            dkim_key=self._dkim,
        )
        # The null sender: a report that cannot be delivered bounces to no one.
        envelope = Envelope("", tuple(addresses), now, helo=self._hostname, report=True)
        try:
            qid = await self._mail(envelope, content)
        except Exception as err:  # the spool refused (full disk...): retried next run
            log.warning("tlsrpt.mail.failed", extra={"domain": planned.domain, "error": str(err)})
            return str(err)
        log.info("tlsrpt.mail.queued", extra={"qid": qid, "domain": planned.domain})
        return None

    def day_of(self, text: str) -> date:
        """A control command's day: ``YYYY-MM-DD``, or today (UTC) when empty."""
        if not text.strip():
            return datetime.fromtimestamp(self._clock.now(), UTC).date()
        return date.fromisoformat(text.strip())

    async def show_command(self, argument: str) -> str:
        """``tlsrpt-show [DAY]``: the day's reports as they stand, one JSON line."""
        return "ok " + json.dumps(show_doc(await self.plan(self.day_of(argument))))

    async def send_command(self, argument: str) -> str:
        """``tlsrpt-send [DAY]``: send what is left of the day's reports now."""
        return "ok " + (await self.send_day(self.day_of(argument))).line()

    def _jitter(self) -> float:
        delay = self._fleet_delay if self._fleet is not None else 0.0
        return delay + self._rand() * MAX_JITTER

    async def run(self) -> None:
        """Forever: after each UTC midnight plus jitter, the day before (module docstring)."""
        jitter = self._jitter()
        while True:
            now = self._clock.now()
            today = datetime.fromtimestamp(now, UTC).date()
            due = day_range(today)[0].timestamp() + jitter
            if now < due:
                await asyncio.sleep(due - now)
                continue
            try:
                summary = await self.send_day(today - timedelta(days=1))
                await asyncio.to_thread(self._state.expire, today)
            except Exception:
                log.exception("tlsrpt.run.failed")
                summary = SendSummary(failed=1)
            jitter = self._jitter()
            tomorrow = day_range(today + timedelta(days=1))[0].timestamp() + jitter
            wait = tomorrow - self._clock.now()
            if summary.pending:
                wait = min(wait, RETRY_INTERVAL)
            await asyncio.sleep(max(wait, 1.0))


async def plan_reports(
    tally: DailyTally, day: date, sender: ReportSender, dns: TxtResolver, state: SentState | None
) -> list[PlannedReport]:
    """Each policy domain's report of ``day``, where it goes and what was done."""
    planned: list[PlannedReport] = []
    for domain in tally.domains(day):
        report = render_report(
            tally,
            day,
            domain,
            organization=sender.organization,
            contact=sender.contact,
            report_id=report_id(day, domain, sender.submitter),
        )
        record = await discover(dns, domain)
        progress = await asyncio.to_thread(state.load, day, domain) if state else None
        planned.append(PlannedReport(day, domain, report, record, progress))
    return planned


def show_doc(planned: Sequence[PlannedReport]) -> list[dict[str, Any]]:
    """What ``mta tlsrpt show --json`` prints: per policy domain, the report, where it
    goes and whether that is done."""
    return [
        {
            "policy-domain": report.domain,
            "destinations": list(report.destinations),
            "status": "no-record" if report.record is None else "sent" if report.sent else "due",
            "report": report.report,
        }
        for report in planned
    ]


def _add(a: SendSummary, b: SendSummary) -> SendSummary:
    return SendSummary(
        a.sent + b.sent, a.failed + b.failed, a.already + b.already, a.nowhere + b.nowhere
    )


def _figures(summary: SendSummary) -> dict[str, int]:
    return {
        "sent": summary.sent,
        "failed": summary.failed,
        "already": summary.already,
        "no_record": summary.nowhere,
    }


def build_reporter(
    config: Config,
    *,
    hostname: str,
    dns: DnsClient,
    keyring: KeyRing,
    ssl_context: ssl.SSLContext,
    mail: Mail,
    source: EventSource,
    clock: Clock,
    fleet: Fleet | None = None,
    flush: Callable[[], Awaitable[object]] | None = None,
) -> TlsReporter:
    """The relay's reporter (``app._start``); reads the DKIM key now (``ConfigError``)."""

    async def resolve(host: str) -> list[str]:
        found = await dns.addresses(host)
        return list(found.addresses) if isinstance(found, AddressesFound) else []

    return TlsReporter(
        sender=report_sender(config, hostname),
        dkim_key=load_dkim_key(config),
        source=source,
        dns=dns,
        post=HttpsPoster(ssl_context, resolve),
        mail=mail,
        state=SentState.of_group(config, keyring, os.urandom),
        clock=clock,
        rand=random.SystemRandom().random,
        hostname=hostname,
        fleet=fleet,
        flush=flush,
        publish_interval=config.shared.publish_interval,
    )
