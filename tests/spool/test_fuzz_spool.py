"""Fuzzing the spool readers beyond tests/spool/test_record.py: a record fed to the
streaming opener in arbitrary pieces, and the key file parser.

A spool file is outside input in the sense that counts here: a disk, a backup or an
operator can hand the relay anything. Only ``RecordError`` (a ``SpoolCorrupt``, which
sends the file to quarantine) may come out of the opener, and only ``KeyFileError``
out of the key file loader.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.errors import KeyFileError
from mta.spool.keys import KeyRing
from mta.spool.record import MAGIC, Opener, RecordError, RecordKind
from tests.spool.test_record import CS, KEYS, QID, make

props = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed(record: bytes, cuts: list[int]) -> bytes | None:
    """Feed ``record`` in pieces cut at ``cuts``; the plaintext, or None on RecordError."""
    opener = Opener(kind=RecordKind.MESSAGE, qid=QID, keys=KEYS, chunk_size=CS)
    got = bytearray()
    start = 0
    try:
        for cut in [*sorted(cuts), len(record)]:
            got += b"".join(opener.feed(record[start:cut]))
            start = max(start, cut)
        got += opener.close()
    except RecordError:
        return None
    return bytes(got)


@props
@given(
    garbage=st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=300).map(lambda rest: MAGIC + rest),
    ),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_streaming_opener_on_garbage_raises_only_record_error(
    garbage: bytes, cuts: list[int]
) -> None:
    assert _feed(garbage, cuts) is None


@props
@given(payload=st.binary(max_size=5 * CS), data=st.data())
def test_streaming_opener_on_a_damaged_record_never_completes(
    payload: bytes, data: st.DataObject
) -> None:
    record = bytearray(make(payload))
    how = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if how == "flip":
        at = data.draw(st.integers(0, len(record) - 1))
        record[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del record[data.draw(st.integers(0, len(record) - 1)) :]
    else:
        record += data.draw(st.binary(min_size=1, max_size=40))
    cuts = data.draw(st.lists(st.integers(0, len(record)), max_size=6))
    assert _feed(bytes(record), cuts) is None


_KEY_LINES = st.one_of(
    st.builds(
        lambda key_id, key: f"{key_id} {key}",
        st.text(max_size=70),
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
            max_size=60,
        ),
    ),
    st.just("k1 " + "A" * 43 + "="),  # a valid 32-byte key
    st.text(max_size=80),
)


@props
@given(
    st.one_of(
        st.lists(_KEY_LINES, max_size=5).map(lambda ls: "\n".join(ls).encode()),
        st.binary(max_size=300),
    )
)
@example(b"k1 " + b"A" * 43 + b"=\nk1 " + b"B" * 43 + b"=\n")  # the same id twice
@example(b"\xff\xfe")
def test_key_file_raises_only_key_file_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "spool.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        try:
            ring = KeyRing.load(path)
        except KeyFileError as err:
            message = str(err)
        else:
            assert ring.ids()
            return
    assert "AAAAAAAAAAAAAAAAAAAA" not in message  # an error never quotes a key
