"""The receipt log on disk: batching, day files, a torn tail at start, expiry, readers."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from mta import config, shards
from mta.events import Event
from mta.model import QueueId
from mta.report import receipt_log
from mta.report.receipt_log import (
    ReceiptLog,
    day_files,
    events_for,
    key_references,
    read_events,
    retired_receipt_dirs,
    verify,
)
from mta.report.receipts import Frame, walk
from mta.spool.keys import KeyRing
from tests.test_events import ATTEMPT, RECEIVED

DAY = 86400.0
T0 = 1_709_251_200.0  # 2024-03-01T00:00:00Z


class FakeClock:
    def __init__(self, now: float) -> None:
        self.moment = now

    def now(self) -> float:
        return self.moment


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    return KeyRing.create(keys / "spool.key")


def _event(number: int, at: float) -> Event:
    base = RECEIVED if number % 2 == 0 else ATTEMPT
    return replace(base, qid=QueueId(f"q{number}"), at=at)


def _open(
    directory: Path, keyring: KeyRing, clock: FakeClock, max_age: float = 30 * DAY
) -> ReceiptLog:
    return ReceiptLog.open(directory, keyring, max_age=max_age, clock=clock)


def test_events_are_held_in_memory_until_a_flush_writes_them(
    tmp_path: Path, keyring: KeyRing
) -> None:
    directory = tmp_path / "receipts"
    clock = FakeClock(T0 + 60)
    log = _open(directory, keyring, clock)
    for number in range(5):
        log(_event(number, T0 + number))
    assert log.pending == 5
    assert day_files(directory) == []  # the sink itself never touches the disk
    assert asyncio.run(log.flush()) == 5
    assert log.pending == 0
    assert day_files(directory) == ["2024-03-01"]
    assert list(read_events(directory, keyring, T0, T0 + DAY)) == [
        _event(n, T0 + n) for n in range(5)
    ]
    assert stat.S_IMODE((directory / "2024-03-01").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_full_batch_wakes_the_flush_task_early(
    tmp_path: Path, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receipt_log, "INTERVAL", 3600.0)  # only the batch can wake it
    monkeypatch.setattr(receipt_log, "BATCH", 3)
    directory = tmp_path / "receipts"
    log = _open(directory, keyring, FakeClock(T0 + 60))

    async def go() -> int:
        task = asyncio.create_task(log.run())
        for number in range(3):
            log(_event(number, T0 + number))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if log.pending == 0 and day_files(directory):
                break
        written = len(list(read_events(directory, keyring, T0, T0 + DAY)))
        log(_event(3, T0 + 3))  # below the batch: written by the cancelled task's flush
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return written

    assert asyncio.run(go()) == 3
    assert len(list(read_events(directory, keyring, T0, T0 + DAY))) == 4


def test_every_flush_is_fsynced(
    tmp_path: Path, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(receipt_log.os, "fsync", fsync)
    log = _open(tmp_path / "r", keyring, FakeClock(T0 + 60))
    log(_event(0, T0))
    asyncio.run(log.flush())
    assert len(synced) >= 2  # the file, and the directory the new file is in
    log(_event(1, T0 + 1))
    before = len(synced)
    asyncio.run(log.flush())
    assert len(synced) == before + 1


def test_a_restart_continues_the_chain_across_days(tmp_path: Path, keyring: KeyRing) -> None:
    directory = tmp_path / "receipts"
    clock = FakeClock(T0 + 60)
    first = _open(directory, keyring, clock)
    first(_event(0, T0 + 1))
    first(_event(1, T0 + DAY + 1))  # the next day: a new file, anchored to the first
    asyncio.run(first.flush())
    second = _open(directory, keyring, clock)
    second(_event(2, T0 + DAY + 2))
    second(_event(3, T0 + 2 * DAY + 2))
    asyncio.run(second.flush())
    assert day_files(directory) == ["2024-03-01", "2024-03-02", "2024-03-03"]
    verdict = verify(directory, keyring, now=T0 + 2 * DAY, max_age=30 * DAY)
    assert (verdict.bad, verdict.entries, verdict.files) == (None, 4 + 3, 3)
    assert [e.qid for e in read_events(directory, keyring, T0 + DAY, T0 + 2 * DAY)] == [
        "q1",
        "q2",
    ]


def test_a_torn_tail_is_cut_off_at_start_with_one_warning(
    tmp_path: Path, keyring: KeyRing, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "receipts"
    clock = FakeClock(T0 + 60)
    log = _open(directory, keyring, clock)
    for number in range(3):
        log(_event(number, T0 + number))
    asyncio.run(log.flush())
    path = directory / "2024-03-01"
    whole = path.stat().st_size
    data = path.read_bytes()
    last = [item for item in walk(io.BytesIO(data).read) if isinstance(item, Frame)][-1]
    with path.open("ab") as handle:  # a crash in the middle of appending an entry
        handle.write(data[last.offset : -20])
    with caplog.at_level(logging.WARNING):
        again = _open(directory, keyring, clock)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["receipts.torn_tail_truncated"]
    assert path.stat().st_size == whole
    again(_event(3, T0 + 3))
    asyncio.run(again.flush())
    verdict = verify(directory, keyring, now=T0, max_age=30 * DAY)
    assert (verdict.bad, verdict.entries) == (None, 5)


def test_files_older_than_max_age_expire_and_the_rest_still_verify(
    tmp_path: Path, keyring: KeyRing
) -> None:
    directory = tmp_path / "receipts"
    clock = FakeClock(T0)
    log = _open(directory, keyring, clock, max_age=2 * DAY)
    for day in range(4):
        log(_event(day, T0 + day * DAY + 5))
    asyncio.run(log.flush())  # on 2024-03-01: nothing has expired yet
    assert len(day_files(directory)) == 4
    clock.moment = T0 + 4 * DAY  # 2024-03-05: keep 03-03 and later
    log(_event(9, clock.moment))
    asyncio.run(log.flush())
    assert day_files(directory) == ["2024-03-03", "2024-03-04", "2024-03-05"]
    verdict = verify(directory, keyring, now=clock.moment, max_age=2 * DAY)
    assert (verdict.bad, verdict.files) == (None, 3)


def test_a_retired_directory_expires_with_ours(tmp_path: Path, keyring: KeyRing) -> None:
    """A group's former directory is no chain of ours, but ``max_age`` holds for it."""
    retired = tmp_path / "old" / "receipts"
    clock = FakeClock(T0)
    old = _open(retired, keyring, clock)
    for day in range(3):
        old(_event(day, T0 + day * DAY + 5))
    asyncio.run(old.flush())
    clock.moment = T0 + 4 * DAY  # 2024-03-05: keep 03-03 and later
    log = ReceiptLog.open(
        tmp_path / "receipts", keyring, max_age=2 * DAY, clock=clock, retired=[retired]
    )
    log(_event(9, clock.moment))
    asyncio.run(log.flush())
    assert day_files(retired) == ["2024-03-03"]


def test_the_relay_or_worker_0_expires_the_retired_directories(tmp_path: Path) -> None:
    def parsed(workers: int) -> config.Config:
        text = f'[server]\nworkers = {workers}\n[spool]\npath = "spool"\n'
        return config.parse_text(text, "test.toml", tmp_path)

    spool = tmp_path / "spool"
    for k in (0, 1, 2):
        shards.shard_path(spool, k).mkdir(parents=True)
    assert retired_receipt_dirs(parsed(1)) == [
        shards.shard_path(spool, k) / "receipts" for k in (0, 1, 2)
    ]
    two = parsed(2)
    assert retired_receipt_dirs(shards.worker_config(two, 0)) == [
        spool / "receipts",
        shards.shard_path(spool, 2) / "receipts",
    ]
    assert retired_receipt_dirs(shards.worker_config(two, 1)) == []


def test_read_events_opens_only_the_files_of_the_window(tmp_path: Path, keyring: KeyRing) -> None:
    directory = tmp_path / "receipts"
    log = _open(directory, keyring, FakeClock(T0))
    for day in range(5):
        log(_event(day, T0 + day * DAY + 5))
    asyncio.run(log.flush())
    (directory / "2024-03-01").write_bytes(b"garbage that would be logged if it were read")
    assert [e.qid for e in read_events(directory, keyring, T0 + DAY, T0 + 3 * DAY)] == [
        "q1",
        "q2",
    ]


def test_events_for_one_message_and_key_references(tmp_path: Path, keyring: KeyRing) -> None:
    directory = tmp_path / "receipts"
    log = _open(directory, keyring, FakeClock(T0))
    log(replace(RECEIVED, qid=QueueId("a"), at=T0))
    log(replace(RECEIVED, qid=QueueId("b"), at=T0 + 1))
    log(replace(ATTEMPT, qid=QueueId("a"), at=T0 + 2))
    asyncio.run(log.flush())
    assert [type(e).__name__ for e in events_for(directory, keyring, "a")] == [
        "MessageReceived",
        "DeliveryAttempt",
    ]
    assert key_references(directory) == {keyring.active_id: 4}  # the anchor too


def test_events_for_reads_each_directory_of_a_group(tmp_path: Path, keyring: KeyRing) -> None:
    """A message received by a single relay, then adopted by a group's shard: both
    directories' events, each read where it is (not the last directory's path)."""
    root, shard = tmp_path / "receipts", tmp_path / "shards" / "1" / "receipts"
    before = _open(root, keyring, FakeClock(T0))
    before(replace(RECEIVED, qid=QueueId("a"), at=T0))
    asyncio.run(before.flush())
    after = _open(shard, keyring, FakeClock(T0 + 1))
    after(replace(ATTEMPT, qid=QueueId("a"), at=T0 + 1))
    asyncio.run(after.flush())
    assert [type(e).__name__ for e in events_for([root, shard], keyring, "a")] == [
        "MessageReceived",
        "DeliveryAttempt",
    ]


def test_a_failed_write_leaves_no_torn_entry_and_keeps_the_events(
    tmp_path: Path, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "receipts"
    log = _open(directory, keyring, FakeClock(T0))
    log(_event(0, T0))
    asyncio.run(log.flush())
    real = os.fsync

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(receipt_log.os, "fsync", full)
    log(_event(1, T0 + 1))
    assert asyncio.run(log.flush()) == 0
    assert log.pending == 1
    monkeypatch.setattr(receipt_log.os, "fsync", real)
    assert asyncio.run(log.flush()) == 1
    verdict = verify(directory, keyring, now=T0, max_age=30 * DAY)
    assert (verdict.bad, verdict.entries) == (None, 3)


@pytest.mark.parametrize(
    ("raw", "max_age", "problem"),
    [
        ({}, 30 * DAY, None),
        ({"max_age": "7d"}, 7 * DAY, None),
        ({"max_age": "1d"}, None, "receipts.max_age: must be at least 2d"),
        ({"max_age": "soon"}, None, "receipts.max_age"),
        ({"enabled": False}, None, "receipts.enabled"),
    ],
)
def test_the_receipts_table(
    raw: dict[str, object], max_age: float | None, problem: str | None
) -> None:
    from mta import config
    from mta.errors import ConfigError

    if problem is None:
        parsed = config.validate({"receipts": raw}, "t.toml", Path("/var/lib/mta"))
        assert parsed.receipts.max_age == max_age
        return
    with pytest.raises(ConfigError) as caught:
        config.validate({"receipts": raw}, "t.toml", Path("/var/lib/mta"))
    assert problem in str(caught.value)
