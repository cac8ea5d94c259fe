"""``allocator.limit_arenas``: threads that allocate share at most ``ARENAS`` arenas (glibc).

Each case runs in a fresh interpreter (arenas made stay for a process's life) and
counts the arenas with glibc's own ``malloc_info`` report (one ``<heap>`` each).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from mta.allocator import ARENAS

_PROBE = textwrap.dedent(
    """
    import ctypes, sys, tempfile, threading
    from mta import allocator

    if sys.argv[1] == "limit":
        assert allocator.limit_arenas()
    held = []
    together = threading.Barrier(8)
    def work():
        together.wait()  # all at once: no thread finds an arena another has left
        held.append(bytearray(200_000))  # below the mmap threshold: from an arena
        together.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    with tempfile.NamedTemporaryFile() as out:
        fp = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        print(open(out.name).read().count("<heap nr="))
    """
)


def _arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=30, check=True
    )
    return int(done.stdout)


def test_threads_share_few_arenas_once_limited() -> None:
    assert _arenas("default") > ARENAS  # the probe does make threads use arenas of their own
    assert 1 <= _arenas("limit") <= ARENAS
