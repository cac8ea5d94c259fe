"""The benchmark's arithmetic: median and range over runs, per-run ratios, met/missed."""

from __future__ import annotations

from benchmarks.aggregate import Spread, cell, paired, ratios, spread, verdict


def test_spread_is_the_median_and_range_of_the_runs_present() -> None:
    assert spread([320.0, 300.0, 410.0]) == Spread(320.0, 300.0, 410.0, 3)
    assert spread([1.0, None, 3.0, 2.0, 10.0]) == Spread(2.5, 1.0, 10.0, 4)
    assert spread([None, None]) is None
    assert spread([]) is None


def test_ratios_pair_each_run_with_the_same_run_never_across_runs() -> None:
    mta = {1: 600.0, 2: 300.0, 3: 900.0}
    postfix = {1: 300.0, 2: 300.0, 3: None}
    pairs = paired(mta, postfix)
    assert pairs == [(600.0, 300.0), (300.0, 300.0), (900.0, None)]
    assert ratios(pairs) == [2.0, 1.0, None]
    # A run missing on one side, or a zero, is no ratio; the others still count.
    assert ratios(paired({1: 5.0}, {1: 0.0, 2: 4.0})) == [None, None]


def test_the_median_of_the_ratios_is_not_the_ratio_of_the_medians() -> None:
    # Run 1: mta fast, Postfix fast; run 2 and 3: both slow (a busy machine).
    mta = {1: 900.0, 2: 400.0, 3: 410.0}
    postfix = {1: 300.0, 2: 250.0, 3: 270.0}
    share = spread(ratios(paired(mta, postfix)))
    assert share is not None
    assert round(share.median, 3) == 1.6  # runs: 3.0, 1.6, 1.52
    assert round(share.low, 2) == 1.52
    assert share.high == 3.0


def test_verdict_judges_the_median_in_the_stated_direction() -> None:
    ratio = Spread(median=2.0, low=1.2, high=2.4, runs=3)
    assert verdict(ratio, 2.0, higher_is_better=True) is True  # at the goal: met
    assert verdict(ratio, 2.1, higher_is_better=True) is False  # one good run is not enough
    assert verdict(ratio, 2.0, higher_is_better=False) is True  # p99 <= goal
    assert verdict(ratio, 1.9, higher_is_better=False) is False
    assert verdict(None, 1.0, higher_is_better=True) is None


def test_cell_shows_the_median_and_the_range_only_with_several_runs() -> None:
    assert cell(Spread(642.71, 620.06, 1650.3, 3)) == "642.7 (620.1\N{EN DASH}1,650.3)"
    assert cell(Spread(1.4, 1.4, 1.4, 1), 2, "x") == "1.40x"
    assert cell(None) == "-"
