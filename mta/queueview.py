"""``mta queue list|flush`` and ``mta keys list`` read the spool directly, relay running or not.

(``mta queue show|hold|release|delete|requeue`` live in ``queuetools``.)

Like ``mailq``, listing needs no running relay: it opens the sealed state records with
the key file (a message never attempted has no state yet; its envelope is read instead).
Only domains are shown, never addresses. Offline flush rewrites states as due now.
"""

from __future__ import annotations

import time
from typing import Any

from mta import shards
from mta.config import Config
from mta.errors import SpoolCorrupt, SpoolError
from mta.model import QueueId
from mta.schedule.state import (
    MessageState,
    QueueEntry,
    decode_state,
    encode_state,
    initial_state,
    queue_entry,
)
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolDirectory, SpoolStore


async def stored_state(store: SpoolStore, qid: QueueId) -> MessageState | None:
    """The message's state, or ``None`` when it vanished (delivered) or is corrupt.

    A running relay removes delivered messages while we list: a message file that is
    gone by the time we read it is not an error.
    """
    try:
        data = await store.read_state(qid)
        if data is not None:
            return decode_state(data)
        envelope, _ = await store.read(qid)
    except SpoolCorrupt:
        return None
    except SpoolError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return None
        raise
    return initial_state(envelope)


def _stores(config: Config) -> list[SpoolStore]:
    """A store for every spool directory: the root and a relay group's shards."""
    keyring = KeyRing.load(config.spool.key_file)
    return [SpoolStore(path, keyring) for path in shards.spool_dirs(config)]


async def list_queue(config: Config, now: float) -> list[QueueEntry]:
    """Every queued message (of every shard), oldest first."""
    entries = []
    for store in _stores(config):
        for qid in store.queue_ids():
            state = await stored_state(store, qid)
            if state is not None:
                entries.append(queue_entry(qid, state, now))
    return sorted(entries, key=lambda entry: -entry.age)


async def flush_offline(config: Config, now: float) -> int:
    """Make every pending recipient due now, for a relay that is not running."""
    count = 0
    for store in _stores(config):
        for qid in store.queue_ids():
            state = await stored_state(store, qid)
            if state is not None and state.pending and not state.held:
                await store.write_state(qid, encode_state(state.flush(now)))
                count += 1
    return count


def key_usage(config: Config) -> dict[str, int]:
    """Key id -> spool records sealed under it, in every shard (headers only)."""
    counts: dict[str, int] = {}
    for path in shards.spool_dirs(config):
        for key_id, count in SpoolDirectory(path).key_references().items():
            counts[key_id] = counts.get(key_id, 0) + count
    return counts


def when_text(moment: float | None, now: float) -> str:
    """A next attempt as ``mailq`` shows it: ``now``, ``-`` (none) or the time until it."""
    if moment is None:
        return "-"
    return "now" if moment <= now else _span(moment - now)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def entry_dict(entry: QueueEntry) -> dict[str, Any]:
    """The JSON form: times as seconds (age) and epoch seconds (next attempt)."""
    return {
        "qid": entry.qid,
        "age": round(entry.age, 1),
        "domains": list(entry.domains),
        "next_attempt": entry.next_attempt,
        "last_error": entry.last_error,
        "held": entry.held,
    }


def entry_line(entry: QueueEntry, now: float | None = None) -> str:
    """One ``mailq``-style line: qid (``!`` after it when held, as ``mailq`` marks mail on
    hold), age, next attempt in, domains, last error."""
    now = time.time() if now is None else now
    qid = entry.qid + ("!" if entry.held else "")
    line = f"{qid:<22} {_span(entry.age):>7}  {when_text(entry.next_attempt, now):>7}  "
    line += ",".join(entry.domains)
    return line + (f"  ({entry.last_error})" if entry.last_error else "")
