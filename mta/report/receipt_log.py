"""The receipt log on disk: sealed, chained entries, one file per UTC day.

Interim: the reader's signature is published first so TLS-RPT and the transparency
report can bind it (``functools.partial(read_events, directory, keyring)`` is an
``EventSource``); the writer and the chain land next.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mta.events import Event
from mta.spool.keys import KeyRing

__all__ = ["read_events"]


def read_events(directory: Path, keyring: KeyRing, start: float, end: float) -> Iterator[Event]:
    """The stored events with ``start <= at < end`` (epoch seconds), oldest first."""
    del directory, keyring, start, end
    return iter(())
