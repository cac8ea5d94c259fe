"""The operator's line to a running relay: a Unix socket (mode 0600) in the spool directory.

One command per connection, one line each way: ``flush`` -> ``ok 3``. Like Postfix's
``postqueue -f`` poking qmgr. Commands are looked up in a fixed table; nothing from
the socket reaches a shell or a file name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

Command = Callable[[], Awaitable[str] | str]
MAX_LINE: Final = 256


async def start_control(path: Path, commands: Mapping[str, Command]) -> asyncio.Server:
    """Listen on ``path`` for operator commands; a stale socket from a crash is replaced."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            name = line[:MAX_LINE].decode("ascii", "replace").strip()
            command = commands.get(name)
            if command is None:
                answer = f"error unknown command {name!r}"
            else:
                result = command()
                answer = await result if not isinstance(result, str) else result
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


async def _ask(path: Path, command: str, wait: float) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), wait)
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), wait)
    finally:
        writer.close()
    return line.decode("utf-8", "replace").strip()


def ask(path: Path, command: str, timeout: float = 10.0) -> str | None:
    """Send one command to a running relay; ``None`` when no relay is listening."""
    try:
        return asyncio.run(_ask(path, command, timeout))
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError):
        return None
