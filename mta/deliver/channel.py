"""The connection under aiosmtplib, taken over for a pipelined group and a DATA payload.

aiosmtplib reads one reply per command it sent: what arrives while no command of its own
waits is dropped, and a second reply in the same segment sits in its buffer until more
bytes come. Neither works for RFC 2920 pipelining, where the replies to MAIL, every RCPT
and DATA arrive back to back, in one segment or several. And to write a large payload
only as fast as the peer takes it, one needs the transport's ``pause_writing`` and
``resume_writing``, which only the transport's protocol is told.

So, for that stretch, ``taken_over`` makes a ``Channel`` the transport's protocol
(``BaseTransport.set_protocol``: public asyncio API, on plain TCP and TLS transports
alike, uvloop's included) and gives the transport back to aiosmtplib's protocol after
it. The ``Channel`` keeps every byte it receives, splits replies itself (RFC 5321
§4.2.1: ``ddd-`` continues a reply, ``ddd `` ends it), and tells whether bytes are left
over once every due reply is read (a surplus reply, see ``session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import Final, cast

import aiosmtplib
import aiosmtplib.protocol

MAX_REPLY: Final = 32 * 1024  # a reply longer than this (a peer streaming junk) is an error
MAX_UNREAD: Final = 1024 * 1024  # replies not yet read, at most: a flood drops the connection
_CODE: Final = re.compile(rb"\d{3}(?:[ -]|\r?\n)")


class Channel(asyncio.Protocol):
    """The transport's protocol while ``taken_over``: replies in order, writes paced.

    ``connection_lost`` is passed on to aiosmtplib's protocol, so that the client knows
    the connection is gone exactly as if it had seen it itself.
    """

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        inner: aiosmtplib.protocol.SMTPProtocol,
        timeout: float | None,
    ) -> None:
        self.transport, self.inner, self.timeout = transport, inner, timeout
        self.buffer = bytearray()
        self.closed = False
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        if len(self.buffer) > MAX_UNREAD:  # say, while we write a payload: nobody reads it
            self.transport.abort()
        self._arrived.set()

    def eof_received(self) -> bool:
        self.closed = True
        self._arrived.set()
        return False  # close the transport: the peer will send no more replies

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._arrived.set()
        self._room.set()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._room.clear()

    def resume_writing(self) -> None:
        self._room.set()

    # for the session
    def write(self, data: bytes | memoryview) -> None:
        if self.closed or self.transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def write_paced(self, body: bytes, chunk: int) -> None:
        """``body`` in ``chunk`` slices (views: nothing is copied), each written when the
        transport has room: after ``pause_writing`` (its buffer above the high-water
        mark) the next slice waits for ``resume_writing`` (below the low-water mark).
        These are the transport's public flow-control calls to its protocol, the ones
        ``StreamWriter.drain`` waits on; we get them because the ``Channel`` is the
        protocol now. TLS encrypts what is written at once: a 1 MiB message written
        whole became 1 MiB of ciphertext waiting next to the plaintext, per delivery.
        A peer that takes nothing for ``timeout`` seconds (a stall) is a timeout."""
        view = memoryview(body)
        for start in range(0, len(view), chunk):
            self.write(view[start : start + chunk])
            try:
                await asyncio.wait_for(self._room.wait(), self.timeout)
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None
            if self.closed:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")

    async def read_reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply, waiting up to ``timeout`` seconds for the rest of it."""
        try:
            async with asyncio.timeout(self.timeout):
                while (reply := split_reply(self.buffer)) is None:
                    if self.closed:
                        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
        return reply


def split_reply(buffer: bytearray) -> aiosmtplib.SMTPResponse | None:
    """Take one complete reply off the front of ``buffer`` (None: not all here yet).

    Raises ``SMTPResponseException`` for what is no reply (a line without a code) or a
    reply too long, as aiosmtplib does."""
    lines: list[bytes] = []
    offset = 0
    while (end := buffer.find(b"\n", offset)) != -1:
        line = bytes(buffer[offset : end + 1])
        offset = end + 1
        if not _CODE.match(line):
            raise aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {line!r}")
        lines.append(line)
        if line[3:4] != b"-":
            del buffer[:offset]
            text = b"\n".join(item[4:].strip(b" \t\r\n") for item in lines)
            return aiosmtplib.SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape"))
    if len(buffer) > MAX_REPLY:
        raise aiosmtplib.SMTPResponseException(-1, "Response too long")
    return None


@contextlib.contextmanager
def taken_over(smtp: aiosmtplib.SMTP) -> Iterator[Channel]:
    """The connection's transport with a ``Channel`` as its protocol, for the block.

    aiosmtplib's own reply buffer must be empty when this starts (``session`` checks);
    a timeout or a lost connection closes the client, as aiosmtplib does itself, since
    a reply given up on could be taken as the next command's. Cancelled, it drops the
    connection and whatever waits unsent on it.
    """
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    # uvloop's TCP transport is no asyncio.WriteTransport subclass, but has its methods
    channel = Channel(cast(asyncio.WriteTransport, transport), protocol, smtp.timeout)
    transport.set_protocol(channel)
    try:
        yield channel
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    except asyncio.CancelledError:  # mid-transaction: the connection is of no more use
        channel.transport.abort()  # a closing transport would wait on a stalled peer
        raise
    finally:
        if not channel.closed:
            transport.set_protocol(protocol)
