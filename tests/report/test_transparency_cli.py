"""``GET /report``'s provider: the relay's buffer written out first, the page from the log."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from mta.report import transparency_cli
from mta.report.receipt_log import ReceiptLog
from mta.report.transparency import Transparency
from mta.report.transparency_cli import PageCache, make_report_provider
from mta.report.transparency_html import render_html
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


def test_the_provider_makes_a_page_again_only_when_the_log_or_the_day_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    keyring = KeyRing.create(keys / "spool.key")
    directory = tmp_path / "receipts"
    clock = FakeClock(NOW)
    log = ReceiptLog.open(directory, keyring, max_age=30 * 86400, clock=clock)
    events = week()
    for event in events[:-1]:
        log(event)
    made: list[int] = []

    def counting(figures: Transparency, *, title: str = "") -> str:
        made.append(len(figures.days))
        return render_html(figures, title=title)

    monkeypatch.setattr(transparency_cli, "render_html", counting)
    provider = make_report_provider(directory, keyring, clock, flush=log.flush)
    first = asyncio.run(provider(2))
    clock.moment += 60
    assert asyncio.run(provider(2)) == first  # nothing new: the same page, not made again
    assert made == [2]
    assert "<td>2024-03-07</td><td>178</td>" in first
    assert asyncio.run(provider(7)).count("<tr><td>2024-03-0") == 7  # another period
    assert asyncio.run(provider(2)) == first  # still kept beside it
    assert made == [2, 7]

    log(events[-1])  # a new event, written out by the next request's flush
    assert "<td>2024-03-07</td><td>179</td>" in asyncio.run(provider(2))
    assert made == [2, 7, 2]

    clock.moment = NOW + 86400  # a new UTC day: the period moved
    assert "<td>2024-03-08</td><td>0</td>" in asyncio.run(provider(2))
    assert made == [2, 7, 2, 2]


def test_the_page_cache_keeps_the_latest_used_pages() -> None:
    cache = PageCache(2)
    cache.put((1, 0.0, ()), "one")
    cache.put((2, 0.0, ()), "two")
    assert cache.get((1, 0.0, ())) == "one"  # 1 is now the latest used
    cache.put((3, 0.0, ()), "three")  # 2 goes
    assert cache.get((2, 0.0, ())) is None
    assert cache.get((1, 0.0, ())) == "one"
    assert cache.get((1, 1.0, ())) is None  # same days, another period: made again
    assert cache.get((3, 0.0, (("2024-03-01", 1, 1),))) is None  # the log changed


def test_requests_arriving_together_make_one_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    keyring = KeyRing.create(keys / "spool.key")
    directory = tmp_path / "receipts"
    clock = FakeClock(NOW)
    log = ReceiptLog.open(directory, keyring, max_age=30 * 86400, clock=clock)
    for event in week():
        log(event)
    asyncio.run(log.flush())
    busy = threading.Lock()  # held while a page is made: a second one at once fails
    made: list[int] = []

    def exclusive(figures: Transparency, *, title: str = "") -> str:
        assert busy.acquire(blocking=False), "two pages made at once"
        try:
            made.append(len(figures.days))
            time.sleep(0.05)  # long enough for the others to arrive
            return render_html(figures, title=title)
        finally:
            busy.release()

    monkeypatch.setattr(transparency_cli, "render_html", exclusive)
    provider = make_report_provider(directory, keyring, clock, flush=log.flush)

    async def together() -> list[str]:
        return await asyncio.gather(*(provider(2) for _ in range(6)))

    pages = asyncio.run(together())
    assert made == [2]  # the first made it, the other five found it kept
    assert len(set(pages)) == 1
