"""``mta report`` and ``GET /report``: the transparency page made from the receipt log.

The edges of the pure parts (``transparency`` figures, ``transparency_html`` page): read
the stored events, take the time, write the file. The command reads the day files with
the key file, relay running or not, after asking a running relay to write out what it
holds (``receipts-flush``); the relay's own ``/report`` writes its buffer out first, and
renders in a thread (reading and plotting take a while; the loop keeps carrying mail).
A page is kept while the receipt files and the day stay as they are: asking again costs
a directory listing, not a second of plotting.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from mta.clock import Clock
from mta.config import Config
from mta.report.receipt_log import (
    Directories,
    day_files,
    flush_running,
    read_events,
    receipt_dirs,
)
from mta.report.transparency import build, period
from mta.report.transparency_html import render_html
from mta.spool.keys import KeyRing

__all__ = ["PageCache", "log_state", "make_report_provider", "render_page", "run"]

EXIT_OK = 0
CACHED_PAGES: Final = 4  # pages kept by ``GET /report`` (one per ``days`` asked for)


def render_page(
    directory: Directories, keyring: KeyRing, *, now: float, days: int, title: str = ""
) -> str:
    """The page for the ``days`` UTC days up to ``now``, from the receipt files."""
    start, end = period(now, days)
    events = read_events(directory, keyring, start, end + 1)  # ``now`` itself included
    figures = build(events, now=now, days=days)
    return render_html(figures, title=title or "Transparency report")


def make_report_provider(
    directory: Directories,
    keyring: KeyRing,
    clock: Clock,
    *,
    flush: Callable[[], Awaitable[object]] | None = None,
    title: str = "",
) -> Callable[[int], Awaitable[str]]:
    """``days -> HTML`` for the metrics listener's ``GET /report``.

    The page for ``days`` is made again only when the receipt files changed (a new event
    appended, a day file expired) or a new UTC day began; until then the same page, and
    its "made" time, is served: its figures are still the current ones. One page is made
    at a time: requests arriving together wait for it (and most then find it kept) rather
    than each hold a worker thread that the spool also uses, and the GIL, for a second.
    """
    pages = PageCache(CACHED_PAGES)
    one_at_a_time = asyncio.Lock()

    def page(days: int) -> str:
        now = clock.now()
        key = (days, period(now, days)[0], log_state(directory))
        cached = pages.get(key)
        if cached is None:
            cached = render_page(directory, keyring, now=now, days=days, title=title)
            pages.put(key, cached)
        return cached

    async def report_page(days: int) -> str:
        if flush is not None:
            await flush()  # the receipts the relay still buffers belong on the page
        async with one_at_a_time:
            return await asyncio.to_thread(page, days)

    return report_page


LogState = tuple[tuple[str, int, int], ...]


def log_state(directories: Directories) -> LogState:
    """The receipt files as they are now: (name, size, mtime in ns) each. The files are
    only appended to, cut at a torn tail, or removed: any change shows here."""
    state = []
    each = [directories] if isinstance(directories, Path) else directories
    for directory, name in ((d, n) for d in each for n in day_files(d)):
        try:
            stat = (directory / name).stat()
        except FileNotFoundError:
            continue  # expired while we looked
        state.append((str(directory / name), stat.st_size, stat.st_mtime_ns))
    return tuple(state)


PageKey = tuple[int, float, LogState]


class PageCache:
    """The last few pages made, by (days, first midnight, log state); thread-safe
    (pages are made in worker threads)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, tuple[PageKey, str]] = {}  # by days, the latest used last
        self._lock = threading.Lock()

    def get(self, key: PageKey) -> str | None:
        with self._lock:
            kept = self._pages.pop(key[0], None)
            if kept is None:
                return None
            self._pages[key[0]] = kept  # the latest used last
            return kept[1] if kept[0] == key else None

    def put(self, key: PageKey, page: str) -> None:
        with self._lock:
            self._pages.pop(key[0], None)
            self._pages[key[0]] = (key, page)
            while len(self._pages) > self._size:
                del self._pages[next(iter(self._pages))]


def run(cfg: Config, days: int, out: Path | None) -> int:
    """``mta report``: the page on stdout, or written to ``out`` (renamed into place)."""
    flush_running(cfg)
    page = render_page(
        receipt_dirs(cfg),
        KeyRing.load(cfg.spool.key_file),
        now=time.time(),
        days=days,
        title=_title(cfg),
    )
    if out is None:
        sys.stdout.write(page)
        return EXIT_OK
    tmp = out.with_name(f".{out.name}.tmp")  # a reader never sees half a page
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    print(f"report: {days} day(s) written to {out}", file=sys.stderr)
    return EXIT_OK


def _title(cfg: Config) -> str:
    name = cfg.hostname or os.uname().nodename
    return f"Transparency report: {name}"
