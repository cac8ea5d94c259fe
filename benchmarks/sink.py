"""A lean STARTTLS SMTP sink: accepts mail over TLS, counts it, reports arrival times.

    python benchmarks/sink.py --host 127.0.0.2 --certdir DIR

Why not aiosmtpd or ``smtp-sink``: ``smtp-sink`` has no TLS, and aiosmtpd spends more
CPU per message than the relays under test can spare on a 2-core machine. This sink is
a raw asyncio protocol on uvloop: it answers every command of a pipelined group in one
write and never keeps a message body, only looks for the ``CRLF.CRLF`` that ends it.
It refuses ``MAIL`` before STARTTLS, so a relay that falls back to plaintext fails.

Control is line-based on stdin/stdout, so one sink serves a whole benchmark run (a
relay's cached connections to it survive between phases):

- ``ready PORT`` is printed once listening;
- ``reset TAG`` zeroes the counters (the next phase starts), tagging later stats lines;
- ``wait N`` prints a ``stats`` line as soon as N messages arrived since the reset;
- ``report`` prints a ``stats`` line now;
- end of input stops the sink.

A stats line is ``stats`` and a JSON object: ``phase`` (the tag), ``messages``,
``first`` and ``last`` (arrival times, ``time.monotonic()``, the same clock in every
process on Linux) and ``connections`` (TCP connections accepted since the reset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from tlscert import make_self_signed, server_context

END_OF_DATA = b"\r\n.\r\n"
EHLO_PLAIN = (
    b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
)
EHLO_TLS = b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250 8BITMIME\r\n"


@dataclass
class Stats:
    """What the harness needs from the receiving end of one phase."""

    phase: str = ""
    messages: int = 0
    first: float = 0.0
    last: float = 0.0
    connections: int = 0

    def arrived(self) -> None:
        now = time.monotonic()
        if not self.messages:
            self.first = now
        self.messages += 1
        self.last = now


class Control:
    """The sink's counters and the harness's pending ``wait``."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.target = 0

    def arrived(self) -> None:
        self.stats.arrived()
        if self.target and self.stats.messages >= self.target:
            self.target = 0
            self.report()

    def report(self) -> None:
        print("stats", json.dumps(asdict(self.stats)), flush=True)

    def command(self, line: str) -> None:
        verb, _, arg = line.strip().partition(" ")
        if verb == "reset":
            self.stats, self.target = Stats(phase=arg), 0
        elif verb == "wait":
            self.target = int(arg)
            if self.stats.messages >= self.target:
                self.target = 0
                self.report()
        elif verb == "report":
            self.report()


class SinkSession(asyncio.Protocol):
    """One SMTP session: command lines until ``DATA``, then body bytes until ``CRLF.CRLF``."""

    def __init__(self, control: Control, context: ssl.SSLContext, tasks: set[asyncio.Task[None]]):
        self.control, self.context, self.tasks = control, context, tasks
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.tail = b""  # the last bytes of body seen, for an end marker split across reads
        self.tls = False
        self.quitting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.control.stats.connections += 1
        self.transport.write(b"220 sink.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            data = self._body(data)
            if self.in_data:
                return
        self.buffer += data
        self._commands()

    def _body(self, data: bytes) -> bytes:
        """Consume body bytes; return what follows the end marker (if it was seen)."""
        seam = self.tail + data[:4]
        at = seam.find(END_OF_DATA)
        if at >= 0:
            end = at + len(END_OF_DATA) - len(self.tail)
        else:
            at = data.find(END_OF_DATA)
            if at < 0:
                self.tail = (self.tail + data)[-4:]
                return b""
            end = at + len(END_OF_DATA)
        self.in_data = False
        self.control.arrived()
        self._write(b"250 2.0.0 Ok: queued\r\n")
        return data[end:]

    def _commands(self) -> None:
        replies: list[bytes] = []
        while not self.in_data and not self.quitting:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 2]
            verb = line[:4].upper()
            if verb == b"STAR" and not self.tls:
                self._write(b"".join(replies) + b"220 2.0.0 Ready to start TLS\r\n")
                self._starttls()
                return
            replies.append(self._reply(verb))
        self._write(b"".join(replies))
        if self.quitting:
            assert self.transport is not None
            self.transport.close()
        elif self.in_data and self.buffer:
            rest = bytes(self.buffer)
            self.buffer.clear()
            self.data_received(rest)

    def _reply(self, verb: bytes) -> bytes:
        if verb == b"EHLO":
            return EHLO_TLS if self.tls else EHLO_PLAIN
        if verb in (b"MAIL", b"RCPT") and not self.tls:
            return b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        if verb == b"DATA":
            self.in_data, self.tail = True, b"\r\n"  # an empty body is just ".\r\n"
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"QUIT":
            self.quitting = True
            return b"221 2.0.0 Bye\r\n"
        if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
            return b"250 2.0.0 Ok\r\n"
        return b"502 5.5.2 Command not recognized\r\n"

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _starttls(self) -> None:
        """Switch to TLS; bytes pipelined after STARTTLS are discarded, never executed."""
        assert self.transport is not None
        self.buffer.clear()
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._handshake(self.transport))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handshake(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, self.context, server_side=True, ssl_handshake_timeout=30
            )
        except (TimeoutError, OSError):  # ssl.SSLError is an OSError
            raw.abort()
            return
        if tls is None:
            raw.abort()
            return
        self.transport, self.tls = tls, True


async def serve(host: str, port: int, certdir: Path) -> None:
    cert, key = make_self_signed(certdir, "sink.test")
    context = server_context(cert, key)
    control = Control()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkSession(control, context, tasks), host, port, backlog=512
    )
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with server:
        while line := await reader.readline():
            control.command(line.decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--certdir", type=Path, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.certdir))


if __name__ == "__main__":
    main()
