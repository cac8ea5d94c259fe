"""``mta run`` as two processes: one receives, one delivers (Postfix's smtpd and qmgr).

One event loop doing inbound TLS, sealing, outbound TLS and the queue for everyone is
one core: every client waits behind every delivery. So ``mta run`` forks once, before
any loop or thread exists:

- the receiving process runs the listeners; it seals and stores each message durably,
  tells the queue manager its queue id, and only then answers ``250``;
- the queue manager (the process ``mta run`` started, which keeps its pid) recovers the
  spool, schedules and delivers, and owns the control socket.

Only queue ids and operator commands cross between them (``mta.link``); mail stays in
the encrypted spool. If either dies the other stops too, and the next start recovers
the spool: the receiver dies with its parent (``PR_SET_PDEATHSIG``, and it also notices
the socket close), and the manager exits with status 1 when the receiver dies, for the
service manager to restart both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, Final

from mta import app
from mta.config import Config
from mta.control import process_stats, start_control
from mta.errors import ConfigError, MtaError
from mta.link import LinkClosed, ManagerEnd, ReceiverEnd, encode_failure, pair
from mta.model import Envelope, QueueId

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
RECEIVER_STOP_WAIT: Final = 10.0  # for the receiver to close its listeners on SIGTERM
# Without a receiver no mail comes in: deliveries in flight get this long, not the full
# shutdown grace, before the manager exits for the service manager to restart both.
ORPHANED_GRACE: Final = 5.0


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run(config: Config) -> None:
    """Prepare, fork the receiver, and run the queue manager here until told to stop."""
    prepared = app.prepare(config)
    # Some 54,000 objects from start-up (modules, the policy) would be traversed by every
    # full garbage collection: 15-28 ms with the loop stopped, all sessions waiting.
    # Frozen, they are left alone (1.6 ms measured), and the pages that hold them stay
    # shared between the two processes instead of being copied on the collector's writes.
    gc.collect()
    gc.freeze()
    manager_sock, receiver_sock = pair()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the receiving process: never returns
        manager_sock.close()
        status = 1
        try:
            _die_with(parent)
            status = run_loop(_receiver_main(config, prepared, ReceiverEnd(receiver_sock)))
        except BaseException:  # it must end here, whatever happened
            log.exception("receive.process_failed")
        finally:
            logging.shutdown()
            os._exit(status)
    receiver_sock.close()
    status = run_loop(_manager_main(config, prepared, ManagerEnd(manager_sock), pid))
    if status:
        raise MtaError("the receiving process exited; stopped (the next start recovers the spool)")


def _die_with(parent: int) -> None:
    """Let the kernel kill this process when ``parent`` dies (Linux), even by SIGKILL."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def _receiver_main(config: Config, prepared: app.Prepared, link: ReceiverEnd) -> int:
    """Listen until SIGTERM (status 0) or until the manager has gone (status 1)."""

    async def handoff(qid: QueueId, envelope: Envelope, content: bytes) -> None:
        await link.queued(qid)

    try:
        _, servers = await app.start_receiving(config, prepared, handoff)
    except (ConfigError, MtaError, OSError) as err:
        with contextlib.suppress(LinkClosed):
            await link.send(encode_failure(err))
        return 2
    await link.send(b"ready")

    def reload_keys() -> str:
        prepared.keyring.reload()
        return f"ok active={prepared.keyring.active_id}"

    def stats() -> str:
        return " ".join(f"{name}={value}" for name, value in process_stats().items())

    stop = asyncio.Event()
    _stop_on_signals(stop)
    serving = asyncio.create_task(link.serve({"reload-keys": reload_keys, "stats": stats}))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.close()
    if serving.done():
        serving.exception()  # LinkClosed: the manager's end closed; said below
    if not stop.is_set():
        log.error("receive.manager_gone", extra={"detail": "the queue manager exited"})
        return 1
    stopping.cancel()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers)), 5)
    serving.cancel()
    link.close()
    return 0


async def _manager_main(
    config: Config, prepared: app.Prepared, link: ManagerEnd, receiver: int
) -> int:
    """Recover and deliver until SIGTERM (status 0) or the receiver's death (status 1)."""
    try:
        await link.started()
        delivering, recovered = await app.start_delivering(config, prepared)
    except LinkClosed:
        _reap(receiver)
        problem = "the receiving process exited while starting (its error is logged above)"
        raise MtaError(problem) from None
    except BaseException:  # no queue manager: the receiver must not go on accepting
        _reap(receiver)
        raise
    pump = asyncio.create_task(link.pump(delivering.scheduler.adopt), name="receiver-link")

    async def receiver_stats() -> dict[str, str]:
        answer = await link.ask("stats")
        return dict(item.split("=", 1) for item in answer.split() if "=" in item)

    async def reload_receiver() -> str:
        return await link.ask("reload-keys")

    control = await start_control(
        config.control_socket,
        app.control_commands(delivering, prepared.keyring, receiver_stats, reload_receiver),
    )
    app.log_ready(config, recovered)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({pump, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status, grace = 0, app.SHUTDOWN_GRACE
    if stop.is_set():
        log.info("mta.stopping", extra={"grace_s": grace})
        with contextlib.suppress(ProcessLookupError):
            os.kill(receiver, signal.SIGTERM)
        # Messages it stores meanwhile are still handed over, until it has exited.
        with contextlib.suppress(TimeoutError, LinkClosed):
            await asyncio.wait_for(pump, RECEIVER_STOP_WAIT)
    else:
        pump.exception()  # LinkClosed: the receiver's end closed
        log.error("mta.receiver_exited", extra={"detail": "stopping; the next start recovers"})
        stopping.cancel()
        status, grace = 1, ORPHANED_GRACE
    _reap(receiver)
    await delivering.close(grace)
    control.close()
    link.close()
    log.info("mta.stopped")
    return status


def _reap(pid: int) -> None:
    """Collect the receiver's exit status, killing it if it has not exited by now."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
