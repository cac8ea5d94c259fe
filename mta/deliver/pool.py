"""Idle outbound connections kept for the next delivery to the same peer (Postfix's scache).

A delivery that ends cleanly hands its connection back; the next delivery with exactly
the same cache key (peer address and port, MX name, the full requirement the peer was
checked against, our client identity; see ``session.cache_key``) takes it and sends
MAIL at once, without a new TCP connection or TLS handshake. Only a connection whose
last transaction ended (DATA answered) comes back here: one with its transaction still
open (every RCPT refused) is closed instead. An idle connection is closed
after ``idle_time`` seconds (Postfix's ``smtp_connection_cache_time_limit`` is 2 s) or
after ``max_uses`` transactions, and all of them at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

IDLE_TIME: Final = 2.0
MAX_USES: Final = 100


class Reusable(Protocol):
    """What the cache needs of a connection: how often it was used, and how to close it."""

    @property
    def uses(self) -> int: ...

    async def close(self) -> None: ...


Key = TypeVar("Key", bound=Hashable)
Conn = TypeVar("Conn", bound=Reusable)


@dataclass(slots=True)
class _Idle(Generic[Conn]):
    session: Conn
    until: float


class ConnectionCache(Generic[Key, Conn]):
    """Idle sessions by cache key, newest first; bounded in time and in reuse."""

    def __init__(self, idle_time: float = IDLE_TIME, max_uses: int = MAX_USES) -> None:
        self._idle_time = idle_time
        self._max_uses = max_uses
        self._idle: dict[Key, list[_Idle[Conn]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, key: Key) -> Conn | None:
        """An idle session for ``key`` that has not outlived its idle time, if any."""
        entries = self._idle.get(key)
        now = time.monotonic()
        while entries:
            idle = entries.pop()
            if idle.until > now:
                return idle.session
            self._close_later(idle.session)
        self._idle.pop(key, None)
        return None

    def give(self, key: Key, session: Conn) -> None:
        """Keep ``session`` for reuse (or close it when it has been used enough)."""
        if session.uses >= self._max_uses:
            self._close_later(session)
            return
        self._idle.setdefault(key, []).append(_Idle(session, time.monotonic() + self._idle_time))
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._idle_time, self._sweep)

    def _sweep(self) -> None:
        """Close sessions idle for too long; runs while any are cached."""
        self._sweeper = None
        now = time.monotonic()
        for key in list(self._idle):
            keep = [idle for idle in self._idle[key] if idle.until > now]
            for idle in self._idle[key]:
                if idle.until <= now:
                    self._close_later(idle.session)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_time, self._sweep)

    def _close_later(self, session: Conn) -> None:
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every idle session (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for entries in self._idle.values():
            for idle in entries:
                self._close_later(idle.session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
