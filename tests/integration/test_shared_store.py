"""``SharedStore`` against a real redis-server: the commands, a bounded failure when
Redis is gone (one WARNING, fast failures during the retry pause, one INFO when back)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.shared.redis_store import RETRY_AFTER, SharedStore, Unavailable
from tests.integration.redisserver import RedisServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        yield redis
    finally:
        redis.stop()


def test_commands(server: RedisServer) -> None:
    async def run() -> None:
        store = SharedStore(server.url, 0.5)
        try:
            assert await store.get("mta:x") is None
            await store.put("mta:x", b"value", 60)
            assert await store.get("mta:x") == b"value"
            assert await store.claim("mta:lock", b"me", 60)
            assert not await store.claim("mta:lock", b"other", 60)
            await store.delete("mta:lock")
            assert await store.claim("mta:lock", b"other", 60)
            await store.hput("mta:h", "a", b"1", 60)
            await store.hput("mta:h", "b", b"2", 60)
            assert await store.hgetall("mta:h") == {b"a": b"1", b"b": b"2"}
            assert store.up is True
        finally:
            await store.close()

    asyncio.run(run())
    assert 0 < server.client().ttl("mta:h") <= 60


def test_an_outage_is_bounded_and_said_once(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[bool] = []
    now = [0.0]

    async def run() -> None:
        store = SharedStore(server.url, 0.5, on_state=states.append, monotonic=lambda: now[0])
        try:
            await store.put("mta:x", b"v", 60)
            server.stop()
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(Unavailable):
                    await store.get("mta:x")
            assert time.monotonic() - started < 1.5  # refused, then not asked again
            assert store.up is False
            server.start()
            with pytest.raises(Unavailable):  # still in the retry pause
                await store.get("mta:x")
            now[0] += RETRY_AFTER + 0.1
            assert await store.get("mta:x") is None  # a fresh server, no persistence
            assert store.up is True
        finally:
            await store.close()

    with caplog.at_level(logging.INFO, logger="mta.shared.redis_store"):
        asyncio.run(run())
    assert states == [True, False, True]
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("shared.redis.down") == 1
    assert messages.count("shared.redis.up") == 1


def test_a_silent_server_costs_one_timeout(tmp_path: Path) -> None:
    """A server that accepts and never answers (a hung Redis): bounded by the timeout."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    async def run() -> float:
        store = SharedStore(f"redis://127.0.0.1:{port}/0", 0.3)
        try:
            started = time.monotonic()
            for _ in range(10):
                with pytest.raises(Unavailable):
                    await store.get("mta:x")
            return time.monotonic() - started
        finally:
            await store.close()

    try:
        assert asyncio.run(run()) < 1.0
    finally:
        listener.close()


def test_shared_policies_are_sealed_under_hidden_names(server: RedisServer) -> None:
    from mta.policy.mta_sts import parse_policy
    from mta.policy.sts_cache import CachedPolicy
    from mta.shared.fleet_key import FleetKey
    from mta.shared.sts import SharedPolicies

    text = "version: STSv1\nmode: enforce\nmx: mx.secret-domain.example\nmax_age: 86400\n"
    entry = CachedPolicy("id1", parse_policy(text), text, 1_000.0)
    key = FleetKey(bytes(range(32)))

    class Clock:
        def now(self) -> float:
            return 2_000.0

    async def run() -> tuple[CachedPolicy | None, CachedPolicy | None, CachedPolicy | None]:
        store = SharedStore(server.url, 0.5)
        try:
            policies = SharedPolicies(store, key, Clock())
            await policies.put("secret-domain.example", entry)
            other_fleet = SharedPolicies(store, FleetKey(bytes(32)), Clock())
            return (
                await policies.get("secret-domain.example"),
                await policies.get("other.example"),
                await other_fleet.get("secret-domain.example"),
            )
        finally:
            await store.close()

    got, missing, foreign = asyncio.run(run())
    assert got == entry
    assert (missing, foreign) == (None, None)
    client = server.client()
    (name,) = client.keys("*")
    assert b"secret" not in name
    assert b"secret" not in client.get(name)
    assert 86400 - 1000 - 5 <= client.ttl(name) <= 86400 - 1000  # expires with the policy
