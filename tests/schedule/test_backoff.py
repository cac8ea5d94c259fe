"""The retry schedule: doubling from retry_min, capped at retry_max; expiry at max_age."""

from __future__ import annotations

import pytest

from mta.schedule.backoff import expired, next_attempt, retry_delay

MIN, MAX = 300.0, 4000.0


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [
        (0, 300.0),  # no failure yet counts as the first
        (1, 300.0),
        (2, 600.0),
        (3, 1200.0),
        (4, 2400.0),
        (5, 4000.0),  # 4800 capped
        (6, 4000.0),
        (1000, 4000.0),
        (10**6, 4000.0),  # no float overflow
    ],
)
def test_delay_doubles_then_caps(attempts: int, delay: float) -> None:
    assert retry_delay(attempts, MIN, MAX) == delay
    assert next_attempt(attempts, 1000.0, MIN, MAX) == 1000.0 + delay


def test_min_above_max_gives_max() -> None:
    assert retry_delay(1, 600.0, 60.0) == 60.0


@pytest.mark.parametrize(
    ("received_at", "now", "max_age", "result"),
    [
        (0.0, 0.0, 100.0, False),
        (0.0, 99.9, 100.0, False),
        (0.0, 100.0, 100.0, True),  # exactly max_age counts as expired
        (0.0, 1e9, 100.0, True),
        (50.0, 100.0, 100.0, False),
        (200.0, 100.0, 100.0, False),  # clock behind the receipt time
    ],
)
def test_expired(received_at: float, now: float, max_age: float, result: bool) -> None:
    assert expired(received_at, now, max_age) is result
