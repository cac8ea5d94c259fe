"""The spool record format: round trips, and every kind of tampering is a RecordError."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.errors import SpoolCorrupt
from mta.spool.record import (
    CHUNK_SIZE,
    MAGIC,
    MAX_HEADER_SIZE,
    TAG_SIZE,
    Opener,
    RecordError,
    RecordKind,
    Sealer,
    contiguous_pieces,
    open_stream,
    read_header,
    seal,
    unseal,
)

CS = 16  # a small chunk size, so that short payloads span many chunks
KEK = bytes(range(32))
OTHER_KEK = bytes(range(1, 33))
KEYS = {"k1": KEK, "k2": OTHER_KEK}.get
MESSAGE = RecordKind.MESSAGE
QID = "q0123456789abcdefghij"

props = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
payloads = st.binary(max_size=6 * CS)
multi_chunk = st.binary(min_size=CS + 1, max_size=6 * CS)


def rng(seed: int = 0) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def make(
    payload: bytes,
    *,
    seed: int = 0,
    kind: RecordKind = MESSAGE,
    qid: str = QID,
    key_id: str = "k1",
    chunk_size: int = CS,
) -> bytes:
    kek = KEYS(key_id)
    assert kek is not None
    return seal(
        payload, kind=kind, qid=qid, key_id=key_id, kek=kek, random=rng(seed), chunk_size=chunk_size
    )


def open_(record: bytes, *, kind: RecordKind = MESSAGE, qid: str = QID, cs: int = CS) -> bytes:
    return unseal(record, kind=kind, qid=qid, keys=KEYS, chunk_size=cs)


def split(record: bytes, cs: int = CS) -> tuple[bytes, list[bytes]]:
    """The header and the sealed chunks of a record."""
    header = read_header(record).raw
    body = record[len(header) :]
    step = cs + TAG_SIZE
    return header, [body[i : i + step] for i in range(0, len(body), step)]


def consume(pieces: Iterable[bytes], cs: int = CS) -> tuple[bytes, BaseException | None]:
    """What a consumer of open_stream gets before it stops, and why it stopped."""
    got = bytearray()
    try:
        for chunk in open_stream(pieces, kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=cs):
            got += chunk
    except Exception as err:
        return bytes(got), err
    return bytes(got), None


def n_chunks(size: int, cs: int = CS) -> int:
    return max(1, -(-size // cs))


# --- round trips ---


@props
@given(payload=payloads, seed=st.integers(0, 2**32))
def test_round_trip(payload: bytes, seed: int) -> None:
    record = make(payload, seed=seed)
    assert open_(record) == payload
    header, chunks = split(record)
    assert len(chunks) == n_chunks(len(payload))
    assert len(record) == len(header) + len(payload) + TAG_SIZE * len(chunks)


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 2 * CS, 2 * CS + 1, 5 * CS])
def test_chunk_boundaries(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    record = make(payload)
    assert open_(record) == payload
    assert len(split(record)[1]) == n_chunks(size)


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 7]
)
def test_real_chunk_size_boundaries(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    record = make(payload, chunk_size=CHUNK_SIZE)
    assert unseal(record, kind=MESSAGE, qid=QID, keys=KEYS) == payload
    _, chunks = split(record, CHUNK_SIZE)
    assert len(chunks) == n_chunks(size, CHUNK_SIZE)
    assert all(len(c) == CHUNK_SIZE + TAG_SIZE for c in chunks[:-1])


@props
@given(payload=payloads, cuts=st.lists(st.integers(0, 200), max_size=20))
def test_streaming_open_in_any_pieces(payload: bytes, cuts: list[int]) -> None:
    record = make(payload)
    points = sorted({min(c, len(record)) for c in cuts})
    pieces = [record[a:b] for a, b in zip([0, *points], [*points, len(record)], strict=True)]
    chunks = list(open_stream(pieces, kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS))
    assert b"".join(chunks) == payload
    assert all(len(c) == CS for c in chunks[:-1])


@props
@given(payload=payloads, cuts=st.lists(st.integers(0, 6 * CS), max_size=10))
def test_streaming_seal_equals_one_shot(payload: bytes, cuts: list[int]) -> None:
    sealer = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng(), chunk_size=CS)
    points = sorted({min(c, len(payload)) for c in cuts})
    out = sealer.header()
    for a, b in zip([0, *points], [*points, len(payload)], strict=True):
        out += sealer.update(payload[a:b])
    out += sealer.finish()
    assert out == make(payload)


@props
@given(payload=payloads, cuts=st.lists(st.integers(0, 6 * CS), max_size=10))
def test_sealing_parts_equals_one_shot(payload: bytes, cuts: list[int]) -> None:
    """``stream`` over the payload cut anywhere (empty parts too, chunks spanning
    parts) gives the very record ``seal`` gives for it whole: the old opener reads it."""
    sealer = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng(), chunk_size=CS)
    points = sorted(min(c, len(payload)) for c in cuts)
    parts = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)], strict=True)]
    record = b"".join(sealer.stream(parts))
    assert record == make(payload)
    assert open_(record) == payload


@pytest.mark.parametrize("sizes", [(), (0,), (4, CHUNK_SIZE - 4), (CHUNK_SIZE, 0, 1), (70_000, 9)])
def test_sealing_parts_at_the_real_chunk_size(sizes: tuple[int, ...]) -> None:
    parts = [random.Random(i).randbytes(size) for i, size in enumerate(sizes)]
    sealer = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng())
    pieces = list(sealer.stream(parts))
    payload = b"".join(parts)
    assert b"".join(pieces) == make(payload, chunk_size=CHUNK_SIZE)
    assert len(pieces) == 1 + n_chunks(len(payload), CHUNK_SIZE)  # the header, each chunk


@props
@given(sizes=st.lists(st.integers(0, 3 * CS), max_size=6), size=st.integers(1, 2 * CS))
def test_contiguous_pieces(sizes: list[int], size: int) -> None:
    parts = [bytes([i]) * n for i, n in enumerate(sizes)]
    total = sum(sizes)
    pieces = [bytes(p) for p in contiguous_pieces(parts, size, total)]
    assert b"".join(pieces) == b"".join(parts)
    assert len(pieces) == n_chunks(total, size)
    assert all(len(p) == size for p in pieces[:-1])


def test_a_sealer_streams_once() -> None:
    sealer = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng())
    sealer.stream((b"x",))
    with pytest.raises(ValueError, match="finished"):
        sealer.stream((b"x",))
    used = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng())
    used.update(b"x")
    with pytest.raises(ValueError, match="in use"):
        used.stream((b"x",))


def test_sealer_finishes_once() -> None:
    sealer = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng())
    sealer.finish()
    with pytest.raises(ValueError, match="finished"):
        sealer.finish()
    with pytest.raises(ValueError, match="finished"):
        sealer.update(b"more")


def test_whole_is_for_a_fresh_sealer_only() -> None:
    used = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng(), chunk_size=CS)
    used.update(b"x" * (CS + 1))
    with pytest.raises(ValueError, match="in use"):
        used.whole(b"payload")
    once = Sealer(kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=rng(), chunk_size=CS)
    once.whole(b"payload")
    with pytest.raises(ValueError, match="finished"):
        once.whole(b"payload")


def test_opener_whole_is_for_a_fresh_opener_only_and_agrees_with_feeding() -> None:
    payload = bytes(range(256)) * 3
    record = make(payload)
    fed = Opener(kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    streamed = b"".join(fed.feed(record[:100])) + b"".join(fed.feed(record[100:])) + fed.close()
    whole = Opener(kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    assert whole.whole(record) == streamed == payload
    with pytest.raises(RecordError, match="closed"):
        whole.whole(record)
    used = Opener(kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    used.feed(record[:100])
    with pytest.raises(ValueError, match="in use"):
        used.whole(record)


def test_header_fields() -> None:
    record = make(b"hello", kind=RecordKind.STATE, key_id="k2")
    header = read_header(record)
    assert (header.kind, header.key_id, header.qid) == (RecordKind.STATE, "k2", QID)
    assert record.startswith(header.raw)
    assert header.raw.startswith(MAGIC + bytes([1, 2]))
    assert len(header.raw) <= MAX_HEADER_SIZE
    assert read_header(header.raw) == header  # the header alone is enough
    with pytest.raises(RecordError, match="truncated"):
        read_header(header.raw[:-1])


def test_fresh_key_and_nonces_per_record() -> None:
    one, two = make(b"same", seed=1), make(b"same", seed=2)
    assert split(one)[1] != split(two)[1]
    assert read_header(one).wrapped_key != read_header(two).wrapped_key


def test_no_plaintext_in_record() -> None:
    payload = b"SECRET-TOKEN " * 50
    record = make(payload, chunk_size=CHUNK_SIZE)
    assert b"SECRET" not in record


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"key_id": "k 1"}, "key id"),
        ({"key_id": ""}, "key id"),
        ({"qid": "../etc"}, "qid"),
        ({"qid": "q" * 256}, "qid"),
        ({"kek": bytes(16)}, "32 bytes"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_sealer_rejects_bad_arguments(kwargs: dict[str, object], problem: str) -> None:
    args: dict[str, object] = {
        "kind": MESSAGE,
        "qid": QID,
        "key_id": "k1",
        "kek": KEK,
        "random": rng(),
        **kwargs,
    }
    with pytest.raises(ValueError, match=problem):
        Sealer(**args)  # type: ignore[arg-type]


def test_short_random_source_is_refused() -> None:
    with pytest.raises(ValueError, match="random"):
        seal(b"", kind=MESSAGE, qid=QID, key_id="k1", kek=KEK, random=lambda n: b"\0")


# --- binding: kind, qid, key ---


def test_record_error_is_spool_corrupt() -> None:
    assert issubclass(RecordError, SpoolCorrupt)


def test_wrong_kind() -> None:
    with pytest.raises(RecordError, match="kind"):
        open_(make(b"x"), kind=RecordKind.STATE)


def test_wrong_qid() -> None:
    with pytest.raises(RecordError, match="queue id"):
        open_(make(b"x"), qid="other")


def test_unknown_key_id() -> None:
    record = make(b"x")
    with pytest.raises(RecordError, match="unknown key id"):
        unseal(record, kind=MESSAGE, qid=QID, keys=lambda _id: None)


def test_wrong_key() -> None:
    record = make(b"x", key_id="k1")
    with pytest.raises(RecordError, match="data key"):
        unseal(record, kind=MESSAGE, qid=QID, keys=lambda _id: OTHER_KEK)


def test_header_swapped_between_records() -> None:
    a, b = make(b"a" * 40, seed=1), make(b"b" * 40, seed=2)
    header_b, _ = split(b)
    _, chunks_a = split(a)
    with pytest.raises(RecordError):
        open_(header_b + b"".join(chunks_a))


# --- tampering (properties) ---


def assert_corrupt(record: bytes) -> None:
    with pytest.raises(RecordError):
        open_(record)


@props
@given(payload=payloads, data=st.data())
def test_flipping_any_byte_fails(payload: bytes, data: st.DataObject) -> None:
    record = bytearray(make(payload))
    index = data.draw(st.integers(0, len(record) - 1), label="index")
    record[index] ^= data.draw(st.integers(1, 255), label="mask")
    assert_corrupt(bytes(record))


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_flipping_any_byte_fails_real_chunk_size(data: st.DataObject) -> None:
    payload = b"\x42" * (CHUNK_SIZE + 100)
    record = bytearray(make(payload, chunk_size=CHUNK_SIZE))
    index = data.draw(st.integers(0, len(record) - 1), label="index")
    record[index] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(RecordError):
        unseal(bytes(record), kind=MESSAGE, qid=QID, keys=KEYS)


@props
@given(payload=payloads, data=st.data())
def test_truncating_anywhere_fails(payload: bytes, data: st.DataObject) -> None:
    record = make(payload)
    assert_corrupt(record[: data.draw(st.integers(0, len(record) - 1), label="cut")])


@props
@given(payload=payloads, extra=st.binary(min_size=1, max_size=3 * CS))
def test_appending_fails(payload: bytes, extra: bytes) -> None:
    assert_corrupt(make(payload) + extra)


@props
@given(payload=multi_chunk, data=st.data())
def test_swapping_two_chunks_fails(payload: bytes, data: st.DataObject) -> None:
    header, chunks = split(make(payload))
    i, j = data.draw(st.lists(st.integers(0, len(chunks) - 1), min_size=2, max_size=2, unique=True))
    chunks[i], chunks[j] = chunks[j], chunks[i]
    assert_corrupt(header + b"".join(chunks))


@props
@given(payload=multi_chunk, data=st.data())
def test_dropping_a_chunk_fails(payload: bytes, data: st.DataObject) -> None:
    header, chunks = split(make(payload))
    del chunks[data.draw(st.integers(0, len(chunks) - 1), label="dropped")]
    assert_corrupt(header + b"".join(chunks))


@props
@given(payload=multi_chunk)
def test_dropping_the_last_chunk_fails(payload: bytes) -> None:
    header, chunks = split(make(payload))
    assert_corrupt(header + b"".join(chunks[:-1]))


@props
@given(payload=multi_chunk, data=st.data())
def test_duplicating_a_chunk_fails(payload: bytes, data: st.DataObject) -> None:
    header, chunks = split(make(payload))
    index = data.draw(st.integers(0, len(chunks) - 1), label="duplicated")
    chunks.insert(index, chunks[index])
    assert_corrupt(header + b"".join(chunks))


@props
@given(payload=multi_chunk, other=multi_chunk, data=st.data())
def test_splicing_a_chunk_from_another_record_fails(
    payload: bytes, other: bytes, data: st.DataObject
) -> None:
    # Same key, same qid, same kind: only the per-record data key tells them apart.
    header, chunks = split(make(payload, seed=1))
    _, foreign = split(make(other, seed=2))
    i = data.draw(st.integers(0, len(chunks) - 1), label="replaced")
    j = data.draw(st.integers(0, len(foreign) - 1), label="foreign")
    chunks[i] = foreign[j]
    assert_corrupt(header + b"".join(chunks))


# --- garbage ---

near_headers = st.builds(
    lambda version, kind, rest: MAGIC + bytes([version, kind]) + rest,
    st.integers(0, 3),
    st.integers(0, 3),
    st.binary(max_size=300),
)


@props
@given(garbage=st.one_of(st.binary(max_size=600), near_headers))
def test_garbage_raises_only_record_error(garbage: bytes) -> None:
    try:
        header = read_header(garbage)
    except RecordError:
        pass
    else:  # it parsed; it still does not authenticate
        assert garbage.startswith(header.raw)
    assert_corrupt(garbage)
    with pytest.raises(RecordError):
        unseal(garbage, kind=RecordKind.STATE, qid=QID, keys=KEYS)


@props
@given(payload=payloads, body=st.binary(max_size=4 * (CS + TAG_SIZE)))
def test_valid_header_with_garbage_body_fails(payload: bytes, body: bytes) -> None:
    header, _ = split(make(payload))
    assert_corrupt(header + body)


# --- the incremental opener never hands out unauthenticated plaintext ---


def bytewise(record: bytes) -> list[bytes]:
    return [record[i : i + 1] for i in range(len(record))]


@props
@given(payload=multi_chunk, data=st.data())
def test_opener_stops_before_a_tampered_chunk(payload: bytes, data: st.DataObject) -> None:
    header, chunks = split(make(payload))
    k = data.draw(st.integers(0, len(chunks) - 1), label="tampered chunk")
    bad = bytearray(chunks[k])
    bad[data.draw(st.integers(0, len(bad) - 1), label="byte")] ^= 1
    chunks[k] = bytes(bad)
    got, err = consume(bytewise(header + b"".join(chunks)))
    assert isinstance(err, RecordError)
    assert got == payload[: k * CS]  # exactly the chunks before the bad one


@props
@given(payload=payloads, data=st.data())
def test_truncated_stream_never_completes(payload: bytes, data: st.DataObject) -> None:
    record = make(payload)
    cut = data.draw(st.integers(0, len(record) - 1), label="cut")
    piece = data.draw(st.integers(1, 3 * CS), label="piece size")
    truncated = record[:cut]
    got, err = consume(truncated[i : i + piece] for i in range(0, len(truncated), piece))
    assert isinstance(err, RecordError)
    assert len(got) < len(payload) or not payload  # a strict prefix: never the whole message
    assert payload.startswith(got)


def test_stream_without_final_chunk_raises_at_the_end() -> None:
    payload = bytes(range(3 * CS))
    header, chunks = split(make(payload))
    got, err = consume([header, *chunks[:-1]])
    assert isinstance(err, RecordError)
    assert "final chunk" in str(err) or "chunk 1" in str(err)
    assert got == payload[:CS]  # chunk 1 was full-sized: held back, then failed as final


def test_opener_holds_back_a_full_chunk_until_it_knows_more_follows() -> None:
    payload = bytes(range(2 * CS))
    header, chunks = split(make(payload))
    opener = Opener(kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    assert opener.feed(header) == []
    assert opener.header == read_header(header)
    assert opener.feed(chunks[0]) == []  # might be the final chunk
    assert opener.feed(chunks[1][:1]) == [payload[:CS]]
    assert opener.feed(chunks[1][1:]) == []
    assert opener.close() == payload[CS:]


def test_opener_refuses_input_after_a_failure() -> None:
    record = bytearray(make(b"x" * 40))
    record[-1] ^= 1
    opener = Opener(kind=MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    opener.feed(bytes(record))
    with pytest.raises(RecordError):
        opener.close()
    with pytest.raises(RecordError, match="closed or failed"):
        opener.feed(b"")
    with pytest.raises(RecordError, match="closed or failed"):
        opener.close()


def test_opener_rejects_bad_magic_before_the_header_is_complete() -> None:
    opener = Opener(kind=MESSAGE, qid=QID, keys=KEYS)
    with pytest.raises(RecordError, match="magic"):
        opener.feed(b"MTA2")
