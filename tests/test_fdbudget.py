"""The descriptor budget: which connection caps fit in RLIMIT_NOFILE (a table, no I/O)."""

from __future__ import annotations

import pytest

from mta.fdbudget import RESERVE, UNLIMITED, Budget, fit, needed, soft_limit


@pytest.mark.parametrize(
    ("nofile", "connections", "deliveries", "expected"),
    [
        (65536, 1000, 100, (1000, 100)),  # fits: unchanged
        (RESERVE + 1200, 1000, 100, (1000, 100)),  # exactly
        (256, 1000, 100, (160, 16)),  # 192 left: shared in proportion
        (1024, 1000, 100, (800, 80)),
        (RESERVE + 3, 1000, 100, (1, 1)),  # the least that works
        (256, 10, 1000, (2, 95)),  # in proportion, whichever is larger
    ],
)
def test_fit(nofile: int, connections: int, deliveries: int, expected: tuple[int, int]) -> None:
    budget = fit(nofile, connections, deliveries)
    assert (budget.connections, budget.deliveries) == expected
    assert needed(budget.connections, budget.deliveries) <= nofile
    assert budget == Budget(nofile, *expected)


def test_too_few_descriptors_is_an_error() -> None:
    with pytest.raises(ValueError, match="RLIMIT_NOFILE 66 is too low"):
        fit(RESERVE + 2, 10, 10)


@pytest.mark.parametrize(
    ("soft", "hard", "want", "expected"),
    [
        (1024, 4096, 1264, 1264),  # raised as far as needed
        (1024, 1100, 1264, 1100),  # to the hard limit, no further
        (1024, UNLIMITED, 1264, 1264),
        (4096, 8192, 1264, 4096),  # never lowered
    ],
)
def test_soft_limit(soft: int, hard: int, want: int, expected: int) -> None:
    assert soft_limit(soft, hard, want) == expected
