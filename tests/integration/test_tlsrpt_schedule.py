"""The fleet's scheduled TLS-RPT path, with a real ``redis-server`` and the real
classes (``TlsReporter``, ``FleetReports``, ``SharedStore``, ``HttpsPoster``), not
``mta tlsrpt send``:

- the publish loop puts a relay's day counts into Redis every ``publish_interval``
  (each round, not once), and yesterday's once more after UTC midnight;
- the daily send waits its delay after UTC midnight, then exactly one of two relays
  posts the day's report, with both relays' counts summed.

The interval and the delay are given to the constructor (a test's are a fraction of
a second; the operator's bounds in ``[shared]`` stay as they are); the clock is a
fake one that runs with real time from a chosen moment, so ``asyncio.sleep`` and
``now`` agree and no test sleeps real minutes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import pytest
import trustme

from mta.events import Event
from mta.model import Envelope, QueueId
from mta.report.tlsrpt import DailyTally, day_range
from mta.report.tlsrpt_mail import ReportSender
from mta.report.tlsrpt_send import HttpsPoster, SentState, TlsReporter
from mta.shared import fleet_key
from mta.shared.fleet_key import FleetKey
from mta.shared.redis_store import SharedStore
from mta.shared.tlsrpt import FleetReports
from mta.spool.keys import KeyRing
from tests.integration.redisserver import RedisServer
from tests.integration.stsserver import Route, StsServer
from tests.integration.test_tlsrpt_send import COLLECTOR, DAY, NOON, Dns, _attempt

DOMAIN = "https.test"
MIDNIGHT = day_range(DAY + timedelta(days=1))[0].timestamp()  # DAY's end
INTERVAL = 0.1  # publish_interval, seconds
DELAY = 1.5  # the fleet's delay after midnight, seconds
WAIT = 10.0


class RunningClock:
    """Wall-clock time that starts at ``at`` and runs with the real clock; ``set``
    jumps it (as midnight passing would)."""

    def __init__(self, at: float) -> None:
        self.set(at)

    def set(self, at: float) -> None:
        self._offset = at - time.monotonic()

    def now(self) -> float:
        return time.monotonic() + self._offset


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def key(tmp_path: Path) -> FleetKey:
    path = tmp_path / "keys" / "shared.key"
    fleet_key.create(path)
    return FleetKey.load(path)


def reporter(
    home: Path,
    *,
    fleet: FleetReports,
    events: list[Event],
    clock: RunningClock,
    dns: Dns,
    post: Callable[[str, bytes], Awaitable[str | None]],
) -> TlsReporter:
    """One relay's reporter: its own spool key and sent-state, its own events."""

    def source(start: float, end: float) -> Iterable[Event]:
        return [e for e in list(events) if start <= e.at < end]

    async def mail(_envelope: Envelope, _content: bytes) -> QueueId:
        raise AssertionError("no report goes by mail here")

    keyring = KeyRing.create(home / "keys" / "spool.key")
    return TlsReporter(
        sender=ReportSender("Fleet", "tls@relay.test", "tlsrpt-noreply@relay.test"),
        dkim_key=None,
        source=source,
        dns=dns,
        post=post,
        mail=mail,
        state=SentState(home / "spool", keyring, os.urandom),
        clock=clock,
        rand=lambda: 0.0,  # no jitter: due at midnight + the delay
        hostname="relay.test",
        fleet=fleet,
        publish_interval=INTERVAL,
        fleet_delay=DELAY,
    )


async def fleet_successes(reader: FleetReports, day: date) -> int:
    """The fleet's successful sessions to ``DOMAIN`` on ``day``, as another relay reads
    them (its own counts are none)."""
    total = await reader.share(day, DailyTally())
    assert total is not None, "Redis away"
    return sum(c.successes for c in total.policies(day, DOMAIN).values())


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(INTERVAL / 4)


async def no_post(_url: str, _body: bytes) -> str | None:
    raise AssertionError("the publish loop sends nothing")


def test_the_publish_loop_puts_our_counts_every_interval_and_yesterday_after_midnight(
    tmp_path: Path, redis: RedisServer, key: FleetKey
) -> None:
    events: list[Event] = [_attempt(DOMAIN, None)]
    clock = RunningClock(NOON)

    async def scenario() -> None:
        store = SharedStore(redis.url, 0.5)
        a = reporter(
            tmp_path / "a",
            fleet=FleetReports(store, key, "a"),
            events=events,
            clock=clock,
            dns=Dns({}),
            post=no_post,
        )
        reader = FleetReports(store, key, "reader")
        assert await fleet_successes(reader, DAY) == 0  # nothing before the loop runs
        loop = asyncio.create_task(a.run_publisher())
        try:
            await eventually(lambda: _is(fleet_successes(reader, DAY), 1), "a's first round")
            events.append(_attempt(DOMAIN, None))  # more sessions: the next round has them
            await eventually(lambda: _is(fleet_successes(reader, DAY), 2), "a's next round")

            # DAY's last session, seen first by the loop's round after midnight (no await
            # between the two lines: no round runs in between)
            events.append(_attempt_at(MIDNIGHT - 1))
            clock.set(MIDNIGHT + 1)
            await eventually(lambda: _is(fleet_successes(reader, DAY), 3), "DAY's final round")
            await asyncio.sleep(3 * INTERVAL)  # that round is over
            events.append(_attempt_at(MIDNIGHT - 2))  # written late: DAY is not published again
            await asyncio.sleep(5 * INTERVAL)
            assert await fleet_successes(reader, DAY) == 3
            assert not loop.done()
        finally:
            loop.cancel()
            await store.close()

    asyncio.run(scenario())


async def _is(value: Awaitable[int], want: int) -> bool:
    return await value == want


def _attempt_at(at: float) -> Event:
    """A successful session to ``DOMAIN``, settled at ``at``."""
    return replace(_attempt(DOMAIN, None), at=at)


def test_the_daily_send_waits_its_delay_then_one_of_two_relays_sends_the_sum(
    tmp_path: Path,
    redis: RedisServer,
    key: FleetKey,
    ca_file: Path,
    tls_ca: trustme.CA,
) -> None:
    a_events: list[Event] = [_attempt(DOMAIN, None), _attempt(DOMAIN, None)]
    b_events: list[Event] = [_attempt(DOMAIN, None), _attempt(DOMAIN, "starttls-not-supported")]
    clock = RunningClock(MIDNIGHT - 0.5)  # just before the end of DAY
    routes = {"/r": Route(200, "text/plain", "thanks")}
    with StsServer(COLLECTOR, cert=tls_ca.issue_cert("collector.test"), routes=routes) as srv:
        dns = Dns({f"_smtp._tls.{DOMAIN}": f"v=TLSRPTv1; rua=https://collector.test:{srv.port}/r"})
        post = HttpsPoster(ssl.create_default_context(cafile=str(ca_file)), dns.addresses, 10)

        async def scenario() -> float:
            stores = [SharedStore(redis.url, 0.5) for _ in range(2)]
            relays = [
                reporter(
                    tmp_path / name,
                    fleet=FleetReports(store, key, name),
                    events=events,
                    clock=clock,
                    dns=dns,
                    post=post,
                )
                for name, store, events in zip("ab", stores, (a_events, b_events), strict=True)
            ]
            tasks = [
                asyncio.create_task(job)
                for relay in relays
                for job in (relay.run(), relay.run_publisher())
            ]
            try:
                while not srv.posts:  # the moment the report arrives, on the relays' clock
                    assert clock.now() < MIDNIGHT + DELAY + WAIT, "no report sent"
                    await asyncio.sleep(0.02)
                first = clock.now()
                await asyncio.sleep(1.0)  # the other relay's turn has come and gone
                assert not any(task.done() for task in tasks)
                return first
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for store in stores:
                    await store.close()

        first = asyncio.run(scenario())
        posts = srv.posts
    assert MIDNIGHT + DELAY <= first < MIDNIGHT + DELAY + 5.0  # the delay, then soon
    assert len(posts) == 1, posts  # one relay sent; the other found it taken or done
    report = json.loads(gzip.decompress(posts[0][2]))
    (policy,) = report["policies"]
    assert report["date-range"]["start-datetime"].startswith(DAY.isoformat())
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 1,
    }
    senders = [name for name in "ab" if (tmp_path / name / "spool" / "tlsrpt").is_dir()]
    assert len(senders) == 1, senders  # the sent-state of the one that sent
