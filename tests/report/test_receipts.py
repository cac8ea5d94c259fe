"""The receipt chain: every kind of damage is found and named; a torn tail is not damage."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import pytest

from mta.events import Event
from mta.model import QueueId
from mta.report.receipts import (
    GENESIS,
    HEADER_SIZE,
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
from tests.test_events import ATTEMPT, RECEIVED

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
KEYS = {"k1": KEY}.get


def _events(count: int) -> list[Event]:
    out: list[Event] = []
    for number in range(count):
        base = RECEIVED if number % 2 == 0 else ATTEMPT
        out.append(replace(base, qid=QueueId(f"q{number}")))
    return out


def _file(events: list[Event], anchor: Anchor, key: bytes = KEY) -> tuple[list[bytes], Link]:
    entry, link = anchor_entry(anchor, key_id="k1", kek=key, random=os.urandom)
    entries = [entry]
    for event in events:
        entry, link = event_entry(link, event, key_id="k1", kek=key, random=os.urandom)
        entries.append(entry)
    return entries, link


def _log(*counts: int) -> tuple[dict[str, list[bytes]], list[Link]]:
    """Day files with ``counts`` events each, chained; the links each file ends at."""
    files: dict[str, list[bytes]] = {}
    ends: list[Link] = []
    previous: str | None = None
    link = GENESIS
    for day, count in enumerate(counts, start=1):
        name = f"2024-03-{day:02d}"
        files[name], link = _file(_events(count), Anchor(previous, link))
        ends.append(link)
        previous = name
    return files, ends


def _verify(files: dict[str, bytes], keep_from: str = "") -> Verifier:
    verifier = Verifier(KEYS, keep_from)
    names = sorted(files)
    for number, name in enumerate(names, start=1):
        verifier.check_file(name, walk(io.BytesIO(files[name]).read), last=number == len(names))
    return verifier


def _joined(files: dict[str, list[bytes]]) -> dict[str, bytes]:
    return {name: b"".join(entries) for name, entries in files.items()}


def _bad(files: dict[str, bytes], keep_from: str = "") -> BadEntry:
    with pytest.raises(BadEntry) as caught:
        _verify(files, keep_from)
    return caught.value


def test_an_intact_chain_across_day_files_verifies() -> None:
    files, _ = _log(3, 0, 4)
    verifier = _verify(_joined(files))
    assert (verifier.entries, verifier.files) == (3 + 0 + 4 + 3, 3)  # and 3 anchors


def test_every_entry_opens_to_its_event_or_anchor() -> None:
    files, _ = _log(4)
    data = b"".join(files["2024-03-01"])
    frames = [item for item in walk(io.BytesIO(data).read) if isinstance(item, Frame)]
    opened = [open_frame(frame, KEYS)[0] for frame in frames]
    assert opened[0].anchor == Anchor(None, GENESIS)
    assert [o.event for o in opened[1:]] == _events(4)
    assert [frame.seq for frame in frames] == [1, 2, 3, 4, 5]


# Offsets inside entry 3: the frame header, the sequence number, the sealed record
# (its header, its ciphertext, its tag) and the MAC.
@pytest.mark.parametrize("where", [0, 3, 8, HEADER_SIZE + 2, HEADER_SIZE + 10, 80, 200, -40, -1])
def test_a_flipped_byte_anywhere_in_an_entry_names_that_entry(where: int) -> None:
    files, _ = _log(5)
    entries = files["2024-03-01"]
    entry = bytearray(entries[2])
    entry[where] ^= 0x01
    entries[2] = bytes(entry)
    bad = _bad(_joined(files))
    assert (bad.file, bad.entry) == ("2024-03-01", 3)


def test_a_flipped_byte_in_the_last_entry_of_the_log_is_damage_too() -> None:
    files, _ = _log(3)
    entry = bytearray(files["2024-03-01"][-1])
    entry[-5] ^= 0x80
    files["2024-03-01"][-1] = bytes(entry)
    assert _bad(_joined(files)).entry == 4


def test_a_dropped_entry_is_found_at_the_gap() -> None:
    files, _ = _log(5)
    del files["2024-03-01"][3]
    bad = _bad(_joined(files))
    assert bad.entry == 4
    assert "sequence number 5, expected 4" in bad.problem


def test_a_swapped_pair_is_found() -> None:
    files, _ = _log(5)
    entries = files["2024-03-01"]
    entries[2], entries[3] = entries[3], entries[2]
    bad = _bad(_joined(files))
    assert (bad.entry, bad.problem) == (3, "sequence number 4, expected 3")


def test_an_entry_rewritten_with_the_key_breaks_the_chain_at_the_next() -> None:
    """Even a forger holding the key who re-makes one entry (right sequence number,
    chained from the right MAC) cannot keep the next entry's MAC."""
    files, _ = _log(4)
    entries = files["2024-03-01"]
    frames = [f for f in walk(io.BytesIO(b"".join(entries)).read) if isinstance(f, Frame)]
    forged, _ = event_entry(
        frames[1].link, replace(RECEIVED, size=1), key_id="k1", kek=KEY, random=os.urandom
    )
    entries[2] = forged
    bad = _bad(_joined(files))
    assert bad.entry == 4
    assert "chain MAC" in bad.problem


def test_an_entry_sealed_under_another_key_does_not_open() -> None:
    files, _ = _log(3)
    entries = files["2024-03-01"]
    frames = [f for f in walk(io.BytesIO(b"".join(entries)).read) if isinstance(f, Frame)]
    entries[2], _ = event_entry(
        frames[1].link, _events(2)[1], key_id="k1", kek=OTHER, random=os.urandom
    )
    bad = _bad(_joined(files))
    assert bad.entry == 3
    assert bad.problem.startswith("does not open")


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 9, -1])
def test_a_torn_final_entry_is_not_damage(cut: int) -> None:
    files, _ = _log(3)
    data = _joined(files)
    last = files["2024-03-01"][-1]
    data["2024-03-01"] = data["2024-03-01"][: len(data["2024-03-01"]) - len(last) + cut % len(last)]
    assert _verify(data).entries == 3  # the anchor and two events


def test_a_zero_filled_tail_is_torn() -> None:
    files, _ = _log(2)
    data = _joined(files)
    data["2024-03-01"] += bytes(300)
    items = list(walk(io.BytesIO(data["2024-03-01"]).read))
    assert items[-1] == Tail(4, len(data["2024-03-01"]) - 300, True, "zero-filled tail")
    assert _verify(data).entries == 3


def test_a_torn_entry_before_the_newest_file_is_damage() -> None:
    files, _ = _log(3, 2)
    data = _joined(files)
    data["2024-03-01"] = data["2024-03-01"][:-7]
    bad = _bad(data)
    assert (bad.file, bad.entry) == ("2024-03-01", 4)
    assert "torn entry before the end" in bad.problem


def test_garbage_after_the_last_entry_is_damage_not_a_torn_tail() -> None:
    files, _ = _log(2)
    data = _joined(files)
    data["2024-03-01"] += b"not an entry at all"
    bad = _bad(data)
    assert (bad.entry, bad.problem) == (4, "bad frame header")


def test_the_chain_runs_on_after_older_files_expired() -> None:
    files, _ = _log(2, 3, 1)
    data = _joined(files)
    del data["2024-03-01"]
    assert _verify(data, keep_from="2024-03-02").entries == 4 + 2


def test_an_oldest_file_removed_before_it_expired_is_found() -> None:
    files, _ = _log(2, 3, 1)
    data = _joined(files)
    del data["2024-03-01"]
    bad = _bad(data, keep_from="2024-03-01")
    assert (bad.file, bad.entry) == ("2024-03-02", 1)
    assert "2024-03-01 is missing" in bad.problem


def test_a_removed_middle_file_is_found() -> None:
    files, _ = _log(2, 3, 1)
    data = _joined(files)
    del data["2024-03-02"]
    bad = _bad(data)
    assert (bad.file, bad.entry) == ("2024-03-03", 1)
    assert "anchor names 2024-03-02" in bad.problem


def test_a_file_without_its_anchor_is_found() -> None:
    files, _ = _log(2, 2)
    del files["2024-03-02"][0]
    bad = _bad(_joined(files))
    assert (bad.file, bad.entry, bad.problem) == (
        "2024-03-02",
        1,
        "file does not start with an anchor",
    )


def test_an_anchor_that_does_not_match_the_previous_end_is_found() -> None:
    files, ends = _log(2, 2)
    files["2024-03-02"], _ = _file(_events(2), Anchor("2024-03-01", Link(ends[0].seq, bytes(32))))
    bad = _bad(_joined(files))
    assert (bad.file, bad.entry) == ("2024-03-02", 1)
    assert "does not match the end of 2024-03-01" in bad.problem
