"""The durable, encrypted spool: one sealed file per queued message, one per its state.

``put`` returns only once the sealed message is on stable storage (temp file, fsync,
link into ``msg/``, fsync of ``msg/``), so ``250 OK`` is never said for mail a
crash could lose. Nothing in clear reaches the disk: file contents are records
(``spool.record``) and file names are random queue ids. Records that fail to parse
or authenticate raise ``SpoolCorrupt``; the caller moves them to ``quarantine/``
(Postfix's ``corrupt`` queue), never retries them. Blocking file work runs in a
thread, never on the event loop; the one exception is ``put``'s write into the page
cache (see there).

Layout (directories 0700, files 0600)::

    root/msg/<qid>                     sealed message (kind 1)
    root/state/<qid>                   sealed delivery state (kind 2), once written
    root/tmp/<qid>[.<random>]          being written; removed by ``sweep_tmp`` at start
    root/quarantine/<qid>.msg|.state   records that failed to open
    root/keys/<key id>                 key check (kind 3): known plaintext sealed under
                                       each key this spool has had (``keycheck``)

``rewrap`` re-seals the records still under an older key under the active one, one
file at a time (temp file, fsync, rename, fsync of the directory): after a crash each
record is the old one or the new one, both readable while the older key is kept.
Within the relay it holds the queue id's lock, as ``write_state``, ``remove`` and
``quarantine`` do, so it never writes back a state or a message from before them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mta import durable as _files
from mta.errors import SpoolError, SpoolFull
from mta.model import Envelope, QueueId
from mta.spool.diskthreads import DiskThreads
from mta.spool.envelope import decode_message_parts, encode_envelope
from mta.spool.keys import KeyRing
from mta.spool.record import (
    CHUNK_SIZE,
    MAX_HEADER_SIZE,
    TAG_SIZE,
    Opener,
    RecordError,
    RecordHeader,
    RecordKind,
    Sealer,
    read_header,
    unseal,
    unwrap_data_key,
)

log = logging.getLogger(__name__)

QID: Final = re.compile(r"[A-Za-z0-9]{1,64}")
QID_LENGTH: Final = 20
# The spool's disk threads (every read, write, fsync and removal): enough for every
# session of a busy listener to have its fsync in flight at once.
SPOOL_WRITERS: Final = 16
_NO_SPACE: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
SEALED_CHUNK_SIZE: Final = CHUNK_SIZE + TAG_SIZE  # a message record is read this much at a time

Random = Callable[[int], bytes]


def random_qid(random: Random = os.urandom) -> QueueId:
    """A fresh queue id: 20 lower-case base32 characters (100 random bits)."""
    return QueueId(base64.b32encode(random(15)).decode("ascii").lower()[:QID_LENGTH])


@contextlib.contextmanager
def _storage_errors(action: str, qid: str) -> Iterator[None]:
    """Translate ``OSError`` into ``SpoolError`` (the one place the store does it)."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or errno.errorcode.get(err.errno or 0, "I/O error")
        # A file that is not there is the caller's news to judge (``mta queue list``
        # races with deliveries); anything else is the disk's, and an operator's.
        level = logging.DEBUG if isinstance(err, FileNotFoundError) else logging.ERROR
        log.log(level, "spool.io_error", extra={"action": action, "qid": qid, "error": reason})
        # Only a lack of space is "insufficient storage" (452 4.3.1); EIO and the rest
        # are a local error (451 4.3.0), as Postfix's cleanup says.
        error = SpoolFull if err.errno in _NO_SPACE else SpoolError
        raise error(f"cannot {action} {qid}: {reason}") from err


class SpoolDirectory:
    """The spool's directories and the scans that need no key (``mta keys list``, start-up checks).

    Parameters:
        root: the spool directory (``spool.path``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.msg_dir = root / "msg"
        self.state_dir = root / "state"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        self.check_dir = root / "keys"

    def ensure_dirs(self) -> None:
        """Create the spool directories (0700), tightening them if they exist."""
        dirs = (self.msg_dir, self.state_dir, self.tmp_dir, self.quarantine_dir, self.check_dir)
        for path in (self.root, *dirs):
            path.mkdir(mode=_files.DIR_MODE, parents=True, exist_ok=True)
            os.chmod(path, _files.DIR_MODE)

    def lock(self) -> int:
        """Take the spool for this process: ``flock`` on its directory. A second ``mta run``
        on the same spool would try every message twice (and sweep the other's temporary
        files). Returns the descriptor that holds the lock; closing it releases it, and so
        does the process's end, even by SIGKILL."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            problem = f"{self.root}: in use by another mta run (one relay per spool)"
            raise SpoolError(problem) from None
        return fd

    def queue_ids(self) -> list[QueueId]:
        """Every stored message, oldest first (by the time its file was written)."""
        found = [(mtime, name) for name, mtime in _records(self.msg_dir)]
        return [QueueId(name) for _, name in sorted(found)]

    def key_references(self) -> dict[str, int]:
        """Key id -> how many records (queued, state or quarantined) are sealed under it.

        Reads headers only. Records that are not records reference nothing; a header
        that cannot be read raises ``SpoolError`` rather than count as none.
        """
        counts: dict[str, int] = {}
        for directory in (self.msg_dir, self.state_dir, self.quarantine_dir):
            for name, _ in _records(directory, any_name=directory == self.quarantine_dir):
                key_id = _key_id_of(directory / name)
                if key_id is not None:
                    counts[key_id] = counts.get(key_id, 0) + 1
        return counts

    def queued_references(self) -> dict[str, list[QueueId]]:
        """Key id -> the queue id of each queued record (``msg/``, ``state/``) sealed
        under it: a qid appears twice when its message and its state are. Quarantined
        records are left out: quarantine is outside the queue and never stops the relay.
        Headers only; errors as ``key_references``."""
        found: dict[str, list[QueueId]] = {}
        for directory in (self.msg_dir, self.state_dir):
            for name, _ in _records(directory):
                key_id = _key_id_of(directory / name)
                if key_id is not None:
                    found.setdefault(key_id, []).append(QueueId(name))
        return found

    def key_trials(self, keys: Callable[[str], bytes | None]) -> tuple[set[str], set[str]]:
        """(ids whose key opens at least one queued record, ids whose key failed one).

        Reads headers only (``msg/`` and ``state/``) and tries each record's wrapped data
        key until one opens. Ids ``keys`` lacks are in neither set.
        """
        opened: set[str] = set()
        failed: set[str] = set()
        for directory in (self.msg_dir, self.state_dir):
            for name, _ in _records(directory):
                header = _header_of(directory / name)
                if header is None or header.key_id in opened:
                    continue
                kek = keys(header.key_id)
                if kek is None:
                    continue
                try:
                    unwrap_data_key(header, kek)
                except RecordError:
                    failed.add(header.key_id)
                else:
                    opened.add(header.key_id)
        return opened, failed

    def keys_opening_nothing(self, keys: Callable[[str], bytes | None]) -> list[str]:
        """Key ids under which queued records are sealed but whose key (``keys``) opens
        none of them: the key file holds a different key under that id.

        A key that opens some of its records is the right one; the others are corrupt
        and are quarantined when read. Ids ``keys`` lacks are left out.
        """
        opened, failed = self.key_trials(keys)
        return sorted(failed - opened)

    def sweep_tmp(self) -> None:
        """At start: remove half-written temp files, and states whose message is gone."""
        with _storage_errors("sweep", "tmp"):
            for entry in os.scandir(self.tmp_dir):
                _files.unlink_quietly(Path(entry.path))
            for name, _ in _records(self.state_dir):
                if not os.path.lexists(self.msg_dir / name):
                    _files.unlink_quietly(self.state_dir / name)
            _files.fsync_dir(self.tmp_dir)
            _files.fsync_dir(self.state_dir)


class SpoolStore(SpoolDirectory):
    """The spool under ``root``: sealed messages and delivery states.

    Parameters:
        root: the spool directory (``spool.path``).
        keyring: the key-encryption keys; the active one seals new records.
        random: source of random bytes for data keys, nonces and temp names.
        new_qid: makes a fresh queue id (default: ``random_qid`` over ``random``).
    """

    def __init__(
        self,
        root: Path,
        keyring: KeyRing,
        *,
        random: Random = os.urandom,
        new_qid: Callable[[], QueueId] | None = None,
    ) -> None:
        super().__init__(root)
        self.keyring = keyring
        self._random = random
        self._new_qid = new_qid or (lambda: random_qid(random))
        self._writers = DiskThreads(SPOOL_WRITERS, "spool-write")
        self._locks = _QidLocks()

    # --- messages ---

    async def put(
        self,
        envelope: Envelope,
        content: bytes,
        stored: Callable[[QueueId], None] | None = None,
    ) -> QueueId:
        """Seal and store a message durably; return its queue id. ``SpoolError`` on failure.

        ``stored(qid)`` is called, on the loop, once the record is durable, before
        ``put`` returns; and also when the caller was cancelled meanwhile (the client
        hung up before its ``250``): the record is in ``msg/`` then all the same, and
        must be scheduled, not left for the next restart.

        Sealing and writing into the page cache happen here, on the loop; only the waits
        for the disk (``durable.settle``: fsync, link into ``msg/``, fsync of ``msg/``)
        go to one of ``SPOOL_WRITERS`` threads. Each hop to a thread and each system call
        made there waits for the interpreter lock, which a busy loop holds: under load
        every such wait cost milliseconds of acknowledgement latency. Concurrent puts
        fsync in parallel, and the file system's journal commits them together (group
        commit). A put that fails leaves nothing behind, and a record is in ``msg/``
        durably before ``put`` returns.
        """
        qid = self._new_qid()  # 100 random bits, and settle() never links over a name
        _check_qid(qid)
        # Sealed chunk by chunk as it is written: neither the payload (envelope and
        # content) nor the record is ever whole in memory, only ``content`` itself.
        record = self._sealer(RecordKind.MESSAGE, qid).stream((encode_envelope(envelope), content))
        tmp = self.tmp_dir / qid
        with _storage_errors("store", qid):
            fd = _files.create_written_pieces(tmp, record)
        # The thread owns ``fd`` from here and runs to the end whatever happens to this
        # task (closing the fd here could hand its number to the next put).

        def first(error: BaseException | None) -> None:
            if error is None and stored is not None:
                stored(qid)

        await self._writers.submit(self._settle, fd, tmp, qid, first=first)
        log.info("spool.stored", extra={"qid": qid, "key_id": self.keyring.active_id})
        return qid

    def _settle(self, fd: int, tmp: Path, qid: QueueId) -> None:
        try:
            with _storage_errors("store", qid):
                _files.settle(fd, tmp, self.msg_dir / qid)  # FileExistsError: id collision
        finally:
            os.close(fd)

    async def read(self, qid: QueueId) -> tuple[Envelope, bytes]:
        """The envelope and content of a stored message (``SpoolCorrupt`` if bad)."""
        return await self._writers.run(self._read_message, qid)

    def _read_message(self, qid: QueueId) -> tuple[Envelope, bytes]:
        """Read and opened a sealed chunk at a time, the content joined once at the end:
        a 1 MiB message is held twice at most (its opened chunks, then the content), not
        four times (the file, the chunks, the payload, the content cut out of it)."""
        _check_qid(qid)
        opener = Opener(kind=RecordKind.MESSAGE, qid=qid, keys=self.keyring.get)
        plain: list[bytes] = []
        with _corrupt(RecordKind.MESSAGE, qid):
            pieces = _files.read_pieces(self.msg_dir / qid, SEALED_CHUNK_SIZE)
            with _storage_errors("read", qid), contextlib.closing(pieces):
                for piece in pieces:
                    plain += opener.feed(piece)
            plain.append(opener.close())
        return decode_message_parts(plain)

    # --- delivery state ---

    async def write_state(self, qid: QueueId, payload: bytes) -> None:
        """Replace the delivery state of ``qid`` atomically and durably."""
        async with self._locks.hold(qid):
            await self._writers.run(self._write_state, qid, payload)

    def _write_state(self, qid: QueueId, payload: bytes) -> None:
        _check_qid(qid)
        record = self._seal(RecordKind.STATE, qid, payload)
        with _storage_errors("write state of", qid):
            self._write(qid, self.state_dir / qid, record)

    async def read_state(self, qid: QueueId) -> bytes | None:
        """The delivery state of ``qid``; None when none has been written yet."""
        return await self._writers.run(self._read_state, qid)

    def _read_state(self, qid: QueueId) -> bytes | None:
        _check_qid(qid)
        with _storage_errors("read state of", qid):
            try:
                data = _files.read_file(self.state_dir / qid)
            except FileNotFoundError:
                return None
        return self._unseal(RecordKind.STATE, qid, data)

    # --- removal ---

    async def remove(self, qid: QueueId) -> None:
        """Delete a finished message and its state (the message first: an orphan state
        is harmless and swept at start, an orphan message would be delivered again)."""
        async with self._locks.hold(qid):
            await self._writers.run(self._remove, qid)

    def _remove(self, qid: QueueId) -> None:
        _check_qid(qid)
        with _storage_errors("remove", qid):
            # Not fsynced: a removal lost in a crash only means one more delivery of a
            # message that was in flight, never a lost one (Postfix does the same).
            _files.unlink_quietly(self.msg_dir / qid)
            _files.unlink_quietly(self.state_dir / qid)
        log.debug("spool.removed", extra={"qid": qid})

    async def quarantine(self, qid: QueueId, reason: str) -> None:
        """Move a message and its state to ``quarantine/``, durably; it is never retried.

        ``reason`` is logged; it must not hold message content.
        """
        async with self._locks.hold(qid):
            await self._writers.run(self._quarantine, qid)
        log.warning("spool.quarantined", extra={"qid": qid, "reason": reason})

    async def quarantine_foreign(self, qid: QueueId, key_id: str) -> None:
        """Quarantine a message with a record sealed under ``key_id``, a key this spool
        never had (copied from another relay, a flipped bit): the one alert for it."""
        async with self._locks.hold(qid):
            await self._writers.run(self._quarantine, qid)
        log.error(
            "spool.foreign_record",
            extra={"qid": qid, "key_id": key_id, "action": "quarantined"},
        )

    def _quarantine(self, qid: QueueId) -> None:
        _check_qid(qid)
        moves = ((self.msg_dir, ".msg"), (self.state_dir, ".state"))
        with _storage_errors("quarantine", qid):
            for directory, suffix in moves:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(directory / qid, self.quarantine_dir / f"{qid}{suffix}")
            _files.fsync_dir(self.quarantine_dir)
            for directory, _ in moves:
                _files.fsync_dir(directory)

    # --- re-wrap ---

    async def rewrap(self) -> RewrapResult:
        """Re-seal every queued record still under an older key under the active one,
        so the older keys can be pruned. The queue id, the payload (delivery state
        included) and the file's time stay as they were; a record that does not open
        is left alone (its message is quarantined when it is next read)."""
        active = self.keyring.active_id
        rewrapped = failed = 0
        for qid in self.queue_ids():
            async with self._locks.hold(qid):
                done, bad = await self._writers.run(self._rewrap, qid, active)
            rewrapped += done
            failed += bad
        log.info(
            "spool.rewrapped", extra={"key_id": active, "records": rewrapped, "failed": failed}
        )
        return RewrapResult(rewrapped, failed)

    def _rewrap(self, qid: QueueId, active: str) -> tuple[int, int]:
        done = failed = 0
        for directory, kind in (
            (self.msg_dir, RecordKind.MESSAGE),
            (self.state_dir, RecordKind.STATE),
        ):
            path = directory / qid
            header = _header_of(path)
            if header is None or header.key_id == active:
                continue  # gone (delivered), not a record (read will say), or done
            with _storage_errors("re-wrap", qid):
                try:
                    info = os.stat(path, follow_symlinks=False)
                    data = _files.read_file(path)
                except FileNotFoundError:
                    continue
            try:
                payload = self._unseal(kind, qid, data)
            except RecordError:
                failed += 1
                continue
            record = self._seal(kind, qid, payload)
            tmp = self.tmp_dir / f"{qid}.{self._random(6).hex()}"
            with _storage_errors("re-wrap", qid):
                _files.replace_durably(tmp, path, record, mtime_ns=info.st_mtime_ns)
            log.debug("spool.rewrapped_record", extra={"qid": qid, "kind": kind.name.lower()})
            done += 1
        return done, failed

    # --- helpers ---

    def _seal(self, kind: RecordKind, qid: QueueId, payload: bytes) -> bytes:
        return self._sealer(kind, qid).whole(payload)

    def _sealer(self, kind: RecordKind, qid: QueueId) -> Sealer:
        key_id = self.keyring.active_id
        kek = self.keyring.get(key_id)
        assert kek is not None  # the active key is always in the ring
        return Sealer(kind=kind, qid=qid, key_id=key_id, kek=kek, random=self._random)

    def _unseal(self, kind: RecordKind, qid: QueueId, data: bytes) -> bytes:
        with _corrupt(kind, qid):
            return unseal(data, kind=kind, qid=qid, keys=self.keyring.get)

    def _write(self, qid: QueueId, final: Path, record: bytes) -> None:
        tmp = self.tmp_dir / f"{qid}.{self._random(6).hex()}"
        _files.replace_durably(tmp, final, record)


@dataclass(frozen=True, slots=True)
class RewrapResult:
    """What ``rewrap`` did: records re-sealed, and records it could not open."""

    rewrapped: int
    failed: int


class _QidLocks:
    """One asyncio lock per queue id, kept only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, qid: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(qid, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[qid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[qid]
            if users == 1:
                del self._locks[qid]
            else:
                self._locks[qid] = (lock, users - 1)


@contextlib.contextmanager
def _corrupt(kind: RecordKind, qid: str) -> Iterator[None]:
    """Log a record that fails to open (``RecordError``) before it propagates."""
    try:
        yield
    except RecordError:
        log.error("spool.corrupt", extra={"qid": qid, "kind": kind.name.lower()})
        raise


def _check_qid(qid: str) -> None:
    if not QID.fullmatch(qid):
        raise SpoolError(f"invalid queue id {qid!r}")


def _records(directory: Path, *, any_name: bool = False) -> list[tuple[str, int]]:
    """(name, mtime in ns) of the regular files in ``directory`` named like a qid.

    A directory that does not exist yet (before ``ensure_dirs``) holds nothing.
    """
    out: list[tuple[str, int]] = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return out
    with entries:
        for entry in entries:
            if not (any_name or QID.fullmatch(entry.name)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    out.append((entry.name, entry.stat(follow_symlinks=False).st_mtime_ns))
    return out


def _header_of(path: Path) -> RecordHeader | None:
    """The record's header; ``None`` if it is gone (raced with a delivery) or not a
    record. Any other read error is ``SpoolError``: a header we could not read may
    name a key still needed, and ``mta keys prune`` must not take that for "none"."""
    try:
        with _storage_errors("read", path.name):
            return read_header(_files.read_file(path, MAX_HEADER_SIZE))
    except RecordError:
        return None
    except SpoolError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return None
        raise


def _key_id_of(path: Path) -> str | None:
    header = _header_of(path)
    return header.key_id if header is not None else None
