"""Is this key ring the spool's: the rule (a table, no I/O) and the key checks on disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mta.model import Envelope, QueueId
from mta.spool import keycheck
from mta.spool.keycheck import judge
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolStore

KEY_FILE = Path("/var/lib/mta/keys/spool.key")
Q1, Q2, Q3 = QueueId("q1"), QueueId("q2"), QueueId("q3")


@pytest.mark.parametrize(
    ("ring", "checks", "needed", "opened", "failed", "held", "expected"),
    [
        # Our key, our records: nothing to say.
        (["A"], {"A": True}, {"A": [Q1, Q1]}, {"A"}, set(), (), None),
        # One record from another relay (key id Z never ours): quarantine it, carry on.
        (["A"], {"A": True}, {"A": [Q1], "Z": [Q2]}, {"A"}, set(), (), {Q2: "Z"}),
        # ... even when it is the only record in the spool: the key check vouches.
        (["A"], {"A": True}, {"Z": [Q2]}, set(), set(), (), {Q2: "Z"}),
        # A flipped bit in a key id: the id is one the spool never had.
        (["A", "B"], {"A": True, "B": True}, {"B": [Q1], "B0": [Q3]}, {"B"}, set(), (), {Q3: "B0"}),
        # Another relay's key file: it lacks a key the spool has had and needs.
        (["B"], {"A": False}, {"A": [Q1, Q1]}, set(), set(), (), "need key id A (2 records)"),
        # The same id with other key bytes: the key check fails.
        (["A"], {"A": False}, {"A": [Q1]}, set(), {"A"}, (), "A is a different key"),
        # ... and with no key check yet (a spool from before them): it opens nothing.
        (["A"], {}, {"A": [Q1]}, set(), {"A"}, (), "A is a different key"),
        # A key that opens some of its records is right; the others are corrupt.
        (["A"], {}, {"A": [Q1, Q2]}, {"A"}, {"A"}, (), None),
        # No key checks, and the ring opens nothing: a lost key or foreign records?
        # It cannot tell, so it refuses.
        (["B"], {}, {"Z": [Q2]}, set(), set(), (), "need key id Z (1 record)"),
        # No key checks, but the ring opens queued records: the stray one is foreign.
        (["A"], {}, {"A": [Q1], "Z": [Q2]}, {"A"}, set(), (), {Q2: "Z"}),
        # A reload that drops a key the running relay holds and the spool needs.
        (["B"], {"B": True}, {"A": [Q1, Q1, Q2]}, set(), set(), ("A", "B"), "A (3 records)"),
        # Quarantined records are not passed in at all: nothing needs A now.
        (["B"], {"A": False, "B": True}, {"B": [Q1]}, {"B"}, set(), ("A", "B"), None),
    ],
    ids=[
        "ours",
        "copied-record",
        "lone-copied-record",
        "flipped-key-id",
        "other-key-file",
        "same-id-other-key",
        "same-id-other-key-no-check",
        "some-records-corrupt",
        "no-checks-opens-nothing",
        "no-checks-opens-some",
        "reload-drops-needed-key",
        "dropped-key-not-needed",
    ],
)
def test_judge(
    ring: list[str],
    checks: dict[str, bool],
    needed: dict[str, list[QueueId]],
    opened: set[str],
    failed: set[str],
    held: tuple[str, ...],
    expected: str | dict[QueueId, str] | None,
) -> None:
    verdict = judge(KEY_FILE, ring, checks, needed, opened, failed, held)
    if isinstance(expected, str):
        assert verdict.refusal is not None
        assert verdict.refusal.startswith(f"{KEY_FILE}: ")
        assert expected in verdict.refusal
        assert "\n" not in verdict.refusal
    else:
        assert verdict.refusal is None
        assert dict(verdict.foreign) == (expected or {})


def test_judge_lists_ring_keys_without_a_check() -> None:
    verdict = judge(KEY_FILE, ["A", "B"], {"A": True}, {}, set(), set())
    assert verdict.unchecked == ("B",)


def test_key_checks_on_disk(tmp_path: Path) -> None:
    ring = KeyRing.create(tmp_path / "keys" / "spool.key")
    store = SpoolStore(tmp_path / "spool", ring)
    store.ensure_dirs()
    active = ring.active_id
    assert keycheck.check_results(store, ring.get) == {}
    keycheck.write_checks(store, ring.ids(), ring.get)
    assert keycheck.check_results(store, ring.get) == {active: True}
    impostor = {active: os.urandom(32)}
    assert keycheck.check_results(store, impostor.get) == {active: False}
    assert keycheck.check_results(store, {}.get) == {active: False}
    # A check already there is kept, even by a different key under the same id.
    keycheck.write_check(store, active, impostor[active])
    assert keycheck.check_results(store, ring.get) == {active: True}
    assert [p.name for p in store.check_dir.iterdir()] == [active]  # no temp file left
    keycheck.remove_check(store, active)
    assert keycheck.check_results(store, ring.get) == {}


def test_assess_reads_the_spool(tmp_path: Path) -> None:
    ring = KeyRing.create(tmp_path / "keys" / "spool.key")
    store = SpoolStore(tmp_path / "spool", ring)
    store.ensure_dirs()
    keycheck.write_checks(store, ring.ids(), ring.get)
    envelope = Envelope("a@example.org", ("b@example.net",), 1.0, "192.0.2.1")
    qid = asyncio.run(store.put(envelope, b"Subject: x\r\n\r\nx\r\n"))
    asyncio.run(store.write_state(qid, b"state"))
    other = KeyRing.create(tmp_path / "other" / "spool.key")
    foreign = SpoolStore(tmp_path / "spool", other)
    stray = asyncio.run(foreign.put(envelope, b"Subject: y\r\n\r\ny\r\n"))
    verdict = keycheck.assess(ring.path, ring.ids(), ring.get, store)
    assert verdict.refusal is None
    assert dict(verdict.foreign) == {stray: other.active_id}
    # The other relay's key file against our spool: our key is needed and missing.
    verdict = keycheck.assess(other.path, other.ids(), other.get, store)
    assert verdict.refusal is not None
    assert f"need key id {ring.active_id} (2 records)" in verdict.refusal
