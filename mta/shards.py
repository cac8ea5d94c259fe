"""The spool of a relay group: one shard per worker process, ``<spool>/shards/<k>``.

With ``[server] workers = 1`` the relay keeps the spool root as its spool, as it always
did. With N > 1 worker k owns ``shards/k`` whole: its messages, states, quarantine,
key checks, receipts and control socket; the key file stays the one shared ring.

A sealed record binds its queue id and key id (the header is the AAD of every chunk
and of the wrapped data key, ``spool.record``), never its directory, so a record is
moved between shards by a rename. ``adopt`` does that at start, before any relay
process runs: the records of directories that are no longer live (the root after a
single-process run, shards beyond N after N went down, every shard after N went
to 1) are renamed into a live one, the message first and then its state, each into
the live directory already holding its message (else one chosen by its queue id),
so a crash part way leaves nothing that the next start cannot finish. Receipt files
are not moved (each directory is one chain); they are read where they are
(``receipt_log.receipt_dirs``), and a retired one's expire with the relay's or worker
0's own (``receipt_log.retired_receipt_dirs``). Nor is the TLS-RPT sent-state: it is
the group's, at the spool root (``tlsrpt_send.SentState``).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Final

from mta import durable
from mta.config import Config
from mta.errors import SpoolError
from mta.spool.store import QID, SpoolDirectory

log = logging.getLogger(__name__)

SHARDS: Final = "shards"
LOCK_WAIT: Final = 60.0  # seconds to wait for a retired shard's draining relay


def shard_path(root: Path, index: int) -> Path:
    return root / SHARDS / str(index)


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of a group-wide limit of ``total``: the parts add up to
    ``total`` (the first ``total % workers`` workers take one more), but never less
    than 1, or a worker could not serve at all (so below ``workers`` the group's total
    is ``workers``)."""
    return max(1, total // workers + (1 if index < total % workers else 0))


def worker_config(config: Config, index: int) -> Config:
    """What worker ``index`` of a group runs with: its shard as its spool, no metrics
    listener of its own (the supervisor serves the group's), TLS reports sent by
    worker 0 alone (from every shard's receipts), and its share of each connection
    limit: an operator's ``max_per_destination = 20`` means 20 connections to that
    destination from the machine, as in Postfix, not 20 per process."""
    workers = config.server.workers

    def part(total: int) -> int:
        return share(total, workers, index)

    limits, outbound = config.limits, config.outbound
    return replace(
        config,
        spool=replace(config.spool, path=shard_path(config.spool.path, index)),
        metrics=replace(config.metrics, host=""),
        tlsrpt=replace(config.tlsrpt, enabled=config.tlsrpt.enabled and index == 0),
        limits=replace(
            limits,
            connections=part(limits.connections),
            connections_per_client=part(limits.connections_per_client),
        ),
        outbound=replace(
            outbound,
            max_connections=part(outbound.max_connections),
            max_per_destination=part(outbound.max_per_destination),
        ),
    )


def group_config(config: Config) -> Config:
    """The group's ``config`` for a worker's (its spool the root again); else itself."""
    path = config.spool.path
    if path.parent.name != SHARDS or not path.name.isdigit():
        return config
    return replace(config, spool=replace(config.spool, path=path.parent.parent))


def live_dirs(config: Config) -> list[Path]:
    """The spool directories the configured group runs on."""
    root = config.spool.path
    if config.server.workers == 1:
        return [root]
    return [shard_path(root, index) for index in range(config.server.workers)]


def spool_dirs(config: Config) -> list[Path]:
    """Every spool directory that may hold records: the root, then each shard present
    (live or retired), in shard order."""
    root = config.spool.path
    found = [root]
    with_shards = root / SHARDS
    if with_shards.is_dir():
        shards = [p for p in with_shards.iterdir() if p.name.isdigit() and p.is_dir()]
        found += sorted(shards, key=lambda p: int(p.name))
    return found


def spool_configs(config: Config) -> list[Config]:
    """``config`` once per directory of ``spool_dirs``: what the offline tools
    (``mta queue``, ``mta keys``) run over when the relay is stopped."""
    return [replace(config, spool=replace(config.spool, path=path)) for path in spool_dirs(config)]


def holds_records(config: Config) -> bool:
    """Whether any spool directory of ``config`` holds a queued message."""
    return any(SpoolDirectory(path).queue_ids() for path in spool_dirs(config))


def adopt(config: Config) -> int:
    """Move every record out of directories that are not live into live ones; returns
    how many files moved. The caller holds the spool root's lock (a single relay, or a
    group's supervisor); each retired shard is locked while it is emptied (a relay of
    the former group may still be draining it: waited for, ``LOCK_WAIT``)."""
    live = live_dirs(config)
    for path in live:
        SpoolDirectory(path).ensure_dirs()
    moved = 0
    for source in spool_dirs(config):
        if source in live or not _has_records(source):
            continue
        lock = lock_waiting(SpoolDirectory(source)) if source != config.spool.path else -1
        try:
            moved += _empty_into(SpoolDirectory(source), [SpoolDirectory(p) for p in live])
        finally:
            if lock >= 0:
                os.close(lock)
    if moved:
        log.info("spool.adopted", extra={"files": moved, "live": len(live)})
    return moved


def _has_records(path: Path) -> bool:
    spool = SpoolDirectory(path)
    return any(_names(d) for d in (spool.msg_dir, spool.state_dir, spool.quarantine_dir))


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def lock_waiting(spool: SpoolDirectory, wait: float = LOCK_WAIT) -> int:
    """``spool.lock()``, tried again for ``wait`` seconds: a relay of the group before
    this one (its supervisor gone) may still be draining it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return spool.lock()
        except SpoolError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _target(qid: str, live: list[SpoolDirectory]) -> SpoolDirectory:
    """The live directory holding ``qid``'s message already, else one by its queue id."""
    for spool in live:
        if os.path.lexists(spool.msg_dir / qid):
            return spool
    return live[zlib.crc32(qid.encode()) % len(live)]


def _empty_into(source: SpoolDirectory, live: list[SpoolDirectory]) -> int:
    moved = 0
    touched: set[Path] = set()

    def move(path: Path, into: Path) -> None:
        nonlocal moved
        if os.path.lexists(into / path.name):  # never replace: both are kept, this one aside
            log.error("spool.adopt_collision", extra={"file": str(path)})
            return
        os.rename(path, into / path.name)
        touched.update((path.parent, into))
        moved += 1

    for name in _names(source.msg_dir):  # messages first: a state follows its message
        if QID.fullmatch(name):
            move(source.msg_dir / name, _target(name, live).msg_dir)
    for name in _names(source.state_dir):
        if QID.fullmatch(name):
            move(source.state_dir / name, _target(name, live).state_dir)
    for name in _names(source.quarantine_dir):
        move(source.quarantine_dir / name, _target(name.split(".")[0], live).quarantine_dir)
    for name in _names(source.check_dir):  # key checks the live shards may lack
        for spool in live:
            if not os.path.lexists(spool.check_dir / name):
                durable.replace_durably(
                    spool.check_dir / f".{name}.adopt",
                    spool.check_dir / name,
                    (source.check_dir / name).read_bytes(),
                )
    for directory in touched:
        durable.fsync_dir(directory)
    return moved


def lock_group(config: Config) -> int:
    """The group's lock on the spool root (``SpoolDirectory.lock``), held by the
    supervisor: one relay group per spool."""
    spool = SpoolDirectory(config.spool.path)
    spool.root.mkdir(mode=durable.DIR_MODE, parents=True, exist_ok=True)
    return spool.lock()
