"""The operator's line to a running relay: a Unix socket (mode 0600) in the spool directory.

One command per connection, one line each way: ``flush`` -> ``ok 3``. Like Postfix's
``postqueue -f`` poking qmgr. Commands are looked up in a fixed table; nothing from
the socket reaches a shell or a file name. ``process_stats`` is what ``stats`` reports
about the process itself (asyncio tasks, resident memory, open file descriptors, Python
heap blocks): the figures an operator watches for a leak after a storm of failing peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_STATM: Final = Path("/proc/self/statm")
_FD_DIRS: Final = (Path("/proc/self/fd"), Path("/dev/fd"))

Command = Callable[[], Awaitable[str] | str]
ArgCommand = Callable[[str], Awaitable[str] | str]  # ``name argument`` (``tlsrpt-send DAY``)
MAX_LINE: Final = 256
MAX_ANSWER: Final = 16 * 1024 * 1024  # one answer line (``tlsrpt-show`` JSON) read by ``ask``


async def start_control(
    path: Path,
    commands: Mapping[str, Command],
    with_argument: Mapping[str, ArgCommand] | None = None,
) -> asyncio.Server:
    """Listen on ``path`` for operator commands; a stale socket from a crash is replaced.

    ``with_argument`` commands take the rest of the line after their name and a space
    (the handler validates it: it came from the socket)."""
    takes_argument = with_argument or {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            name = line[:MAX_LINE].decode("ascii", "replace").strip()
            head, _, argument = name.partition(" ")
            command: Command | None = commands.get(name)
            if command is None and head in takes_argument:
                with_it = takes_argument[head]
                command, name = (lambda: with_it(argument)), head
            if command is None:
                answer = f"error unknown command {name!r}"
            else:
                try:
                    result = command()
                    answer = await result if not isinstance(result, str) else result
                except Exception as err:  # the operator hears of it, not just the log
                    log.exception("control.failed", extra={"command": name})
                    answer = f"error {type(err).__name__}: {err}"
            log.info("control.command", extra={"command": name if command else "?"})
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # noqa: ASYNC240 - once, at start-up
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(serve, path=str(path))
    finally:
        os.umask(old_umask)
    return server


def process_stats() -> dict[str, int]:
    """The running process: ``tasks`` (asyncio tasks alive, this one included),
    ``rss_kb`` (resident memory now, not the peak), ``fds`` (open file descriptors) and
    ``py_blocks`` (memory blocks the Python heap holds: objects that pile up show here
    long before in ``rss_kb``, which also counts the allocators' warm-up and caches).

    ``rss_kb`` and ``fds`` are -1 where the system does not expose them (no ``/proc``).
    """
    return {
        "tasks": len(asyncio.all_tasks()),
        "rss_kb": _rss_kb(),
        "fds": _open_fds(),
        "py_blocks": sys.getallocatedblocks(),
    }


def _rss_kb() -> int:
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return -1
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _open_fds() -> int:
    for directory in _FD_DIRS:
        try:
            return len(os.listdir(directory)) - 1  # less the one listdir itself opened
        except OSError:
            continue
    return -1


async def _ask(path: Path, command: str, wait: float) -> str:
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(str(path), limit=MAX_ANSWER), wait
    )
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), wait)
    finally:
        writer.close()
    return line.decode("utf-8", "replace").strip()


def ask(path: Path, command: str, timeout: float = 10.0) -> str | None:
    """Send one command to a running relay; ``None`` when no relay is listening, an
    ``error ...`` answer when one took the connection and dropped it unanswered."""
    return asyncio.run(ask_async(path, command, timeout))


async def ask_async(path: Path, command: str, wait: float = 10.0) -> str | None:
    """``ask`` on a running event loop (a relay group's supervisor asks its workers)."""
    try:
        return await _ask(path, command, wait)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        return None
    except (ConnectionError, OSError) as err:
        return f"error the relay dropped the connection unanswered ({err.strerror or err})"
