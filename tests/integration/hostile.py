"""Hostile far ends for outbound tests: a receiving server that lies, and a man in the middle.

Both run asyncio on their own event loop in a background thread, on a loopback address.

``HostileServer`` is a minimal SMTP server written on raw streams, so that it can do what
aiosmtpd never would: after ``220`` to STARTTLS it sends ``inject`` (extra reply lines a
man in the middle could have slipped in), in the same write as the ``220`` or right after
it, then starts TLS (``StreamWriter.start_tls``). Every command line it reads is kept
with whether it came over TLS; every message with the exact bytes of its DATA section.
Its own replies after TLS say ``real``, so a client that took an injected line for a
reply is caught by the text. ``surplus`` is sent in the same write as its EHLO reply
over TLS: a reply nobody asked for, which a client must not pair with its next command.
With ``pipelining`` it offers PIPELINING (RFC 2920), answers the commands in ``replies``
(a command line's start, say ``b"RCPT TO:<carol@"``, to its reply line; ``DATA`` too)
and keeps every read as it came (``reads``), so a test sees what arrived in one write.
``stall``: after ``354`` it reads nothing more.

``StrippingProxy`` sits between a client and an SMTP server: in ``"pass"`` mode it only
forwards (raw bytes once STARTTLS has gone through), in ``"hide"`` mode it removes
STARTTLS from EHLO replies, in ``"454"`` mode it answers STARTTLS itself with ``454`` and
never forwards it. It keeps the plaintext the client sent, so a test can show that no
mail command crossed in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from tests.integration.threaded import ThreadedServer

ProxyMode = Literal["pass", "hide", "454"]


class _LoopThread(ThreadedServer):
    """A ``ThreadedServer`` that runs one ``asyncio.start_server`` calling ``handle``."""

    def __init__(self, host: str, port: int, kind: str) -> None:
        self.host, self.port, self.kind = host, port, kind
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            server = loop.run_until_complete(
                asyncio.start_server(self._tracked, self.host, self.port)
            )
        except BaseException as err:
            self._error = err
            asyncio.set_event_loop(None)
            loop.close()
            ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown(server))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()


@dataclass(frozen=True)
class Seen:
    """A command line the server read, and whether it came over TLS."""

    tls: bool
    line: bytes


class HostileServer(_LoopThread):
    """An SMTP server that injects ``inject`` after its ``220`` to STARTTLS.

    Parameters:
        host: a loopback address.
        context: the server TLS context (STARTTLS is offered only with one).
        inject: bytes sent after ``220 Ready to start TLS`` and before the handshake.
        separate: send them in a write of their own (else the same write as the 220).
        surplus: bytes sent right after the EHLO reply over TLS, in the same write.
        stall: after ``354`` to DATA, read nothing more (a peer that stopped reading).
        pipelining: offer PIPELINING.
        replies: a command line's start -> the reply line to give it instead of ``250``.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        context: ssl.SSLContext | None = None,
        inject: bytes = b"",
        separate: bool = False,
        surplus: bytes = b"",
        stall: bool = False,
        pipelining: bool = False,
        replies: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(host, port, "hostile")
        self.context, self.inject, self.separate = context, inject, separate
        self.surplus, self.stall = surplus, stall
        self.pipelining, self.replies = pipelining, dict(replies or {})
        self.commands: list[Seen] = []
        self.messages: list[tuple[bool, bytes]] = []  # (over TLS, DATA bytes up to the dot)
        self.reads: list[Seen] = []  # each read of the connection as it came (one line or more)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        lines = _Lines(reader, lambda chunk: self.reads.append(Seen(tls, chunk)))
        writer.write(b"220 hostile.test ESMTP\r\n")
        while line := await lines.readline():
            self.commands.append(Seen(tls, line))
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
            refusal = next((r for start, r in self.replies.items() if line.startswith(start)), None)
            if refusal is not None:
                writer.write(refusal + b"\r\n")
                if not (verb == b"DATA" and refusal.startswith(b"354")):
                    await writer.drain()
                    continue
            if verb in (b"EHLO", b"HELO"):
                ehlo = [b"hostile.test", b"8BITMIME", b"SIZE 10485760"]
                if self.pipelining:
                    ehlo.append(b"PIPELINING")
                if self.context is not None and not tls:
                    ehlo.append(b"STARTTLS")
                reply = b"".join(b"250-" + item + b"\r\n" for item in ehlo[:-1])
                writer.write(reply + b"250 " + ehlo[-1] + b"\r\n" + (self.surplus if tls else b""))
            elif verb == b"STARTTLS" and self.context is not None and not tls:
                ready = b"220 2.0.0 Ready to start TLS\r\n"
                if self.separate:
                    writer.write(ready)
                    await writer.drain()
                    writer.write(self.inject)
                else:
                    writer.write(ready + self.inject)
                await writer.drain()
                await writer.start_tls(self.context)
                tls = True
            elif verb == b"DATA":
                if refusal is None:
                    writer.write(b"354 2.0.0 go ahead\r\n")
                await writer.drain()
                if self.stall:  # until the client gives up (or the server stops)
                    await asyncio.get_running_loop().create_future()
                data = b""
                while (chunk := await lines.readline()) not in (b".\r\n", b""):
                    data += chunk
                self.messages.append((tls, data))
                writer.write(b"250 2.0.0 real: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 real: bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 real: ok\r\n")
            await writer.drain()


class _Lines:
    """``readline`` over a stream, telling ``seen`` each read as it came off the
    connection (one TLS record's worth, or one segment's)."""

    def __init__(self, reader: asyncio.StreamReader, seen: Callable[[bytes], None]) -> None:
        self.reader, self.seen = reader, seen
        self.buffer = b""

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) == -1:
            chunk = await self.reader.read(65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.seen(chunk)
            self.buffer += chunk
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        return line


class StrippingProxy(_LoopThread):
    """A man in the middle in front of ``upstream`` (host, port); see the module docstring.

    ``mode`` may be changed between connections. ``plaintext`` is what clients sent
    before TLS (every connection, in order).
    """

    def __init__(
        self, host: str, port: int, upstream: tuple[str, int], mode: ProxyMode = "pass"
    ) -> None:
        super().__init__(host, port, "proxy")
        self.upstream = upstream
        self.mode: ProxyMode = mode
        self.plaintext = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        mode = self.mode
        tls = asyncio.Event()  # STARTTLS forwarded and answered 220: now just bytes

        async def client_to_server() -> None:
            while not tls.is_set():
                line = await reader.readline()
                if not line:
                    return
                self.plaintext += line
                if line.strip().upper() == b"STARTTLS":
                    if mode == "454":
                        writer.write(b"454 4.7.0 TLS not available due to local problem\r\n")
                        continue
                    up_writer.write(line)
                    break  # the client waits for the 220; then only TLS bytes follow
                up_writer.write(line)
            await _pump(reader.read, up_writer)

        async def server_to_client() -> None:
            reply: list[bytes] = []
            while not tls.is_set():
                line = await up_reader.readline()
                if not line:
                    return
                reply.append(line)
                if line[3:4] == b"-":
                    continue
                if mode == "hide":
                    reply = _without_starttls(reply)
                writer.write(b"".join(reply))
                if reply[-1].startswith(b"220 2.0.0 Ready") or reply[-1].startswith(b"220 Ready"):
                    tls.set()
                reply = []
            await _pump(up_reader.read, writer)

        try:
            await asyncio.gather(client_to_server(), server_to_client())
        finally:
            up_writer.close()


def _without_starttls(reply: list[bytes]) -> list[bytes]:
    """An EHLO reply without its STARTTLS line (the last line keeps its space)."""
    kept = [line for line in reply if line[4:].strip().upper() != b"STARTTLS"]
    if kept and kept != reply:
        last = kept[-1]
        kept[-1] = last[:3] + b" " + last[4:]
    return kept


async def _pump(read: Callable[[int], Awaitable[bytes]], writer: asyncio.StreamWriter) -> None:
    while data := await read(65536):
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    writer.close()
