"""The line between the receiving process and the queue manager (``mta.processes``).

A Unix ``SOCK_SEQPACKET`` socket pair: every message arrives whole and alone, so there
is no framing to get wrong. Only queue ids and operator commands cross it, never mail:
the queue manager reads a message from the encrypted spool, as Postfix's qmgr does
after cleanup's trigger.

receiver -> manager: ``ready`` | ``failed <kind> <text>`` | ``queued <qid>`` | ``answer <text>``
manager -> receiver: ``reload-keys`` | ``stats``
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from typing import Final

from mta.control import Command, run_command
from mta.errors import ConfigError, MtaError
from mta.model import QueueId

MAX_MESSAGE: Final = 4096
ANSWER_TIMEOUT: Final = 10.0


class LinkClosed(MtaError):
    """The other process has gone: its end of the socket pair is closed."""


def pair() -> tuple[socket.socket, socket.socket]:
    """(manager's end, receiver's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode_failure(err: Exception) -> bytes:
    """A start-up failure of the receiver, for the manager to report as its own."""
    if isinstance(err, ConfigError):
        return "\t".join(("failed config", str(err.source), err.key, err.problem)).encode()
    return f"failed error\t{err}".encode()


def decode_failure(message: bytes) -> MtaError:
    """The error ``encode_failure`` described (``ConfigError`` stays one: exit status 2)."""
    kind, *fields = message.decode("utf-8", "replace").split("\t")
    if kind == "failed config" and len(fields) == 3:
        return ConfigError(fields[0], fields[1], fields[2])
    return MtaError("receiving process: " + " ".join(fields))


class _End:
    """One end of the pair, non-blocking, driven by the running loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    async def send(self, message: bytes) -> None:
        """Send one message; ``LinkClosed`` when the other process has gone."""
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, message)
        except OSError as err:  # EPIPE, ECONNRESET, or the socket closed here
            raise LinkClosed(str(err)) from None

    async def receive(self) -> bytes:
        """The next message; ``LinkClosed`` at the other end's close."""
        try:
            message = await asyncio.get_running_loop().sock_recv(self._sock, MAX_MESSAGE)
        except OSError as err:
            raise LinkClosed(str(err)) from None
        if not message:
            raise LinkClosed("closed")
        return message

    def close(self) -> None:
        self._sock.close()


class ReceiverEnd(_End):
    """The receiving process's end: reports queued messages, answers the manager."""

    async def queued(self, qid: QueueId) -> None:
        """Tell the manager; only after this may the client hear ``250``.

        If it raises ``LinkClosed`` the manager is gone, and the record may sit in the
        spool past a new manager's recovery scan: the client must not be told it is
        accepted (it retries; at worst a duplicate), so the caller answers 451.
        """
        await self.send(b"queued " + qid.encode("ascii"))

    async def serve(self, commands: Mapping[str, Command]) -> None:
        """Answer the manager's commands until it goes away (then ``LinkClosed``)."""
        while True:
            name = (await self.receive()).decode("ascii", "replace")
            answer = await run_command(commands, name)
            await self.send(b"answer " + answer.encode())


class ManagerEnd(_End):
    """The queue manager's end: hears of queued messages, asks the receiver things."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._asking = asyncio.Lock()
        self._answer: asyncio.Future[str] | None = None

    async def started(self) -> None:
        """Wait for the receiver's listeners; raise what made it fail instead."""
        message = await self.receive()
        if message.startswith(b"failed "):
            raise decode_failure(message)
        if message != b"ready":
            raise MtaError(f"receiving process: unexpected {message[:80]!r}")

    async def pump(self, queued: Callable[[QueueId], None]) -> None:
        """Dispatch the receiver's messages until it exits (then ``LinkClosed``)."""
        try:
            while True:
                message = await self.receive()
                verb, _, rest = message.partition(b" ")
                if verb == b"queued":
                    queued(QueueId(rest.decode("ascii")))
                elif verb == b"answer" and self._answer is not None:
                    with contextlib.suppress(asyncio.InvalidStateError):
                        self._answer.set_result(rest.decode("utf-8", "replace"))
        finally:
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(LinkClosed("closed"))

    async def ask(self, command: str) -> str:
        """One command to the receiver, one answer back (``pump`` must be running)."""
        async with self._asking:
            self._answer = asyncio.get_running_loop().create_future()
            try:
                await self.send(command.encode("ascii"))
                return await asyncio.wait_for(self._answer, ANSWER_TIMEOUT)
            finally:
                self._answer = None
