"""The retry schedule: when to try a deferred recipient again, and when to give up.

Pure: no I/O, no clock (``now`` is a parameter). Postfix-style doubling: the first
retry comes ``retry_min`` after the failure, each further one twice as late, never
more than ``retry_max`` apart (RFC 5321 §4.5.4.1: retry at intervals, give up after
some days and then send a DSN).
"""

from __future__ import annotations

from typing import Final

# 2**_MAX_DOUBLINGS * retry_min is far beyond any sane retry_max; capping the
# exponent keeps a recipient with thousands of attempts from overflowing a float.
_MAX_DOUBLINGS: Final = 64


def retry_delay(attempts: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt.

    Parameters:
        attempts: failed attempts so far, counting the one that just failed (0 and 1
            both give ``retry_min``).
        retry_min: the first delay, in seconds.
        retry_max: the longest delay, in seconds.
    """
    doublings = min(max(attempts - 1, 0), _MAX_DOUBLINGS)
    return float(min(retry_max, retry_min * 2**doublings))


def next_attempt(attempts: int, now: float, retry_min: float, retry_max: float) -> float:
    """When to try again after the ``attempts``-th failed attempt, made at ``now``."""
    return now + retry_delay(attempts, retry_min, retry_max)


def expired(received_at: float, now: float, max_age: float) -> bool:
    """Whether a message received at ``received_at`` has been queued for ``max_age`` or more."""
    return now - received_at >= max_age
