"""How many connections fit in the process's file descriptors (RLIMIT_NOFILE). Pure.

Every inbound session holds a descriptor, and every delivery in flight holds two (its
SMTP connection and, at times, a DNS query). The rest of the relay needs a reserve
that no load may take: the spool's writer threads each hold a temp file, the
listeners, DNS and MTA-STS fetches, the log, and above all the control socket, which
must answer ``mta stats`` and ``mta queue flush`` however busy the relay is. When the
configured caps do not fit, ``app`` first raises the soft limit (up to the hard one)
and then clamps the caps to what fits, keeping their proportions, and says so once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

RESERVE: Final = 64
PER_SESSION: Final = 1
PER_DELIVERY: Final = 2
UNLIMITED: Final = -1  # resource.RLIM_INFINITY on Linux


@dataclass(frozen=True, slots=True)
class Budget:
    """The caps that fit in ``nofile`` descriptors."""

    nofile: int
    connections: int  # limits.connections
    deliveries: int  # outbound.max_connections


def needed(connections: int, deliveries: int) -> int:
    """Descriptors for ``connections`` inbound sessions and ``deliveries`` in flight."""
    return RESERVE + PER_SESSION * connections + PER_DELIVERY * deliveries


def soft_limit(soft: int, hard: int, want: int) -> int:
    """The soft limit to ask for: ``want``, never lower than now nor above ``hard``."""
    if want <= soft:
        return soft
    return want if hard == UNLIMITED else min(want, hard)


def fit(nofile: int, connections: int, deliveries: int) -> Budget:
    """The caps clamped to ``nofile`` (unchanged when they fit), in proportion to the
    configured ones. ``ValueError`` when not even one session and one delivery fit."""
    room = nofile - RESERVE
    if room < PER_SESSION + PER_DELIVERY:
        raise ValueError(
            f"RLIMIT_NOFILE {nofile} is too low: the relay needs at least "
            f"{RESERVE + PER_SESSION + PER_DELIVERY} file descriptors"
        )
    wanted = PER_SESSION * connections + PER_DELIVERY * deliveries
    if wanted <= room:
        return Budget(nofile, connections, deliveries)
    share = room * PER_DELIVERY * deliveries // wanted  # descriptors for deliveries
    fitted_deliveries = max(1, min(deliveries, share // PER_DELIVERY))
    left = room - PER_DELIVERY * fitted_deliveries
    return Budget(nofile, max(1, min(connections, left // PER_SESSION)), fitted_deliveries)
