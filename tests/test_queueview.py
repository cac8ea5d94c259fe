"""``mta queue list`` reads the spool while a running relay changes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mta import config, queueview
from mta.model import Envelope, QueueId
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolStore

ENVELOPE = Envelope("alice@example.org", ("bob@example.net",), 1_700_000_000.0, "192.0.2.7")


def test_a_message_delivered_while_listing_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.parse_text("", "test.toml", tmp_path)
    store = SpoolStore(cfg.spool.path, KeyRing.create(cfg.spool.key_file))
    store.ensure_dirs()
    gone, kept = (asyncio.run(store.put(ENVELOPE, b"Subject: x\r\n\r\nx\r\n")) for _ in "ab")
    read_state = SpoolStore.read_state

    async def delivered_meanwhile(self: SpoolStore, qid: QueueId) -> bytes | None:
        if qid == gone:  # the relay finishes it between the scan and the read
            await self.remove(qid)
        return await read_state(self, qid)

    monkeypatch.setattr(SpoolStore, "read_state", delivered_meanwhile)
    entries = asyncio.run(queueview.list_queue(cfg, now=1_700_000_100.0))
    assert [entry.qid for entry in entries] == [kept]
