"""Two relays sharing state through a real redis-server (``[shared] redis_url``).

The DNSSEC lab (knot + unbound) publishes an MTA-STS domain whose TLS reports go to
an HTTPS collector, and a plaintext-only domain whose reports go by mail; a real
``redis-server`` on loopback is started for each test, two relay processes (each with
its own data directory and spool, one fleet key) use it. What must hold:

- one HTTPS policy fetch serves both relays (counted at the policy server);
- a day's traffic through both relays gives exactly one report per policy domain,
  with the summed counts, whichever relay is asked to send first;
- Redis stopped mid-run: every message still goes, each relay keeps its counts and
  reports them (no report lost), and says once that Redis is gone;
- nothing in Redis names a domain, in a key or in a value.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.shared import fleet_key
from tests.integration.redisserver import RedisServer
from tests.integration.relayproc import RelayProcess, run_mta, wait_until
from tests.integration.reportlab import (
    PLAIN,
    REPORT_PATH,
    STS,
    WAIT,
    Lab,
    posted,
    report_lab,
    send,
    wait_counts,
)
from tests.integration.stsserver import POLICY_PATH, Route
from tests.report.tlsrpt_checks import parse_report_mail


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with report_lab(tmp_path_factory.mktemp("fleet-lab")) as started:
        yield started


@dataclass
class Fleet:
    redis: RedisServer
    relays: list[RelayProcess]


@pytest.fixture
def workers_a() -> int:
    """Relay a's ``[server] workers`` (a test may make it a group)."""
    return 1


@pytest.fixture
def fleet(lab: Lab, tmp_path: Path, workers_a: int) -> Iterator[Fleet]:
    """A fresh redis-server and two relays using it, with one fleet key."""
    key = tmp_path / "keys" / "shared.key"
    fleet_key.create(key)
    redis = RedisServer(tmp_path / "redis")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    relays = [
        RelayProcess(
            tmp_path / name,
            lab.relay_policy() + f'[shared]\nredis_url = "{redis.url}"\nkey_file = "{key}"\n'
            f'timeout = "0.5s"\npublish_interval = "1s"\n',
            workers=workers_a if name == "a" else 1,
        )
        for name in ("a", "b")
    ]
    try:
        redis.start()
        for relay in relays:
            relay.start()
        yield Fleet(redis, relays)
    finally:
        for relay in relays:
            relay.stop()
        redis.stop()


def assert_nothing_named(redis: RedisServer) -> None:
    client = redis.client()
    keys = client.keys("*")
    assert keys, "nothing was shared"
    for name in keys:
        assert name.startswith(b"mta:")
        values = [client.get(name)] if client.type(name) == b"string" else []
        values += list(client.hgetall(name).values()) if client.type(name) == b"hash" else []
        for blob in [name, *values]:
            assert b"fleet.test" not in blob
            assert b"mx." not in blob


def test_one_policy_fetch_serves_both_relays(lab: Lab, fleet: Fleet, tmp_path: Path) -> None:
    fetched = lab.policy.requests.count(POLICY_PATH)
    delivered = len(lab.mx[STS].messages)
    a, b = fleet.relays
    send(a, STS, 1)
    lab.mx[STS].wait_for(delivered + 1, WAIT)
    send(b, STS, 2)
    got = lab.mx[STS].wait_for(delivered + 3, WAIT)
    assert all(m.tls_version in ("TLSv1.2", "TLSv1.3") for m in got[delivered:])
    assert lab.policy.requests.count(POLICY_PATH) == fetched + 1
    assert "sts.policy.fetched" in a.log
    assert "sts.policy.shared" in b.log
    assert "sts.policy.fetched" not in b.log
    # mta check from a fresh data directory (no cache file) sees the fleet's policy too
    checked = run_mta("check", STS, "--json", "--config", str(a.policy_file), home=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "mode: enforce" in checked.stdout or '"enforce"' in checked.stdout, checked.stdout
    assert lab.policy.requests.count(POLICY_PATH) == fetched + 1
    assert_nothing_named(fleet.redis)


@pytest.mark.parametrize("workers_a", [1, 2], ids=["relay", "group"])
def test_one_report_per_domain_with_the_summed_counts(lab: Lab, fleet: Fleet) -> None:
    """Relay a once alone, once a 2-worker group (worker 0 publishes every shard's)."""
    posts, mails = len(lab.collector.posts), len(lab.reports.messages)
    delivered = len(lab.mx[STS].messages)
    a, b = fleet.relays
    send(a, STS, 3)
    send(a, PLAIN, 2)  # plaintext only: deferred, a starttls-not-supported session each
    send(b, STS, 2)
    send(b, PLAIN, 3)
    lab.mx[STS].wait_for(delivered + 5, WAIT)
    want = {STS: (5, 0), PLAIN: (0, 5)}
    wait_counts(b, want)  # b sees a's counts, and a b's: each published its own
    wait_counts(a, want)

    with ThreadPoolExecutor(2) as pool:  # both at once: the lock decides, per domain
        results = list(pool.map(lambda r: r.mta("tlsrpt", "send").stdout.strip(), (a, b)))
    figures = [
        dict(f.split("=") for f in line.removeprefix("tlsrpt: ").split()) for line in results
    ]
    assert sum(int(f["sent"]) for f in figures) == 2, results
    assert sum(int(f["already"]) for f in figures) == 2, results

    (report,) = posted(lab, posts)
    assert report["organization-name"] == "Fleet Test"
    (policy,) = report["policies"]
    assert policy["policy"]["policy-domain"] == STS
    assert policy["summary"] == {
        "total-successful-session-count": 5,
        "total-failure-session-count": 0,
    }
    (mail,) = lab.reports.wait_for(mails + 1, WAIT)[mails:]
    message, plain = parse_report_mail(mail.content)
    assert message["TLS-Report-Domain"] == PLAIN
    (detail,) = plain["policies"][0]["failure-details"]
    assert detail["result-type"] == "starttls-not-supported"
    assert detail["failed-session-count"] == 5

    again = [r.mta("tlsrpt", "send").stdout.strip() for r in (a, b)]
    assert again == ["tlsrpt: sent=0 failed=0 already=2 no_record=0"] * 2
    assert len(lab.collector.posts) == posts + 1
    assert len(lab.reports.messages) == mails + 1
    assert_nothing_named(fleet.redis)


def test_redis_stopped_mid_run_loses_no_mail_and_no_report(lab: Lab, fleet: Fleet) -> None:
    posts = len(lab.collector.posts)
    delivered = len(lab.mx[STS].messages)
    a, b = fleet.relays
    send(a, STS, 2)
    lab.mx[STS].wait_for(delivered + 2, WAIT)
    wait_counts(b, {STS: (2, 0)})  # shared while Redis ran

    fleet.redis.stop()
    send(a, STS, 2)
    send(b, STS, 3)
    lab.mx[STS].wait_for(delivered + 7, WAIT)  # every message went
    wait_counts(a, {STS: (4, 0)})  # each relay's own counts, kept locally
    wait_counts(b, {STS: (3, 0)})
    sent = [r.mta("tlsrpt", "send").stdout.strip() for r in (a, b)]
    assert sent == ["tlsrpt: sent=1 failed=0 already=0 no_record=0"] * 2
    reports = posted(lab, posts)
    total = sum(r["policies"][0]["summary"]["total-successful-session-count"] for r in reports)
    assert total == 7  # every session reported: each relay its own

    for relay in (a, b):
        assert relay.log.count("shared.redis.down") == 1, relay.log
        assert "shared.redis.up" not in relay.log
    fleet.redis.start()  # the same port: each relay says once that it is back
    for relay in (a, b):
        wait_until(lambda r=relay: "shared.redis.up" in r.log, WAIT, "Redis back in the log")
        assert relay.log.count("shared.redis.down") == 1


def test_a_failed_destination_is_retried_by_the_other_relay(lab: Lab, fleet: Fleet) -> None:
    """What was done is shared: the relay that sends next retries only what failed."""
    posts, mails = len(lab.collector.posts), len(lab.reports.messages)
    a, b = fleet.relays
    send(a, STS, 1)
    send(b, PLAIN, 1)
    want = {STS: (1, 0), PLAIN: (0, 1)}
    wait_counts(a, want)
    wait_counts(b, want)
    lab.collector.set_route(REPORT_PATH, Route(503, "text/plain", "later"))
    try:
        first = a.mta("tlsrpt", "send").stdout.strip()
    finally:
        lab.collector.set_route(REPORT_PATH, Route(200, "text/plain", "thanks"))
    assert first == "tlsrpt: sent=1 failed=1 already=0 no_record=0"
    second = b.mta("tlsrpt", "send").stdout.strip()
    assert second == "tlsrpt: sent=1 failed=0 already=1 no_record=0"  # the POST only
    assert len(lab.collector.posts) == posts + 2  # the 503, then the retry
    (report,) = posted(lab, posts + 1)
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    lab.reports.wait_for(mails + 1, WAIT)
    assert [r.mta("tlsrpt", "send").stdout.strip() for r in (a, b)] == [
        "tlsrpt: sent=0 failed=0 already=2 no_record=0"
    ] * 2
    assert len(lab.reports.messages) == mails + 1
