"""``mta report`` and ``GET /report``: the transparency page made from the receipt log.

The edges of the pure parts (``transparency`` figures, ``transparency_html`` page): read
the stored events, take the time, write the file. The command reads the day files with
the key file, relay running or not, after asking a running relay to write out what it
holds (``receipts-flush``); the relay's own ``/report`` writes its buffer out first, and
renders in a thread (reading and plotting take a while; the loop keeps carrying mail).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mta.clock import Clock
from mta.config import Config
from mta.report.receipt_log import flush_running, read_events, receipts_dir
from mta.report.transparency import build, period
from mta.report.transparency_html import render_html
from mta.spool.keys import KeyRing

__all__ = ["make_report_provider", "render_page", "run"]

EXIT_OK = 0


def render_page(
    directory: Path, keyring: KeyRing, *, now: float, days: int, title: str = ""
) -> str:
    """The page for the ``days`` UTC days up to ``now``, from the receipt files."""
    start, end = period(now, days)
    events = read_events(directory, keyring, start, end + 1)  # ``now`` itself included
    figures = build(events, now=now, days=days)
    return render_html(figures, title=title or "Transparency report")


def make_report_provider(
    directory: Path,
    keyring: KeyRing,
    clock: Clock,
    *,
    flush: Callable[[], Awaitable[object]] | None = None,
    title: str = "",
) -> Callable[[int], Awaitable[str]]:
    """``days -> HTML`` for the metrics listener's ``GET /report``."""

    async def report_page(days: int) -> str:
        if flush is not None:
            await flush()  # the receipts the relay still buffers belong on the page
        return await asyncio.to_thread(
            render_page, directory, keyring, now=clock.now(), days=days, title=title
        )

    return report_page


def run(cfg: Config, days: int, out: Path | None) -> int:
    """``mta report``: the page on stdout, or written to ``out`` (renamed into place)."""
    flush_running(cfg)
    page = render_page(
        receipts_dir(cfg),
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
