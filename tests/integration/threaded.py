"""A test server that runs its own event loop in a background thread.

Subclasses set ``host`` and ``_loop``/``_error`` from ``_run(ready)``, which binds the
socket, sets ``ready`` and runs the loop until ``stop()`` stops it.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Final, Self

START_TIMEOUT: Final = 10.0


class ThreadedServer:
    """Start (returns once bound, or raises why not), stop (idempotent), context manager."""

    kind = "server"  # for thread names and errors
    host: str
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _error: BaseException | None = None

    def _run(self, ready: threading.Event) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        """Listen; returns once the socket is bound (raises if it cannot be)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.kind} already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"{self.kind}-{self.host}", daemon=True
        )
        self._thread.start()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError(f"{self.kind} on {self.host} did not start in {START_TIMEOUT}s")
        if self._error is not None:
            self._thread.join(START_TIMEOUT)
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        """Stop listening, drop open connections and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{self.kind} on {self.host} did not stop")
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
