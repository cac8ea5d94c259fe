"""``GET /report``'s provider: the relay's buffer written out first, the page from the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mta.report.receipt_log import ReceiptLog
from mta.report.transparency_cli import make_report_provider
from mta.spool.keys import KeyRing
from tests.report.transparency_sample import NOW, week


class FakeClock:
    def __init__(self, now: float) -> None:
        self.moment = now

    def now(self) -> float:
        return self.moment


def test_the_provider_flushes_the_relays_buffer_then_renders_the_log(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    keyring = KeyRing.create(keys / "spool.key")
    directory = tmp_path / "receipts"
    clock = FakeClock(NOW)
    log = ReceiptLog.open(directory, keyring, max_age=30 * 86400, clock=clock)
    for event in week():
        log(event)  # held in memory: only the flush puts it on disk
    provider = make_report_provider(directory, keyring, clock, flush=log.flush, title="t")
    page = asyncio.run(provider(2))
    assert log.pending == 0
    assert page.count("<tr><td>2024-03-0") == 2
    assert "<td>2024-03-07</td><td>179</td>" in page  # the buffered events are counted

    unflushed = make_report_provider(tmp_path / "empty", keyring, clock)
    assert "No mail was delivered in this period." in asyncio.run(unflushed(1))
