"""A relay group's spool shards: layout, and records adopted when ``workers`` changes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta import config, shards
from mta.errors import SpoolError
from mta.model import Envelope, QueueId
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolDirectory, SpoolStore

ENVELOPE = Envelope("alice@example.org", ("bob@example.net",), 1_700_000_000.0, "192.0.2.7")


def group(tmp_path: Path, workers: int) -> config.Config:
    text = f'[server]\nworkers = {workers}\n[spool]\npath = "spool"\n'
    return config.parse_text(text, "test.toml", tmp_path)


def put(path: Path, keyring: KeyRing, count: int, *, state: bool = True) -> list[QueueId]:
    """``count`` sealed messages (with a state each) in the spool directory ``path``."""
    store = SpoolStore(path, keyring)
    store.ensure_dirs()

    async def run() -> list[QueueId]:
        qids = []
        for number in range(count):
            qid = await store.put(ENVELOPE, f"Subject: {number}\r\n\r\nx\r\n".encode())
            if state:
                await store.write_state(qid, b"state")
            qids.append(qid)
        return qids

    return asyncio.run(run())


def queued(path: Path) -> set[str]:
    return set(SpoolDirectory(path).queue_ids())


def test_a_worker_runs_on_its_shard_without_a_metrics_listener(tmp_path: Path) -> None:
    cfg = group(tmp_path, 3)
    worker = shards.worker_config(cfg, 2)
    assert worker.spool.path == tmp_path / "spool" / "shards" / "2"
    assert worker.control_socket == tmp_path / "spool" / "shards" / "2" / "control.sock"
    assert worker.spool.key_file == cfg.spool.key_file  # one ring for the group
    assert not worker.metrics.enabled
    assert shards.worker_config(cfg, 0).tlsrpt.enabled  # worker 0 sends the reports
    assert not worker.tlsrpt.enabled
    assert shards.group_config(worker).spool.path == cfg.spool.path
    assert shards.group_config(cfg) is cfg


def test_a_workers_connection_limits_are_its_share_of_the_groups() -> None:
    text = (
        "[server]\nworkers = 3\n[limits]\nconnections = 100\nconnections_per_client = 2\n"
        "[outbound]\nmax_connections = 10\nmax_per_destination = 20\n"
    )
    cfg = config.parse_text(text, "test.toml", Path("/nonexistent"))
    parts = [shards.worker_config(cfg, index) for index in range(3)]
    assert [p.limits.connections for p in parts] == [34, 33, 33]
    assert [p.outbound.max_connections for p in parts] == [4, 3, 3]
    assert [p.outbound.max_per_destination for p in parts] == [7, 7, 6]
    assert [p.limits.connections_per_client for p in parts] == [1, 1, 1]  # never 0


@given(st.integers(1, 10_000), st.integers(1, 256))
def test_the_shares_add_up_to_the_limit_and_none_is_zero(total: int, workers: int) -> None:
    parts = [shards.share(total, workers, index) for index in range(workers)]
    assert min(parts) >= 1
    assert max(parts) - min(parts) <= 1
    assert sum(parts) == max(total, workers)


def test_live_and_present_directories(tmp_path: Path) -> None:
    one, two = group(tmp_path, 1), group(tmp_path, 2)
    assert shards.live_dirs(one) == [tmp_path / "spool"]
    assert shards.live_dirs(two) == [shards.shard_path(tmp_path / "spool", k) for k in (0, 1)]
    for k in (0, 1, 10):
        shards.shard_path(tmp_path / "spool", k).mkdir(parents=True)
    found = shards.spool_dirs(one)
    assert found == [
        tmp_path / "spool",
        *(shards.shard_path(tmp_path / "spool", k) for k in (0, 1, 10)),
    ]


def test_going_from_three_workers_to_one_and_back_to_two_keeps_every_record(
    tmp_path: Path,
) -> None:
    keyring = KeyRing.create(tmp_path / "keys" / "spool.key")
    three = group(tmp_path, 3)
    every = set()
    for k in range(3):
        every |= set(put(shards.shard_path(three.spool.path, k), keyring, 4))
    quarantined = shards.shard_path(three.spool.path, 2) / "quarantine" / "Q1.msg"
    quarantined.write_bytes(b"bad")

    one = group(tmp_path, 1)
    assert shards.adopt(one) == 12 * 2 + 1
    assert queued(one.spool.path) == every
    assert {p.name for p in (one.spool.path / "state").iterdir()} == every
    assert (one.spool.path / "quarantine" / "Q1.msg").read_bytes() == b"bad"
    for k in range(3):
        assert not queued(shards.shard_path(one.spool.path, k))

    two = group(tmp_path, 2)
    assert shards.adopt(two) == 12 * 2 + 1
    live = shards.live_dirs(two)
    assert queued(live[0]) | queued(live[1]) == every
    assert queued(live[0]), "spread by queue id"
    assert queued(live[1]), "spread by queue id"
    for path in live:  # each state beside its message, and every record still opens
        store = SpoolStore(path, keyring)
        assert {p.name for p in store.state_dir.iterdir()} == queued(path)
        for qid in store.queue_ids():
            assert asyncio.run(store.read(qid))[0] == ENVELOPE
    assert not queued(two.spool.path)
    assert shards.adopt(two) == 0  # nothing left to move


def test_a_state_follows_its_message_already_moved(tmp_path: Path) -> None:
    """A crash between moving a message and its state: the next start puts the state
    in the shard that holds the message, whatever the queue id would pick."""
    keyring = KeyRing.create(tmp_path / "keys" / "spool.key")
    two = group(tmp_path, 2)
    (qid,) = put(two.spool.path, keyring, 1)
    for k in (0, 1):
        SpoolDirectory(shards.shard_path(two.spool.path, k)).ensure_dirs()
    elsewhere = shards.shard_path(two.spool.path, 1)
    os.rename(two.spool.path / "msg" / qid, elsewhere / "msg" / qid)  # as if cut short
    shards.adopt(two)
    assert (elsewhere / "state" / qid).exists()
    assert not (two.spool.path / "state" / qid).exists()


def test_a_record_is_never_moved_over_another(tmp_path: Path) -> None:
    keyring = KeyRing.create(tmp_path / "keys" / "spool.key")
    one = group(tmp_path, 1)
    retired = shards.shard_path(one.spool.path, 0)
    (qid,) = put(retired, keyring, 1, state=False)
    SpoolDirectory(one.spool.path).ensure_dirs()
    (one.spool.path / "msg" / qid).write_bytes(b"already here")
    assert shards.adopt(one) == 0
    assert (retired / "msg" / qid).exists()
    assert (one.spool.path / "msg" / qid).read_bytes() == b"already here"


def test_a_retired_shard_held_by_a_draining_relay_is_waited_for(tmp_path: Path) -> None:
    keyring = KeyRing.create(tmp_path / "keys" / "spool.key")
    one = group(tmp_path, 1)
    retired = shards.shard_path(one.spool.path, 0)
    put(retired, keyring, 1)
    held = SpoolDirectory(retired).lock()
    with pytest.raises(SpoolError, match="in use by another mta run"):
        shards.lock_waiting(SpoolDirectory(retired), 0.3)
    threading.Timer(0.5, os.close, (held,)).start()  # the old relay has drained
    started = time.monotonic()
    assert shards.adopt(one) == 2
    assert time.monotonic() - started >= 0.4
