"""``mta run`` with ``[server] workers = N > 1``: a supervisor over N relay processes.

Shared nothing: worker k is the whole relay of ``mta.app`` (receive, spool, schedule,
deliver) on its own spool shard (``mta.shards``), with its own listening sockets bound
with SO_REUSEPORT so the kernel spreads the connections. The supervisor, like
Postfix's ``master``, does no mail work: it locks the spool root (one group per
spool), adopts the records of shards no longer live, creates the key file and the
self-signed certificates once (before workers could race to), then starts the
workers (``python -m mta worker``) and keeps them running:

- a worker that dies is started again after a short backoff, said at ERROR;
- SIGTERM or SIGINT: SIGTERM to every worker, which drain as a single relay does;
  the supervisor exits once all have;
- SIGHUP, or ``mta reload``: the policy is checked here first, then each worker
  reloads (``group_control``);
- if the supervisor dies, even by SIGKILL, each worker sees end of file on its
  channel (a socket pair whose other end only the supervisor holds) and drains.

The operator's commands go to the group control socket in the spool root and are
fanned out (``group_control``); ``[metrics] listen`` is the supervisor's, serving the
workers' merged metrics (``report.group_metrics``) and worker 0's transparency page
(made from every shard's receipts). The supervisor never opens the spool keys: it
may run as root, and it reads no mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry

from mta import app, privileges, shards
from mta import reload as reloading
from mta.config import DEFAULT_POLICY_NAME, Config
from mta.errors import ConfigError, KeyFileError, MtaError
from mta.group_control import GroupControl
from mta.receive.tls import ensure_self_signed
from mta.report.group_metrics import GroupCollector
from mta.report.http import MetricsServer, start_http
from mta.spool.keys import KeyRing

log = logging.getLogger(__name__)

BACKOFF_MIN: Final = 0.5  # seconds before a dead worker is started again...
BACKOFF_MAX: Final = 10.0  # ...doubling while it keeps dying young, up to this
STEADY: Final = 10.0  # seconds up after which a worker counts as having started well
STOP_WAIT: Final = app.SHUTDOWN_GRACE + 15.0  # then a worker that has not drained is killed
READY_WAIT: Final = 60.0  # for every worker's first ``ready``


class GroupFailed(MtaError):
    """A worker did not start: the group does not either (the worker said why, on
    stderr, in its one line); ``status`` is the worker's exit status."""

    def __init__(self, worker: int, status: int) -> None:
        super().__init__(f"worker {worker} did not start (exit status {status})")
        self.worker, self.status = worker, status


@dataclass
class Slot:
    """Worker ``index``: its process and its end of the channel, while it runs."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None


def worker_argv(config: Config, index: int, fd: int) -> list[str]:
    """How worker ``index`` is started: this Python, this policy file, its shard."""
    argv = [sys.executable, "-m", "mta", "worker", "--shard", str(index), "--channel", str(fd)]
    if config.source != f"(embedded {DEFAULT_POLICY_NAME})":
        argv += ["--config", config.source]
    if config.server.allow_root:
        argv.append("--allow-root")
    return argv


def prepare(config: Config) -> int:
    """Before any worker: lock the spool root, adopt retired shards' records, create
    the key file (only for an empty spool, as ``app.open_keyring``) and self-signed
    certificates; as root with ``server.user``, all of it as that user. Returns the
    lock's descriptor."""
    account = privileges.account_for(config, os.geteuid())
    if account is not None:  # the data directory and spool made, or given, to the user
        privileges.hand_over(config, account)
    with privileges.acting_as(account):
        return _prepare(config)


def _prepare(config: Config) -> int:
    lock = shards.lock_group(config)
    try:
        shards.adopt(config)
        key_file = config.spool.key_file
        if not key_file.exists() and not key_file.is_symlink():
            if shards.holds_records(config):
                raise KeyFileError(
                    f"{key_file}: missing, but the spool holds messages; "
                    "restore the key file (refusing to start)"
                )
            KeyRing.create(key_file)
        if any(not listener.tls_chains for listener in config.listeners):
            ensure_self_signed(config.home / "tls", app.hostname_of(config))
    except BaseException:
        os.close(lock)
        raise
    return lock


class Supervisor:
    """The running group: its workers' slots, control socket and metrics listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots = [Slot(index) for index in range(config.server.workers)]
        self.stopping = asyncio.Event()
        self.keepers: list[asyncio.Task[None]] = []
        self.control = GroupControl(
            [shards.worker_config(config, s.index).control_socket for s in self.slots],
            [shards.shard_path(config.spool.path, s.index) for s in self.slots],
            check_reload=self.check_reload,
        )

    async def spawn(self, slot: Slot) -> None:
        ours, theirs = socket.socketpair()
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *worker_argv(self.config, slot.index, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        slot.channel = ours
        log.info("mta.worker.started", extra={"worker": slot.index, "pid": slot.proc.pid})

    async def until_ready(self, slot: Slot) -> bool:
        """Wait for ``ready`` on the channel; False if the worker ended first."""
        assert slot.channel is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            if (await loop.sock_recv(slot.channel, 64)).startswith(b"ready"):
                return True
        return False

    async def keep(self, slot: Slot) -> None:
        """Keep worker ``slot`` running until the group stops."""
        backoff = BACKOFF_MIN
        while True:
            assert slot.proc is not None
            started = time.monotonic()
            status = await slot.proc.wait()
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None
            if self.stopping.is_set():
                return
            if time.monotonic() - started > STEADY:
                backoff = BACKOFF_MIN
            log.error(
                "mta.worker.died",
                extra={"worker": slot.index, "status": status, "restart_in_s": backoff},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
                return  # stopped meanwhile
            backoff = min(backoff * 2, BACKOFF_MAX)
            await self.spawn(slot)
            if await self.until_ready(slot):
                log.info("mta.worker.restarted", extra={"worker": slot.index})

    async def start_all(self) -> None:
        """Every worker, each until it says ready; ``GroupFailed`` if one ends first."""
        for slot in self.slots:
            await self.spawn(slot)
        firsts = [asyncio.create_task(self.until_ready(slot)) for slot in self.slots]
        done = await asyncio.wait_for(asyncio.gather(*firsts), READY_WAIT)
        failed = [slot for slot, ok in zip(self.slots, done, strict=True) if not ok]
        if failed:
            assert failed[0].proc is not None
            status = await failed[0].proc.wait()
            await self.stop_all()
            raise GroupFailed(failed[0].index, status)
        self.keepers = [asyncio.create_task(self.keep(slot)) for slot in self.slots]

    async def stop_all(self) -> None:
        """SIGTERM to each worker; wait for all to drain (killed after ``STOP_WAIT``)."""
        self.stopping.set()
        running = [slot.proc for slot in self.slots if slot.proc is not None]
        for proc in running:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                await asyncio.wait_for(proc.wait(), STOP_WAIT)
            except TimeoutError:
                log.error("mta.worker.killed", extra={"pid": proc.pid, "after_s": STOP_WAIT})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self.keepers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()

    async def check_reload(self) -> str | None:
        """The policy read again and held to the restart-only rule, before any worker
        is asked: one line, or None when the workers may reload it."""
        try:
            new = await asyncio.to_thread(app.reread, self.config)
        except (ConfigError, OSError) as err:
            return str(err)
        refused = reloading.refusal(self.config, new)
        return None if refused is None else str(refused)

    async def serve_metrics(self) -> MetricsServer | None:
        if not self.config.metrics.enabled:
            return None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GroupCollector(self.control.sockets))
        return await start_http(
            self.config.metrics, registry, self.control.report_page, source=self.config.source
        )


async def supervise(config: Config) -> None:
    """Run the group until SIGTERM or SIGINT, then stop it gracefully."""
    lock = await asyncio.to_thread(prepare, config)
    try:
        supervisor = Supervisor(config)
        # A taken metrics port stops the start here, before any worker accepts mail.
        metrics_http = await supervisor.serve_metrics()
        control = await supervisor.control.start(config.control_socket)
        account = privileges.account_for(config, os.geteuid())
        if account is not None:  # the operator's commands run as the user (README)
            os.chown(config.control_socket, account.uid, account.gid)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reloads: set[asyncio.Task[str]] = set()

        def hangup() -> None:  # SIGHUP: as ``mta reload``; the workers log the outcome
            task = asyncio.create_task(_reload(supervisor), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, hangup)
        try:
            await supervisor.start_all()
            log.info(
                "mta.ready",
                extra={
                    "workers": config.server.workers,
                    "listen": ",".join(
                        f"{lc.address}:{lc.port}/{lc.mode}" for lc in config.listeners
                    ),
                    "spool": str(config.spool.path),
                },
            )
            await stop.wait()
            log.info("mta.stopping", extra={"grace_s": app.SHUTDOWN_GRACE})
        finally:
            await supervisor.stop_all()
            control.close()
            if metrics_http is not None:
                await metrics_http.close()
        log.info("mta.stopped")
    finally:
        os.close(lock)


async def _reload(supervisor: Supervisor) -> str:
    answer = await supervisor.control.reload()
    if not answer.startswith("ok"):
        log.error("mta.reload_refused", extra={"error": answer.removeprefix("error").strip()})
    return answer


def run(config: Config) -> None:
    """Entry point for ``mta run`` with more than one worker."""
    refusal = privileges.root_refusal(config, os.geteuid())
    if refusal is not None:
        raise refusal
    try:
        asyncio.run(supervise(config))
    except GroupFailed as failed:  # the worker's one line is on stderr already
        log.error("mta.group.failed", extra={"worker": failed.worker, "status": failed.status})
        raise SystemExit(failed.status) from None
