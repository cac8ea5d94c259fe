"""Is this key ring the spool's? Key checks, and the rule a ring must pass to be used.

A queued record sealed under a key id the ring does not hold is one of two things: mail
that a lost or swapped key file makes unreadable (refuse the ring and touch nothing), or
a record this spool never had the key of, copied from another relay or with a flipped
bit in its key id (quarantine it, alert, and carry on: one stray file must not stop all
mail). The key check tells them apart: each key that comes into the ring leaves
``spool/keys/<key id>``, a small record of known plaintext sealed under it, so the
spool remembers every key it has had until ``mta keys prune`` drops one.

The rule (``judge``, pure), at start and at every reload of the key file:

- a ring key whose key check fails, or (no key check yet) that opens none of the
  queued records sealed under its id, is a different key under the same id: refuse;
- a queued record needs an id the ring lacks that the spool has had (a key check
  names it) or that the relay holds now (a reload): the key was lost: refuse, saying
  which ids and how many records;
- otherwise records under ids the spool never had are foreign, provided the ring is
  shown to be the spool's (a key check passes, or it opens a queued record); if it is
  not, refuse as for a lost key: a spool from before key checks cannot tell.

Quarantined records are outside the queue and never count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from mta import durable as _files
from mta.errors import SpoolError
from mta.model import QueueId
from mta.spool.record import NAME, RecordError, RecordKind, seal, unseal
from mta.spool.store import SpoolDirectory

CHECK_QID: Final = "keycheck"
CHECK_TEXT: Final = b"mta spool key check 1\n"
MAX_CHECK_SIZE: Final = 4096

Keys = Callable[[str], bytes | None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``judge`` found: a refusal (one line naming the key file), or the foreign
    records to quarantine (qid -> key id) and the ring ids that lack a key check."""

    refusal: str | None = None
    foreign: Mapping[QueueId, str] = field(default_factory=dict)
    unchecked: tuple[str, ...] = ()


def _records(count: int) -> str:
    return f"{count} record{'' if count == 1 else 's'}"


def judge(
    key_file: Path,
    ring: Sequence[str],
    checks: Mapping[str, bool],
    needed: Mapping[str, Sequence[QueueId]],
    opened: Collection[str],
    failed: Collection[str],
    held: Collection[str] = (),
) -> Verdict:
    """Apply the rule (module docstring). Pure.

    Parameters:
        key_file: named in the refusal.
        ring: the ids of the ring to judge.
        checks: id -> whether the ring's key opens the spool's key check for that id
            (False when the ring lacks the id), for every key check the spool holds.
        needed: id -> the qid of each queued record sealed under it.
        opened: ring ids that opened at least one queued record sealed under them.
        failed: ring ids that failed to open one.
        held: the ids the running relay holds now (a reload must keep them if needed).
    """
    wrong = [k for k in ring if (not checks[k] if k in checks else k in failed and k not in opened)]
    if wrong:
        return Verdict(
            f"{key_file}: key id {', '.join(wrong)} is a different key from the one the "
            "spool sealed under that id (it fails its key check or opens none of the "
            "spooled records sealed under it)"
        )
    missing = {k: qids for k, qids in needed.items() if k not in ring}
    lost = sorted(k for k in missing if k in checks or k in held)
    shown = any(checks.get(k) for k in ring) or any(k in opened for k in ring)
    if lost or (missing and not shown):
        named = lost or sorted(missing)
        ids = ", ".join(f"{k} ({_records(len(missing[k]))})" for k in named)
        return Verdict(f"{key_file}: spooled records need key id {ids} that it does not hold")
    foreign = {qid: k for k, qids in missing.items() for qid in qids}
    return Verdict(foreign=foreign, unchecked=tuple(k for k in ring if k not in checks))


def assess(
    key_file: Path,
    ring: Sequence[str],
    keys: Keys,
    spool: SpoolDirectory,
    held: Collection[str] = (),
) -> Verdict:
    """``judge`` the ring (``ring`` ids, ``keys`` their keys) against the spool as it is."""
    opened, failed = spool.key_trials(keys)
    return judge(
        key_file, ring, check_results(spool, keys), spool.queued_references(), opened, failed, held
    )


# --- the key checks on disk ---


def _check_path(spool: SpoolDirectory, key_id: str) -> Path:
    return spool.check_dir / key_id


def check_results(spool: SpoolDirectory, keys: Keys) -> dict[str, bool]:
    """Id -> whether ``keys`` opens the spool's key check for it, for each one it holds."""
    results: dict[str, bool] = {}
    try:
        entries = sorted(os.listdir(spool.check_dir))
    except FileNotFoundError:
        return results
    for key_id in entries:
        if not NAME.fullmatch(key_id) or key_id.startswith("."):
            continue  # a temp file of write_check
        path = _check_path(spool, key_id)
        try:
            data = _files.read_file(path, MAX_CHECK_SIZE)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise SpoolError(f"{path}: cannot read the key check: {err.strerror}") from None
        results[key_id] = _opens(data, key_id, keys(key_id))
    return results


def _opens(data: bytes, key_id: str, kek: bytes | None) -> bool:
    if kek is None:
        return False
    try:
        text = unseal(data, kind=RecordKind.KEY_CHECK, qid=CHECK_QID, keys={key_id: kek}.get)
    except RecordError:
        return False
    return text == CHECK_TEXT


def write_check(
    spool: SpoolDirectory, key_id: str, kek: bytes, random: Callable[[int], bytes] = os.urandom
) -> None:
    """Leave the key check for ``key_id``, durably; one already there is kept (a check
    that fails must go on failing, not be replaced by the key it exposes)."""
    record = seal(
        CHECK_TEXT, kind=RecordKind.KEY_CHECK, qid=CHECK_QID, key_id=key_id, kek=kek, random=random
    )
    spool.check_dir.mkdir(mode=_files.DIR_MODE, parents=True, exist_ok=True)
    final = _check_path(spool, key_id)
    tmp = spool.check_dir / f".{key_id}.{random(6).hex()}.tmp"
    try:
        fd = _files.create_written(tmp, record)
        try:
            _files.settle(fd, tmp, final)
        finally:
            os.close(fd)
    except FileExistsError:
        return
    except OSError as err:
        raise SpoolError(f"{final}: cannot write the key check: {err.strerror}") from None


def remove_check(spool: SpoolDirectory, key_id: str) -> None:
    """Forget a key the ring no longer holds (``mta keys prune``)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_check_path(spool, key_id))


def write_checks(spool: SpoolDirectory, key_ids: Sequence[str], keys: Keys) -> None:
    """``write_check`` for each of ``key_ids`` (a verdict's ``unchecked``)."""
    for key_id in key_ids:
        kek = keys(key_id)
        if kek is not None:
            write_check(spool, key_id, kek)
