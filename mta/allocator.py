"""The C allocator's arenas: two for the whole process, where the C library is glibc.

glibc gives each thread that allocates its own malloc arena (up to eight per CPU), and
an arena keeps the memory freed into it for reuse instead of returning it to the
system. Our threads are few and brief (spool reads and writes, ``asyncio.to_thread``),
but each one that reads a 1 MiB message back from the spool (opened chunks, the joined
content) leaves its arena holding several MiB: with 20 deliveries of 1 MiB messages in
flight that was some 25 MB of resident memory per process that no object used.

``ARENAS`` (2), measured with the benchmark (2026-12-04, 2 CPUs, shared machine), peak
RSS per process at one worker with 1 MiB messages and 4 KiB msg/s at two workers:
default arenas 168 MB (before the spool's own copies were cut); one arena 144 MB, but
4 KiB throughput fell from 490-610 to 350-460 msg/s (threads then wait for the one
arena's lock); with the spool's copies cut, two arenas 134-139 MB at 586-608 msg/s,
four 136-144 MB at 515-570 msg/s.

Not setting ``M_MMAP_THRESHOLD`` (each buffer over it its own ``mmap``, returned on
``free``): at 1 MiB it cut the peak by as much again, but cost 10-30 % more CPU per
1 MiB message in page faults.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final

log = logging.getLogger(__name__)

M_ARENA_MAX: Final = -8  # glibc <malloc.h>
ARENAS: Final = 2


def limit_arenas(count: int = ARENAS) -> bool:
    """Let the C allocator use at most ``count`` arenas (glibc ``mallopt``); call it
    before threads start, since arenas already made stay. False where it cannot be set
    (another C library, or ``mallopt`` refused it): the process then runs as before."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_ARENA_MAX, count))
    log.debug("allocator.arenas", extra={"max": count, "set": done})
    return done
