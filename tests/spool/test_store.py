"""The spool store on real files: nothing in clear on disk, durable puts, quarantine."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mta.errors import SpoolCorrupt, SpoolError
from mta.model import Envelope, QueueId
from mta.spool.envelope import encode_message
from mta.spool.keys import KeyRing
from mta.spool.record import CHUNK_SIZE, RecordKind, read_header, seal, unseal
from mta.spool.store import SpoolStore, random_qid

ENVELOPE = Envelope(
    "alice@example.org", ("bob@example.net", "carol@example.net"), 1_700_000_000.25, "192.0.2.7"
)
CONTENT = b"Subject: hello\r\n\r\nHi Bob.\r\n"


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.create(tmp_path / "keys" / "spool.key")


@pytest.fixture
def store(tmp_path: Path, keyring: KeyRing) -> SpoolStore:
    spool = SpoolStore(tmp_path / "spool", keyring)
    spool.ensure_dirs()
    return spool


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def put(store: SpoolStore, envelope: Envelope = ENVELOPE, content: bytes = CONTENT) -> QueueId:
    return asyncio.run(store.put(envelope, content))


# --- nothing in clear ---


def assert_nowhere(root: Path, token: str) -> None:
    forms = {token.encode(), token.lower().encode(), token.encode("utf-16-le")}
    for path in root.rglob("*"):
        assert token.lower() not in str(path.relative_to(root)).lower()
        if path.is_file():
            data = path.read_bytes()
            assert not any(form in data for form in forms), path


def test_no_plaintext_anywhere_under_the_spool(store: SpoolStore) -> None:
    token = "Xq9TokenZ3k7"
    envelope = Envelope(
        mail_from=f"{token}.sender@example.org",
        rcpt_tos=(f"{token}.rcpt@example.net",),
        received_at=1.0,
        client_address="192.0.2.1",
        helo=f"{token}.helo",
    )
    big_body = (f"{token} body line\r\n" * (CHUNK_SIZE // 10)).encode()
    content = f"Subject: {token}\r\nFrom: <{token}@example.org>\r\n\r\n".encode() + big_body
    qid = put(store, envelope, content)
    assert_nowhere(store.root, token)
    asyncio.run(store.write_state(qid, f'{{"rcpt": "{token}.rcpt@example.net"}}'.encode()))
    assert_nowhere(store.root, token)
    asyncio.run(store.quarantine(qid, "test"))
    assert_nowhere(store.root, token)
    assert len(files_under(store.root)) == 2


# --- round trips ---


def test_put_then_read(store: SpoolStore) -> None:
    qid = put(store)
    assert asyncio.run(store.read(qid)) == (ENVELOPE, CONTENT)
    assert store.queue_ids() == [qid]


def test_large_message_round_trip(store: SpoolStore) -> None:
    content = os.urandom(3 * CHUNK_SIZE + 11)
    qid = put(store, content=content)
    assert asyncio.run(store.read(qid)) == (ENVELOPE, content)


@pytest.mark.parametrize("size", [0, CHUNK_SIZE - 200, CHUNK_SIZE, 16 * CHUNK_SIZE + 3])
def test_records_sealed_whole_and_streamed_are_the_same(store: SpoolStore, size: int) -> None:
    """``put`` seals envelope and content as parts, chunk by chunk: its record opens with
    ``unseal`` as one sealed whole (the format of every record before it) does, and a
    record sealed whole reads back through the chunk-by-chunk reader."""
    content = os.urandom(size)
    qid = put(store, content=content)
    record = (store.root / "msg" / qid).read_bytes()
    payload = unseal(record, kind=RecordKind.MESSAGE, qid=qid, keys=store.keyring.get)
    assert payload == encode_message(ENVELOPE, content)
    key_id = store.keyring.active_id
    kek = store.keyring.get(key_id)
    assert kek is not None
    whole = seal(
        payload, kind=RecordKind.MESSAGE, qid=qid, key_id=key_id, kek=kek, random=os.urandom
    )
    (store.root / "msg" / qid).write_bytes(whole)
    assert asyncio.run(store.read(qid)) == (ENVELOPE, content)


def test_layout_and_modes(store: SpoolStore) -> None:
    qid = put(store)
    asyncio.run(store.write_state(qid, b"state"))
    for name in ("", "msg", "state", "tmp", "quarantine"):
        assert stat.S_IMODE((store.root / name).stat().st_mode) == 0o700
    for path in (store.root / "msg" / qid, store.root / "state" / qid):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert names_in(store.root / "tmp") == []


def test_ensure_dirs_tightens_existing_directories(tmp_path: Path, keyring: KeyRing) -> None:
    root = tmp_path / "spool"
    (root / "msg").mkdir(parents=True, mode=0o755)
    (root / "msg").chmod(0o755)
    SpoolStore(root, keyring).ensure_dirs()
    assert stat.S_IMODE((root / "msg").stat().st_mode) == 0o700


def test_default_queue_ids_are_random_and_name_safe(store: SpoolStore) -> None:
    qids = {put(store) for _ in range(5)}
    assert len(qids) == 5
    assert all(re.fullmatch(r"[a-z2-7]{20}", qid) for qid in qids)
    assert random_qid(lambda n: bytes(n)) == "a" * 20


def test_an_existing_queue_id_is_never_overwritten(tmp_path: Path, keyring: KeyRing) -> None:
    """With 100 random bits a collision does not happen; if it did, that put fails
    (the client retries) rather than replace an acknowledged message."""
    names = iter(["first", "first", "second"])
    store = SpoolStore(tmp_path / "spool", keyring, new_qid=lambda: QueueId(next(names)))
    store.ensure_dirs()
    assert put(store) == "first"
    with pytest.raises(SpoolError, match="cannot store first"):
        put(store, content=b"other")
    assert names_in(store.tmp_dir) == []
    assert asyncio.run(store.read(QueueId("first")))[1] == CONTENT
    assert put(store, content=b"other") == "second"


def test_state(store: SpoolStore) -> None:
    qid = put(store)
    assert asyncio.run(store.read_state(qid)) is None
    asyncio.run(store.write_state(qid, b"one"))
    asyncio.run(store.write_state(qid, b"two"))
    assert asyncio.run(store.read_state(qid)) == b"two"
    assert read_header((store.root / "state" / qid).read_bytes()).kind == RecordKind.STATE
    assert names_in(store.root / "tmp") == []


def test_remove_deletes_message_and_state(store: SpoolStore) -> None:
    qid, other = put(store), put(store)
    asyncio.run(store.write_state(qid, b"s"))
    asyncio.run(store.remove(qid))
    assert store.queue_ids() == [other]
    assert names_in(store.root / "state") == []
    asyncio.run(store.remove(qid))  # already gone: fine


def test_queue_ids_oldest_first_and_only_queue_ids(store: SpoolStore) -> None:
    qids = [put(store) for _ in range(3)]
    for age, qid in zip((100, 300, 200), qids, strict=True):
        os.utime(store.root / "msg" / qid, (1e9 - age, 1e9 - age))
    (store.root / "msg" / ".hidden").write_bytes(b"")
    (store.root / "msg" / "subdir").mkdir()
    assert store.queue_ids() == [qids[1], qids[2], qids[0]]


def test_queue_ids_before_the_spool_exists(tmp_path: Path, keyring: KeyRing) -> None:
    store = SpoolStore(tmp_path / "nothing", keyring)
    assert store.queue_ids() == []
    assert store.key_references() == {}


def test_reading_a_missing_message_is_an_error_not_corruption(store: SpoolStore) -> None:
    with pytest.raises(SpoolError) as info:
        asyncio.run(store.read(QueueId("missing")))
    assert not isinstance(info.value, SpoolCorrupt)


@pytest.mark.parametrize("qid", ["../keys", "a/b", "", ".", "x" * 65])
def test_queue_ids_that_are_not_names_are_refused(store: SpoolStore, qid: str) -> None:
    with pytest.raises(SpoolError, match="invalid queue id"):
        asyncio.run(store.read(QueueId(qid)))
    with pytest.raises(SpoolError, match="invalid queue id"):
        asyncio.run(store.write_state(QueueId(qid), b""))


# --- corruption and quarantine ---


@pytest.mark.parametrize("where", [0, 30, -100, -1])
def test_flipped_byte_is_corrupt_and_quarantined(store: SpoolStore, where: int) -> None:
    qid = put(store)
    asyncio.run(store.write_state(qid, b"state"))
    path = store.root / "msg" / qid
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt):
        asyncio.run(store.read(qid))
    asyncio.run(store.quarantine(qid, "failed authentication"))
    assert store.queue_ids() == []
    assert names_in(store.root / "msg") == []
    assert names_in(store.root / "state") == []
    assert names_in(store.root / "quarantine") == [f"{qid}.msg", f"{qid}.state"]
    assert (store.root / "quarantine" / f"{qid}.msg").read_bytes() == bytes(data)


def test_quarantine_without_state(store: SpoolStore) -> None:
    qid = put(store)
    asyncio.run(store.quarantine(qid, "test"))
    assert names_in(store.root / "quarantine") == [f"{qid}.msg"]


def test_message_file_under_another_queue_id_is_corrupt(store: SpoolStore) -> None:
    qid = put(store)
    other = QueueId("a" * 20)
    os.link(store.root / "msg" / qid, store.root / "msg" / other)
    with pytest.raises(SpoolCorrupt, match="another queue id"):
        asyncio.run(store.read(other))


def test_message_record_as_state_is_corrupt(store: SpoolStore) -> None:
    qid = put(store)
    os.link(store.root / "msg" / qid, store.root / "state" / qid)
    with pytest.raises(SpoolCorrupt, match="kind"):
        asyncio.run(store.read_state(qid))


def test_truncated_message_file_is_corrupt(store: SpoolStore) -> None:
    qid = put(store, content=os.urandom(CHUNK_SIZE + 5))
    path = store.root / "msg" / qid
    path.write_bytes(path.read_bytes()[: -(5 + 16)])  # drop exactly the last chunk
    with pytest.raises(SpoolCorrupt):
        asyncio.run(store.read(qid))


# --- keys ---


def test_old_records_still_read_after_rotate(store: SpoolStore, keyring: KeyRing) -> None:
    old_key = keyring.active_id
    qid = put(store)
    asyncio.run(store.write_state(qid, b"old state"))
    keyring.rotate()
    assert read_header((store.root / "msg" / qid).read_bytes()).key_id == old_key
    assert asyncio.run(store.read(qid)) == (ENVELOPE, CONTENT)
    assert asyncio.run(store.read_state(qid)) == b"old state"
    new_qid = put(store)
    assert read_header((store.root / "msg" / new_qid).read_bytes()).key_id == keyring.active_id


def test_key_references(store: SpoolStore, keyring: KeyRing) -> None:
    old = keyring.active_id
    first, second = put(store), put(store)
    new = keyring.rotate()
    third = put(store)
    asyncio.run(store.write_state(first, b"s"))  # sealed under the new key
    asyncio.run(store.quarantine(second, "test"))  # still counted: it may be inspected
    (store.root / "msg" / ("b" * 20)).write_bytes(b"garbage")  # unreadable: no reference
    assert store.key_references() == {old: 2, new: 2}
    assert keyring.prune(store.key_references()) == []
    asyncio.run(store.remove(first))
    (store.root / "quarantine" / f"{second}.msg").unlink()
    assert store.key_references() == {new: 1}
    assert keyring.prune(store.key_references()) == [old]
    assert asyncio.run(store.read(third)) == (ENVELOPE, CONTENT)


def test_a_header_that_cannot_be_read_stops_key_references(
    store: SpoolStore, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on one record must not read as "no key needed": prune would then drop the key
    and that record could never be opened again."""
    from mta import durable as _files

    old = keyring.active_id
    qid = put(store)
    keyring.rotate()
    real_read = _files.read_file

    def failing_read(path: Path, limit: int = -1) -> bytes:
        if path.name == qid:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(path, limit)

    monkeypatch.setattr(_files, "read_file", failing_read)
    with pytest.raises(SpoolError, match="Input/output error"):
        store.key_references()
    monkeypatch.undo()
    assert store.key_references() == {old: 1}
    assert keyring.prune(store.key_references()) == []


def test_keys_opening_nothing(store: SpoolStore, keyring: KeyRing) -> None:
    old = keyring.active_id
    first = put(store)
    new = keyring.rotate()
    put(store)
    assert store.keys_opening_nothing(keyring.get) == []
    impostor = {old: os.urandom(32), new: keyring.get(new)}
    assert store.keys_opening_nothing(impostor.get) == [old]
    assert store.keys_opening_nothing({}.get) == []  # unknown ids: key_references' job
    # One corrupt record does not condemn a key that opens the others.
    second = put(store)
    data = bytearray((store.root / "msg" / second).read_bytes())
    data[len(read_header(bytes(data)).raw) - 1] ^= 1  # in the wrapped data key
    (store.root / "msg" / second).write_bytes(bytes(data))
    assert store.keys_opening_nothing(keyring.get) == []
    asyncio.run(store.remove(first))
    assert store.keys_opening_nothing({old: os.urandom(32), new: os.urandom(32)}.get) == [new]


def test_record_under_an_unknown_key_is_corrupt(store: SpoolStore) -> None:
    qid = QueueId("c" * 20)
    record = seal(
        b"", kind=RecordKind.STATE, qid=qid, key_id="gone", kek=bytes(32), random=os.urandom
    )
    (store.root / "state" / qid).write_bytes(record)
    with pytest.raises(SpoolCorrupt, match="unknown key id"):
        asyncio.run(store.read_state(qid))


# --- durability and failures ---


def test_put_is_durable_before_it_returns_and_runs_off_the_loop(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    threads: set[int] = set()
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        threads.add(threading.get_ident())
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path) -> None:
        events.append(("link", Path(dst).parent.name))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    put(store)
    assert events == [("fsync", "file"), ("link", "msg"), ("fsync", "dir")]
    assert threading.get_ident() not in threads


def failing_on_call(real: Callable[..., object], nth: int) -> Callable[..., object]:
    """``real``, except that its ``nth`` call fails as a full disk does."""
    calls = 0

    def flaky(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    return flaky


@pytest.mark.parametrize(
    ("name", "nth"),
    [("writev", 1), ("fsync", 1), ("link", 1), ("fsync", 2)],
    ids=["write", "fsync-file", "link", "fsync-dir"],
)
def test_failed_put_raises_and_leaves_no_file(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch, name: str, nth: int
) -> None:
    monkeypatch.setattr(os, name, failing_on_call(getattr(os, name), nth))
    with pytest.raises(SpoolError, match="No space left on device") as info:
        put(store)
    monkeypatch.undo()
    assert not isinstance(info.value, SpoolCorrupt)
    assert (info.value.reply.code, info.value.reply.enhanced) == (452, "4.3.1")
    assert names_in(store.root / "tmp") == []
    assert names_in(store.root / "msg") == []
    qid = put(store)  # and the spool works again once there is room
    assert asyncio.run(store.read(qid)) == (ENVELOPE, CONTENT)


@pytest.mark.parametrize(
    ("code", "reply"),
    [(errno.ENOSPC, (452, "4.3.1")), (errno.EDQUOT, (452, "4.3.1")), (errno.EIO, (451, "4.3.0"))],
    ids=["ENOSPC", "EDQUOT", "EIO"],
)
def test_only_a_lack_of_space_is_insufficient_storage(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch, code: int, reply: tuple[int, str]
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SpoolError, match=os.strerror(code)) as info:
        put(store)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (info.value.reply.code, info.value.reply.enhanced) == reply
    assert names_in(store.root / "tmp") == []
    assert names_in(store.root / "msg") == []


def test_failed_state_write_keeps_the_old_state(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid = put(store)
    asyncio.run(store.write_state(qid, b"old"))
    monkeypatch.setattr(os, "writev", failing_on_call(os.writev, 1))
    with pytest.raises(SpoolError, match="No space left on device"):
        asyncio.run(store.write_state(qid, b"new"))
    monkeypatch.undo()
    assert asyncio.run(store.read_state(qid)) == b"old"
    assert names_in(store.root / "tmp") == []


def test_sweep_tmp_removes_leftovers_and_orphan_states(store: SpoolStore) -> None:
    kept = put(store)
    asyncio.run(store.write_state(kept, b"s"))
    orphan = put(store)
    asyncio.run(store.write_state(orphan, b"s"))
    (store.root / "msg" / orphan).unlink()  # as if a crash hit remove() between the files
    (store.root / "tmp" / f"{kept}.abc").write_bytes(b"half written")
    store.sweep_tmp()
    assert names_in(store.root / "tmp") == []
    assert names_in(store.root / "state") == [kept]
    assert store.queue_ids() == [kept]


def test_concurrent_puts_wait_for_the_disk_in_parallel_and_return_only_once_durable(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsyncs of concurrent puts overlap (the file system's journal then commits them
    together: group commit), and no put returns before the fsync of ``msg/`` that
    follows its rename."""
    from mta import durable as _files

    synced: set[str] = set()
    running = peak = 0
    lock = threading.Lock()
    real_fsync_dir = _files.fsync_dir

    def slow_fsync_dir(path: Path) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)  # a slow disk: the others arrive meanwhile
        real_fsync_dir(path)
        with lock:
            running -= 1
            if path == store.msg_dir:
                synced.update(os.listdir(path))

    monkeypatch.setattr(_files, "fsync_dir", slow_fsync_dir)

    async def many() -> list[QueueId]:
        async def one(n: int) -> QueueId:
            qid = await store.put(ENVELOPE, CONTENT + str(n).encode())
            assert qid in synced  # durable before it was acknowledged
            return qid

        return await asyncio.gather(*(one(n) for n in range(40)))

    qids = asyncio.run(many())
    assert len(set(qids)) == 40
    assert sorted(names_in(store.msg_dir)) == sorted(qids)
    assert peak > 1


def test_a_failed_directory_fsync_fails_every_put_it_covers(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mta import durable as _files

    def broken(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(_files, "fsync_dir", broken)

    async def many() -> list[QueueId | BaseException]:
        puts = (store.put(ENVELOPE, CONTENT) for _ in range(5))
        return await asyncio.gather(*puts, return_exceptions=True)

    outcomes = asyncio.run(many())
    assert all(isinstance(outcome, SpoolError) for outcome in outcomes)
    assert names_in(store.msg_dir) == []
    assert names_in(store.tmp_dir) == []


def test_a_put_cancelled_while_its_fsync_runs_still_stores_that_record(
    store: SpoolStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client hangs up while its record is being fsynced: the writer thread keeps the
    descriptor until it is done, so the next put's new file can't take its number and
    each fsync covers the file it was meant for. The cancelled record still lands, and
    is still handed over (``stored``) to be scheduled."""
    synced: set[int] = set()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            time.sleep(0.2)  # long enough for the cancel and the next put to happen
            synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    handed_over: list[QueueId] = []

    async def scenario() -> QueueId:
        first = asyncio.create_task(store.put(ENVELOPE, b"first", handed_over.append))
        await asyncio.sleep(0.05)  # it is in the writer thread now
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = await store.put(ENVELOPE, b"second", handed_over.append)
        await asyncio.sleep(0.3)  # the first record's fsync ends meanwhile
        return second

    second = asyncio.run(scenario())
    stored = {p.stat().st_ino: p.name for p in store.msg_dir.iterdir()}
    assert len(stored) == 2
    assert second in stored.values()
    assert synced == set(stored)  # each record's own data was fsynced
    assert sorted(handed_over) == sorted(stored.values())  # both go on to be delivered


# --- re-wrap ---


def header_keys(store: SpoolStore) -> dict[str, str]:
    return {
        f"{directory.name}/{path.name}": read_header(path.read_bytes()).key_id
        for directory in (store.msg_dir, store.state_dir)
        for path in sorted(directory.iterdir())
    }


def test_rewrap_reseals_under_the_active_key_keeping_qid_state_and_time(
    store: SpoolStore, keyring: KeyRing
) -> None:
    qids = [put(store, content=CONTENT + bytes([n])) for n in range(3)]
    for qid in qids[:2]:
        asyncio.run(store.write_state(qid, f"state of {qid}".encode()))
    old = keyring.active_id
    times = {p.name: p.stat().st_mtime_ns for p in store.msg_dir.iterdir()}
    order = store.queue_ids()  # by file time (equal times: by name)
    new = keyring.rotate()
    fresh = put(store)  # already under the new key: left alone
    done = asyncio.run(store.rewrap())
    assert (done.rewrapped, done.failed) == (5, 0)
    assert set(header_keys(store).values()) == {new}
    assert [q for q in store.queue_ids() if q != fresh] == order  # file times kept
    assert {q: store.msg_dir.joinpath(q).stat().st_mtime_ns for q in qids} == times
    for n, qid in enumerate(qids):
        assert asyncio.run(store.read(qid)) == (ENVELOPE, CONTENT + bytes([n]))
    assert [asyncio.run(store.read_state(q)) for q in qids] == [
        f"state of {qids[0]}".encode(),
        f"state of {qids[1]}".encode(),
        None,
    ]
    assert asyncio.run(store.read(fresh)) == (ENVELOPE, CONTENT)
    assert names_in(store.tmp_dir) == []
    assert keyring.prune(store.key_references()) == [old]
    assert asyncio.run(store.rewrap()) == type(done)(0, 0)


def test_a_crash_in_the_middle_of_rewrap_loses_nothing(
    store: SpoolStore, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    qids = [put(store, content=CONTENT + bytes([n])) for n in range(4)]
    for qid in qids:
        asyncio.run(store.write_state(qid, qid.encode()))
    old = keyring.active_id
    new = keyring.rotate()
    real_replace = os.replace
    calls = 0

    class Killed(BaseException):
        """The process dies here: nothing after this line runs."""

    def replace(src: str | Path, dst: str | Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:  # the fifth record: its temp file is written and fsynced
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        asyncio.run(store.rewrap())
    monkeypatch.undo()
    # Each record is the old one or the new one, and every one opens.
    assert sorted(header_keys(store).values()) == sorted([new] * 4 + [old] * 4)
    for n, qid in enumerate(qids):
        assert asyncio.run(store.read(qid)) == (ENVELOPE, CONTENT + bytes([n]))
        assert asyncio.run(store.read_state(qid)) == qid.encode()
    store.sweep_tmp()  # what the next start does
    assert names_in(store.tmp_dir) == []
    assert asyncio.run(store.rewrap()).rewrapped == 4
    assert keyring.prune(store.key_references()) == [old]
    for qid in qids:
        assert asyncio.run(store.read_state(qid)) == qid.encode()


def test_rewrap_never_writes_back_a_state_or_message_from_before(
    store: SpoolStore, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state written, or a message removed, while re-wrap has read the old record
    stays written or removed: re-wrap holds the queue id as the scheduler's writes do."""
    first, second = put(store), put(store)
    for qid in (first, second):
        asyncio.run(store.write_state(qid, b"old"))
    keyring.rotate()
    real_unseal = store._unseal
    reading = {
        (first, RecordKind.STATE): threading.Event(),
        (second, RecordKind.MESSAGE): threading.Event(),
    }

    def slow_unseal(kind: RecordKind, qid: QueueId, data: bytes) -> bytes:
        if (qid, kind) in reading:
            reading[qid, kind].set()
            time.sleep(0.3)  # the window in which the scheduler acts
        return real_unseal(kind, qid, data)

    monkeypatch.setattr(store, "_unseal", slow_unseal)

    async def when_reading(qid: QueueId, kind: RecordKind) -> None:
        while not reading[qid, kind].is_set():
            await asyncio.sleep(0.005)

    async def scheduler() -> None:
        await when_reading(first, RecordKind.STATE)
        await store.write_state(first, b"new")
        await when_reading(second, RecordKind.MESSAGE)
        await store.remove(second)

    async def race() -> None:
        await asyncio.wait_for(asyncio.gather(store.rewrap(), scheduler()), 10)

    asyncio.run(race())
    monkeypatch.undo()
    assert asyncio.run(store.read_state(first)) == b"new"
    assert store.queue_ids() == [first]
    assert names_in(store.state_dir) == [first]
