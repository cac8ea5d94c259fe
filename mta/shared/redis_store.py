"""Redis as the relays' shared store, behind timeouts: it may be slow or gone, mail
must not wait for it.

Every call is bounded (``[shared] timeout`` to connect and to answer, and the same
again around the whole call). A failed call raises ``Unavailable`` and the caller
uses its local state; then, for ``RETRY_AFTER`` seconds, calls fail at once without
touching the network, so a blackholed Redis costs one timeout per ``RETRY_AFTER``, not
one per message. The store says once when Redis goes away (WARNING) and once when it
is back (INFO), and tells ``on_state`` (the ``mta_shared_state_up`` gauge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

RETRY_AFTER: Final = 5.0  # seconds a failed Redis is not asked again
T = TypeVar("T")


class Unavailable(Exception):
    """Redis did not answer in time (or refused): use the local state."""


def _no_state(_up: bool) -> None:
    """The default observer: no gauge."""


class SharedStore:
    """The few Redis commands the shared state needs, each bounded and fallible.

    Parameters:
        url: ``[shared] redis_url``.
        timeout: seconds to connect and to answer (``[shared] timeout``).
        on_state: told True/False when Redis comes back or goes away (and once at the
            first call).
        monotonic: the clock of the retry pause.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        on_state: Callable[[bool], None] = _no_state,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry_on_timeout=False,
            retry=None,
            health_check_interval=0,
        )
        self._timeout = timeout
        self._on_state = on_state
        self._monotonic = monotonic
        self._up: bool | None = None  # unknown until the first call
        self._retry_at = 0.0

    @property
    def up(self) -> bool | None:
        """Whether the last call reached Redis (None: no call yet)."""
        return self._up

    async def get(self, name: str) -> bytes | None:
        return await self._call(lambda: self._client.get(name))

    async def get_opened(self, name: str, unseal: Callable[[str, bytes], bytes]) -> bytes | None:
        """The value under ``name`` opened by ``unseal``: None when there is none or Redis
        is away (a miss, as for a relay alone); a value that does not open raises
        ``unseal``'s error, for the caller to name in its warning."""
        try:
            sealed = await self.get(name)
        except Unavailable:
            return None
        return None if sealed is None else unseal(name, sealed)

    async def put(self, name: str, value: bytes, ttl: float) -> None:
        """SET with an expiry (whole seconds, at least one)."""
        await self._call(lambda: self._client.set(name, value, ex=_seconds(ttl)))

    async def claim(self, name: str, value: bytes, ttl: float) -> bool:
        """SET NX EX: True when the key was ours to set (a lock taken)."""
        got = await self._call(lambda: self._client.set(name, value, nx=True, ex=_seconds(ttl)))
        return bool(got)

    async def delete(self, name: str) -> None:
        await self._call(lambda: self._client.delete(name))

    async def hput(self, name: str, field: str, value: bytes, ttl: float) -> None:
        """HSET one field and (re)set the hash's expiry, in one transaction."""

        async def run() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(name, field, value)
                pipe.expire(name, _seconds(ttl))
                await pipe.execute()

        await self._call(run)

    async def hgetall(self, name: str) -> dict[bytes, bytes]:
        got: dict[bytes, bytes] = await self._call(lambda: self._client.hgetall(name))
        return got

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._client.aclose(), self._timeout)

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        if self._up is False and self._monotonic() < self._retry_at:
            raise Unavailable("redis unavailable (waiting to retry)")
        try:
            async with asyncio.timeout(2 * self._timeout):
                result = await command()
        except (RedisError, OSError, TimeoutError) as err:
            self._went(False, f"{type(err).__name__}: {err}".splitlines()[0][:200])
            self._retry_at = self._monotonic() + RETRY_AFTER
            raise Unavailable(str(err)) from None
        self._went(True, "")
        return result

    def _went(self, up: bool, error: str) -> None:
        if self._up is up:
            return
        if not up:
            log.warning("shared.redis.down", extra={"error": error, "fallback": "local state"})
        elif self._up is False:
            log.info("shared.redis.up")
        self._up = up
        self._on_state(up)


def _seconds(ttl: float) -> int:
    return max(1, int(ttl))
