"""A lean STARTTLS SMTP load generator: N messages over S parallel sessions.

    python benchmarks/loadgen.py --host 127.0.0.1 --port 2525 --messages 2000 \
        --sessions 20 --size 4096 --mode reused

Why not ``smtp-source``: it has no TLS, and the benchmark wants TLS on both legs. Why
not aiosmtplib: on a 2-core machine every CPU second the generator spends is taken from
the relay under test. So this is a raw asyncio protocol on uvloop that pipelines
``MAIL``/``RCPT``/``DATA`` (RFC 2920) and parses nothing but reply codes.

Modes: ``reused`` keeps each session's connection for many messages (``smtp-source -d``
style); ``per-connection`` opens a new TCP connection and TLS handshake per message.
By default each session sends its next message as soon as the last one is acknowledged
(a closed loop: the faster relay gets more load); ``--rate R`` offers R messages/s in all
instead, so that relays can be compared at the same work.

Acknowledgement latency is the time from the end of DATA to the ``250``: the body is
written and flushed to the kernel first, then the clock starts as the final ``.``
line is written. Prints one JSON object: ``start`` and ``end`` (``time.monotonic()``),
``accepted``, ``failed``, latency percentiles in ms and the first few errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from tlscert import client_context

REPLY_TIMEOUT = 60.0
MAIL, RCPT, DATA = (
    b"MAIL FROM:<bench@sender.test>\r\n",
    b"RCPT TO:<sink@dest.test>\r\n",
    b"DATA\r\n",
)
MAX_ERRORS_KEPT = 5


class SmtpError(Exception):
    """The server answered something other than what the dialogue expects."""


class ClientProtocol(asyncio.Protocol):
    """Collects reply codes; lets the session wait for the next k of them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.codes: deque[int] = deque()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None
        self.drained = asyncio.Event()
        self.drained.set()
        self.lost: Exception | None = None
        self.pipelining = False  # the last EHLO reply offered PIPELINING

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n")) >= 0:
            if self.buffer[4:14].upper() == b"PIPELINING":
                self.pipelining = True
            if self.buffer[3:4] != b"-":  # "250-..." continues a reply
                code = self.buffer[:3]
                self.codes.append(int(code) if code.isdigit() else 0)  # 0: garbage
            del self.buffer[: end + 2]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        self.drained.set()
        self._wake()

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    def _wake(self) -> None:
        ready = len(self.codes) >= self.want or self.lost is not None
        if self.waiter is not None and not self.waiter.done() and ready:
            self.waiter.set_result(None)

    async def expect(self, *codes: int) -> None:
        """Wait for ``len(codes)`` replies and check their codes."""
        self.want = len(codes)
        if len(self.codes) < self.want:
            if self.lost is not None:
                raise self.lost
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, REPLY_TIMEOUT)
            if len(self.codes) < self.want:
                assert self.lost is not None
                raise self.lost
        got = [self.codes.popleft() for _ in codes]
        if got != list(codes):
            raise SmtpError(f"expected {list(codes)}, got {got}")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def ehlo(self) -> None:
        self.pipelining = False
        self.send(b"EHLO loadgen.test\r\n")
        await self.expect(250)


@dataclass
class Load:
    """The shared work and results of all sessions."""

    remaining: int
    head: bytes  # headers with a "{n}" placeholder for the message number
    body: bytes
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    rate: float = 0.0  # messages offered per second in all; 0: each as soon as a session is free
    begun: float = field(default_factory=time.monotonic)
    issued: int = 0

    def take(self) -> int | None:
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        return self.remaining

    async def pace(self) -> None:
        """With a rate: wait for the next message's turn, ``1/rate`` s after the last one's.

        Turns are fixed from the start, not from replies: a slow relay does not slow the
        offered load (it makes the sessions busy, and then messages start late).
        """
        if self.rate > 0:
            due = self.begun + self.issued / self.rate
            self.issued += 1
            if (delay := due - time.monotonic()) > 0:
                await asyncio.sleep(delay)

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def make_message(size: int) -> tuple[bytes, bytes]:
    """Headers (with a ``{n}`` slot) and a body of 78-octet lines, about ``size`` in all."""
    head = (
        b"From: <bench@sender.test>\r\nTo: <sink@dest.test>\r\nSubject: bench {n}\r\n"
        b"Message-ID: <{n}.bench@sender.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    )
    room = max(80, size - len(head))
    lines, rest = divmod(room, 78)
    body = b"x" * 76 + b"\r\n"
    return head, body * lines + (b"y" * (rest - 2) + b"\r\n" if rest > 2 else b"")


async def open_session(host: str, port: int, context: ssl.SSLContext) -> ClientProtocol:
    """Connect, EHLO, STARTTLS, EHLO again: a session ready for ``MAIL``."""
    loop = asyncio.get_running_loop()
    raw, proto = await asyncio.wait_for(
        loop.create_connection(ClientProtocol, host, port), REPLY_TIMEOUT
    )
    await proto.expect(220)
    await proto.ehlo()
    proto.send(b"STARTTLS\r\n")
    await proto.expect(220)
    tls = await loop.start_tls(
        raw, proto, context, server_hostname="relay.test", ssl_handshake_timeout=REPLY_TIMEOUT
    )
    assert tls is not None
    # pause_writing while any byte waits in the TLS layer (not ">= 0", which uvloop
    # would pause on forever): send_message starts its clock once the body left it.
    tls.set_write_buffer_limits(high=1, low=0)
    proto.transport = tls
    await proto.ehlo()
    return proto


async def send_message(proto: ClientProtocol, load: Load, n: int) -> None:
    """One transaction, pipelined if offered; records the end-of-DATA to ``250`` latency."""
    if proto.pipelining:
        proto.send(MAIL + RCPT + DATA)
        await proto.expect(250, 250, 354)
    else:
        for command, code in ((MAIL, 250), (RCPT, 250), (DATA, 354)):
            proto.send(command)
            await proto.expect(code)
    proto.send(load.head.replace(b"{n}", str(n).encode()))
    proto.send(load.body)
    await asyncio.wait_for(proto.drained.wait(), REPLY_TIMEOUT)
    started = time.monotonic()
    proto.send(b".\r\n")
    await proto.expect(250)
    load.latencies.append(time.monotonic() - started)


# What a broken session raises (ssl.SSLError is an OSError); anything else is a bug here.
SESSION_ERRORS = (OSError, SmtpError, TimeoutError)


async def close_session(proto: ClientProtocol) -> None:
    """QUIT and close; a session that breaks now has already delivered its messages."""
    proto.send(b"QUIT\r\n")
    try:
        await proto.expect(221)
    except SESSION_ERRORS:
        abort(proto)
    else:
        assert proto.transport is not None
        proto.transport.close()


def abort(proto: ClientProtocol | None) -> None:
    if proto is not None and proto.transport is not None:
        proto.transport.abort()


async def reused_session(host: str, port: int, load: Load, context: ssl.SSLContext) -> None:
    """Many messages per connection; a broken connection is replaced, its message failed."""
    proto: ClientProtocol | None = None
    while (n := load.take()) is not None:
        await load.pace()
        try:
            if proto is None:
                proto = await open_session(host, port, context)
            await send_message(proto, load, n)
        except SESSION_ERRORS as exc:
            load.fail(exc)
            abort(proto)
            proto = None
    if proto is not None:
        await close_session(proto)


async def per_connection_session(host: str, port: int, load: Load, context: ssl.SSLContext) -> None:
    """A new connection and TLS handshake for every message."""
    while (n := load.take()) is not None:
        await load.pace()
        proto: ClientProtocol | None = None
        try:
            proto = await open_session(host, port, context)
            await send_message(proto, load, n)
        except SESSION_ERRORS as exc:
            load.fail(exc)
            abort(proto)
        else:
            await close_session(proto)


def percentile_ms(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[max(0, math.ceil(p * len(ordered)) - 1)]


async def run(args: argparse.Namespace) -> dict[str, object]:
    head, body = make_message(args.size)
    load = Load(remaining=args.messages, head=head, body=body, rate=args.rate)
    context = client_context()
    session = reused_session if args.mode == "reused" else per_connection_session
    start = time.monotonic()
    workers = [session(args.host, args.port, load, context) for _ in range(args.sessions)]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), args.timeout)
    except TimeoutError:
        load.fail(TimeoutError(f"the load did not finish within {args.timeout:g} s"))
    end = time.monotonic()
    return {
        "start": start,
        "end": end,
        "accepted": len(load.latencies),
        "failed": load.failed + load.remaining,
        "p50_ms": percentile_ms(load.latencies, 0.50),
        "p99_ms": percentile_ms(load.latencies, 0.99),
        "max_ms": percentile_ms(load.latencies, 1.0),
        "errors": load.errors,
        "cpu_s": sum(os.times()[:2]),  # the generator's own CPU, for the harness's books
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--mode", choices=("reused", "per-connection"), default="reused")
    parser.add_argument("--timeout", type=float, default=300.0, help="for the whole load")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="offer this many messages/s (0: closed loop)"
    )
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
