"""Several runs of one figure as one cell: the median, and the range (min-max) around it.

Why the median of several runs: one run on a shared 2-core machine moves by tens of
percent (a journal commit, another program), and the best of an afternoon is not what a
user measures. A target is judged on the median of the per-run ratios (each ratio from
mta and Postfix measured in the same run, so under the same conditions); the range
shows how much to trust it. Pure functions, no I/O: the harness's arithmetic, tested
on its own (tests/benchmarks/test_aggregate.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """One figure over several runs."""

    median: float
    low: float
    high: float
    runs: int


def spread(values: Iterable[float | None]) -> Spread | None:
    """The median and range of the values present; None if no run has one."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present), len(present))


def ratios(
    pairs: Iterable[tuple[float | None, float | None]],
) -> list[float | None]:
    """a/b per run (None where either is missing or b is 0): a ratio never mixes runs."""
    return [None if a is None or b is None or b == 0 else a / b for a, b in pairs]


def verdict(value: Spread | None, goal: float, higher_is_better: bool) -> bool | None:
    """Met (True) or missed (False) on the median; None when there is nothing to judge."""
    if value is None:
        return None
    return value.median >= goal if higher_is_better else value.median <= goal


def cell(value: Spread | None, digits: int = 1, suffix: str = "") -> str:
    """``642.7 (620.1-650.3)`` (an en dash); one run: just the value; nothing: ``-``."""
    if value is None:
        return "-"
    median = f"{value.median:,.{digits}f}{suffix}"
    if value.runs < 2:
        return median
    return f"{median} ({value.low:,.{digits}f}\N{EN DASH}{value.high:,.{digits}f})"


def paired(
    a: Mapping[int, float | None], b: Mapping[int, float | None]
) -> list[tuple[float | None, float | None]]:
    """Run i's value of ``a`` with run i's of ``b`` (by run number); missing: None."""
    return [(a.get(run), b.get(run)) for run in sorted(set(a) | set(b))]
