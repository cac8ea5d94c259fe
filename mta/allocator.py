"""The C allocator's arenas: one for the whole process, where the C library is glibc.

glibc gives each thread that allocates its own malloc arena (up to eight per CPU), and
an arena keeps the memory freed into it for reuse instead of returning it to the
system. Our threads are few and brief (spool reads and writes, ``asyncio.to_thread``),
but each one that reads a 1 MiB message back from the spool (file bytes, opened
chunks, the joined content) leaves its arena holding several MiB: with 20 deliveries
of 1 MiB messages in flight that was some 25 MB of resident memory per process that
no object used (the benchmark's ``reused-1m`` peak RSS per process, 2026-12-04: 168 MB
with the default arenas, 144 MB with ``MALLOC_ARENA_MAX=1``; CPU per message and
msg/s unchanged, since the interpreter lock serialises the threads' allocations
anyway). One arena lets memory freed by one thread serve the next allocation of any.

Not setting ``M_MMAP_THRESHOLD`` too: a fixed threshold (each 1 MiB buffer its own
``mmap``, returned on ``free``) cut the peak further but cost a third more CPU per
message in page faults.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final

log = logging.getLogger(__name__)

M_ARENA_MAX: Final = -8  # glibc <malloc.h>


def limit_arenas(count: int = 1) -> bool:
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
