"""Threads that do the spool's file work (reads, writes, fsync, link, unlink) for the loop.

``concurrent.futures.ThreadPoolExecutor`` and ``asyncio.to_thread`` cost more per job
than the job's own Python: a concurrent ``Future`` with its condition variable, an
idle-thread semaphore taken on every submit, a done-callback, then a hop back to the
loop. Under load each of those Python-level locks is one more place where the event
loop's thread and a writer thread hand the interpreter lock to each other: profiles of
a busy worker showed the loop's thread in ``ThreadPoolExecutor.submit`` for 9 % of its
samples. Here a job is one ``SimpleQueue.put`` (C, no Python lock) and its outcome one
``call_soon_threadsafe``.

A job, once queued, runs to its end whatever happens to the task that queued it (a
spool write owns a file descriptor that only the job may close).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

Finished = Callable[[BaseException | None], None]
_Loop = asyncio.AbstractEventLoop
_Job = tuple[_Loop, Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", Finished | None]


class DiskThreads:
    """``count`` daemon threads, started on the first job, taking jobs in order."""

    def __init__(self, count: int, name: str) -> None:
        self._count = count
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started = False
        # Gone with us: each thread takes one None and ends (the queue is not ours alone
        # once a thread holds it, so the threads would outlive a dropped spool).
        weakref.finalize(self, _stop, self._jobs, count)

    def submit(
        self, fn: Callable[..., _T], *args: object, first: Finished | None = None
    ) -> asyncio.Future[_T]:
        """Run ``fn(*args)`` in a thread; the future gets its result or exception on
        this loop. ``first(error or None)`` is called on the loop before that, even when
        the future was cancelled meanwhile (the job's effect happened all the same)."""
        if not self._started:
            self._start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_T] = loop.create_future()
        self._jobs.put((loop, fn, args, done, first))
        return done

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a thread; its result or its exception here."""
        return await self.submit(fn, *args)

    def _start(self) -> None:
        self._started = True
        for number in range(self._count):
            name = f"{self._name}_{number}"
            threading.Thread(target=_work, args=(self._jobs,), name=name, daemon=True).start()


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        loop, fn, args, done, first = job
        result: object = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as caught:  # handed to the loop, which raises it there
            error = caught
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(_settle, done, first, result, error)
        del job, fn, args, done, first, result, error  # held by nobody while idle


def _settle(
    done: asyncio.Future[Any], first: Finished | None, result: object, error: BaseException | None
) -> None:
    try:
        if first is not None:
            first(error)
    finally:  # whatever ``first`` raised (the loop logs it), the waiter gets its answer
        if not done.cancelled():
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)


def _stop(jobs: queue.SimpleQueue[_Job | None], count: int) -> None:
    for _ in range(count):
        jobs.put(None)
