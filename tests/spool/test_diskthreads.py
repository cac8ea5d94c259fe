"""The spool's disk threads: results and errors come back to the loop, a queued job runs
to its end when its waiter is cancelled, and the threads end with their owner."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from mta.spool.diskthreads import DiskThreads


def names(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_a_result_and_an_error_come_back_on_the_loop() -> None:
    threads = DiskThreads(2, "dt-result")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    async def run() -> tuple[int, str]:
        loop_thread = threading.get_ident()
        worker_thread = await threads.run(threading.get_ident)
        assert worker_thread != loop_thread  # it did run elsewhere
        with pytest.raises(OSError, match="No space"):
            await threads.run(fail)
        return await threads.run(sum, (1, 2, 3)), "ok"

    assert asyncio.run(run()) == (6, "ok")


def test_a_cancelled_waiter_leaves_its_job_to_finish_and_first_is_still_called() -> None:
    threads = DiskThreads(1, "dt-cancel")
    ran = threading.Event()
    seen: list[BaseException | None] = []

    def slow() -> None:
        time.sleep(0.2)
        ran.set()

    async def run() -> None:
        job = threads.submit(slow, first=seen.append)
        await asyncio.sleep(0.05)
        job.cancel()
        await asyncio.sleep(0.4)  # the loop runs ``first`` when the job ends

    asyncio.run(run())
    assert ran.is_set()
    assert seen == [None]


def test_the_threads_end_when_their_owner_is_gone() -> None:
    threads = DiskThreads(3, "dt-gone")
    asyncio.run(threads.run(int))
    assert len(names("dt-gone")) == 3
    del threads
    gc.collect()
    deadline = time.monotonic() + 5
    while names("dt-gone") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert names("dt-gone") == []


def test_the_waiter_gets_its_answer_even_when_first_raises() -> None:
    """``first`` (the spool's "stored" callback) failing must not leave a put hanging
    (the client would never get its reply); the loop's handler sees the error."""
    threads = DiskThreads(1, "dt-first")
    seen: list[BaseException] = []

    def broken(error: BaseException | None) -> None:
        raise RuntimeError("scheduler refused")

    async def run() -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: seen.append(context["exception"]))
        return await asyncio.wait_for(threads.submit(int, "7", first=broken), 5)

    assert asyncio.run(run()) == 7
    assert [str(error) for error in seen] == ["scheduler refused"]
