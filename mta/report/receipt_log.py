"""The receipt log on disk: sealed, chained entries (``receipts``), one file per UTC day.

``ReceiptLog`` is an ``EventSink``: taking an event only appends it to a list, so the
hot path pays nothing measurable. A flush task seals, chains, writes and fsyncs the
list every ``INTERVAL`` seconds or ``BATCH`` events, in a thread (like the spool's
writes): a crash loses at most the last second of receipts, never the chain. Files are
``<spool.path>/receipts/YYYY-MM-DD`` (0600, the directory 0700); each starts with an
anchor naming the previous file's end, and files older than ``[receipts] max_age`` are
removed. At start a torn final entry (a crash mid-append) is cut off, with a warning.

Readers (``read_events``, ``events_for``, ``verify``) need only the key ring: with the
relay running, ``flush_running`` asks it to write out what it holds first.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from mta import control, shards
from mta import durable as _files
from mta.clock import Clock
from mta.config import Config
from mta.events import Event
from mta.report.receipts import (
    GENESIS,
    Anchor,
    BadEntry,
    Frame,
    Link,
    Tail,
    Verifier,
    anchor_entry,
    event_entry,
    open_frame,
    walk,
)
from mta.spool.keys import KeyRing
from mta.spool.record import RecordError, read_header

__all__ = [
    "ReceiptLog",
    "Verdict",
    "events_for",
    "flush_running",
    "key_references",
    "read_events",
    "receipts_dir",
    "verify",
]

log = logging.getLogger(__name__)

INTERVAL: Final = 1.0  # seconds between flushes
BATCH: Final = 1000  # events that wake the flush early
MAX_PENDING: Final = 200_000  # events held while the disk refuses them; more are dropped
FLUSH_WAIT: Final = 30.0  # seconds a CLI waits for the running relay's flush
_DAY: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_OPEN: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_READ: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def receipts_dir(config: Config) -> Path:
    """Where the receipt files are: beside the queue, sealed under the same keys."""
    return config.spool.path / "receipts"


Directories = Path | Sequence[Path]
"""One receipt directory, or several read as one log (a relay group's shards)."""


def receipt_dirs(config: Config) -> list[Path]:
    """Every receipt directory of the relay or relay group ``config`` belongs to: the
    spool root's and each shard's (``mta.shards``), each its own chain. A worker's
    configuration names its shard; the group's directories are read all the same."""
    return [receipts_dir(c) for c in shards.spool_configs(shards.group_config(config))]


def retired_receipt_dirs(config: Config) -> list[Path]:
    """The receipt directories of spool directories the group no longer runs on (the
    root's after 1 -> N workers, shards beyond N), for the relay or worker 0 alone to
    expire (``ReceiptLog``); another worker's is empty."""
    group = shards.group_config(config)
    live = shards.live_dirs(group)
    if config.spool.path != live[0]:
        return []
    return [receipts_dir(c) for c in shards.spool_configs(group) if c.spool.path not in live]


def _dirs(directories: Directories) -> list[Path]:
    return [directories] if isinstance(directories, Path) else list(directories)


def day_name(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).date().isoformat()


def day_files(directory: Path) -> list[str]:
    """The receipt files' names (UTC days), oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _DAY.fullmatch(name))


def _frames(path: Path) -> Iterator[Frame | Tail]:
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        return  # expired while we looked
    with os.fdopen(fd, "rb") as handle:
        yield from walk(handle.read)


def oldest_kept(now: float, max_age: float) -> str:
    """The oldest day file that has not expired at ``now``."""
    return day_name(now - max_age)


# --- writing ---


class ReceiptLog:
    """The event sink that keeps every event in the sealed, chained day files.

    Build it with ``open`` (off the loop: it reads the newest file's frames), run
    ``run()`` as a task; cancelling the task flushes what is left. ``retired``: receipt
    directories no relay writes any more (``retired_receipt_dirs``), still read; their
    day files expire with ours, so ``[receipts] max_age`` holds for them too.
    """

    def __init__(
        self,
        directory: Path,
        keyring: KeyRing,
        *,
        max_age: float,
        clock: Clock,
        link: Link,
        file: str | None,
        random: Callable[[int], bytes] = os.urandom,
        retired: Sequence[Path] = (),
    ) -> None:
        self.directory = directory
        self._retired = list(retired)
        self._keyring = keyring
        self._max_age = max_age
        self._clock = clock
        self._link = link
        self._file = file  # the newest file with entries
        self._random = random
        self._pending: list[Event] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._dropped = 0
        self._expired_on = ""

    @classmethod
    def open(
        cls,
        directory: Path,
        keyring: KeyRing,
        *,
        max_age: float,
        clock: Clock,
        random: Callable[[int], bytes] = os.urandom,
        retired: Sequence[Path] = (),
    ) -> ReceiptLog:
        """Make the directory, cut a torn tail off the newest file and find the chain's
        end, so this run continues it."""
        directory.mkdir(mode=_files.DIR_MODE, parents=True, exist_ok=True)
        os.chmod(directory, _files.DIR_MODE)
        link, file = _recover(directory)
        return cls(
            directory,
            keyring,
            max_age=max_age,
            clock=clock,
            link=link,
            file=file,
            random=random,
            retired=retired,
        )

    def __call__(self, event: Event) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._dropped += 1
            return
        self._pending.append(event)
        if len(self._pending) >= BATCH:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Flush every ``INTERVAL`` seconds (sooner when ``BATCH`` events wait)."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), INTERVAL)
                self._wake.clear()
                await self.flush()
        except asyncio.CancelledError:
            await self.flush()
            raise

    async def flush(self) -> int:
        """Write out every event held; returns how many were written."""
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch and self._expired_on == day_name(self._clock.now()):
                return 0
            try:
                await asyncio.to_thread(self._write, batch, self._clock.now())
            except OSError as err:
                self._pending[:0] = batch[: MAX_PENDING - len(self._pending)]
                log.error(
                    "receipts.write_failed",
                    extra={"dir": str(self.directory), "error": err.strerror or str(err)},
                )
                return 0
            if self._dropped:
                log.error("receipts.dropped", extra={"events": self._dropped})
                self._dropped = 0
            return len(batch)

    def _write(self, batch: list[Event], now: float) -> None:
        """Seal, chain, write and fsync ``batch`` (in a thread); then expire old files."""
        key_id = self._keyring.active_id
        kek = self._keyring.get(key_id)
        if kek is None:  # unreachable: the active key is in the ring
            raise OSError(f"active key {key_id} missing")
        link, file = self._link, self._file
        out: dict[str, list[bytes]] = {}
        for event in batch:
            # The file of the event's day, never an older one than the chain is in.
            day = max(day_name(event.at), file or "")
            if day != file:
                entry, link = anchor_entry(
                    Anchor(file, link), key_id=key_id, kek=kek, random=self._random
                )
                out.setdefault(day, []).append(entry)
                file = day
            entry, link = event_entry(link, event, key_id=key_id, kek=kek, random=self._random)
            out.setdefault(day, []).append(entry)
        for day, entries in out.items():
            self._append(self.directory / day, b"".join(entries))
        self._link, self._file = link, file
        today = day_name(now)
        if self._expired_on != today:
            for directory in (self.directory, *self._retired):
                expire(directory, oldest_kept(now, self._max_age))
            self._expired_on = today

    def _append(self, path: Path, data: bytes) -> None:
        fd = os.open(path, _OPEN, _files.FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no torn entry left behind to chain past
                raise
        finally:
            os.close(fd)
        if size == 0:
            _files.fsync_dir(path.parent)


def _recover(directory: Path) -> tuple[Link, str | None]:
    """The chain's end (the last entry of the newest file that has one); a torn tail is
    cut off first (WARNING), damage is left for ``mta receipts verify`` (ERROR)."""
    for name in reversed(day_files(directory)):
        path = directory / name
        last: Frame | None = None
        for item in _frames(path):
            if isinstance(item, Frame):
                last = item
            elif item.torn:
                size = path.stat().st_size
                os.truncate(path, item.offset)
                log.warning(
                    "receipts.torn_tail_truncated",
                    extra={"file": str(path), "offset": item.offset, "bytes": size - item.offset},
                )
            else:
                log.error(
                    "receipts.damaged",
                    extra={"file": str(path), "entry": item.index, "problem": item.problem},
                )
        if last is not None:
            return last.link, name
        _files.unlink_quietly(path)  # nothing but a torn anchor: start the day afresh
    return GENESIS, None


def expire(directory: Path, keep_from: str) -> list[str]:
    """Remove the day files older than ``keep_from``; returns their names."""
    gone = [name for name in day_files(directory) if name < keep_from]
    for name in gone:
        _files.unlink_quietly(directory / name)
    if gone:
        log.info("receipts.expired", extra={"files": ",".join(gone)})
    return gone


# --- reading ---


def read_events(
    directories: Directories, keyring: KeyRing, start: float, end: float
) -> Iterator[Event]:
    """The stored events with ``start <= at < end`` (epoch seconds), oldest first
    (several directories: merged by time).

    Reads only the files that can hold them (an event is in the file of its day or a
    later one). Entries are authenticated one by one; the chain is ``verify``'s job.
    A torn tail ends a file quietly; damage is logged and the file left there.
    """
    each = [_read_one(d, keyring, start, end) for d in _dirs(directories)]
    return each[0] if len(each) == 1 else heapq.merge(*each, key=lambda event: event.at)


def _read_one(directory: Path, keyring: KeyRing, start: float, end: float) -> Iterator[Event]:
    first = day_name(start)
    after = (datetime.fromtimestamp(end, UTC).date() + timedelta(days=1)).isoformat()
    for name in day_files(directory):
        if first <= name <= after:
            for event in _file_events(directory / name, keyring):
                if start <= event.at < end:
                    yield event


def events_for(directories: Directories, keyring: KeyRing, qid: str) -> Iterator[Event]:
    """Every stored event of one message, oldest first (headers say whose: only its
    entries are opened). A message's events are all in its shard's directory, unless
    it was adopted by another shard: then merged by time."""
    each = [_directory_events(d, keyring, qid) for d in _dirs(directories)]
    return heapq.merge(*each, key=lambda event: event.at)


def _directory_events(directory: Path, keyring: KeyRing, qid: str) -> Iterator[Event]:
    """One directory's events of ``qid``, oldest first. A function, not a generator
    expression in a loop: that would read every file under the loop's last directory."""
    for name in day_files(directory):
        yield from _file_events(directory / name, keyring, qid)


def _file_events(path: Path, keyring: KeyRing, qid: str | None = None) -> Iterator[Event]:
    for item in _frames(path):
        if isinstance(item, Tail):
            if not item.torn:
                log.warning(
                    "receipts.damaged",
                    extra={"file": str(path), "entry": item.index, "problem": item.problem},
                )
            return
        try:
            if qid is not None and read_header(item.sealed).qid != qid:
                continue
            opened, _ = open_frame(item, keyring.get)
        except (RecordError, ValueError) as err:
            log.warning(
                "receipts.unreadable",
                extra={"file": str(path), "entry": item.index, "problem": str(err)},
            )
            continue
        if opened.event is not None:
            yield opened.event


def key_references(directories: Directories) -> dict[str, int]:
    """Key id -> receipt entries sealed under it (headers only): ``mta keys prune``
    keeps these keys until their files expire."""
    counts: dict[str, int] = {}
    for directory, name in ((d, n) for d in _dirs(directories) for n in day_files(d)):
        for item in _frames(directory / name):
            if isinstance(item, Frame):
                with contextlib.suppress(RecordError):
                    key_id = read_header(item.sealed).key_id
                    counts[key_id] = counts.get(key_id, 0) + 1
    return counts


@dataclass(frozen=True, slots=True)
class Verdict:
    entries: int
    files: int
    bad: BadEntry | None


def verify(directory: Path, keyring: KeyRing, *, now: float, max_age: float) -> Verdict:
    """Check the whole chain, oldest file first; the first bad entry, if any."""
    names = day_files(directory)
    verifier = Verifier(keyring.get, oldest_kept(now, max_age))
    try:
        for number, name in enumerate(names, start=1):
            verifier.check_file(name, _frames(directory / name), last=number == len(names))
    except BadEntry as bad:
        return Verdict(verifier.entries, verifier.files, bad)
    return Verdict(verifier.entries, verifier.files, None)


def flush_running(config: Config) -> None:
    """Ask a running relay to write out the receipts it holds; quiet when none runs."""
    answer = control.ask(config.control_socket, "receipts-flush", timeout=FLUSH_WAIT)
    if answer is not None and not answer.startswith("ok"):
        log.warning("receipts.flush_refused", extra={"answer": answer})
