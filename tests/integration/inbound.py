"""The inbound listeners on loopback, for tests: ``start_listeners`` in a thread, a fake
spool, and a raw SMTP client.

``Relay`` runs ``start_listeners`` on its own event loop in a background thread; the
``accept`` callable is a ``Recorder`` that keeps envelopes and returns fake queue ids.
``RawSmtp`` sends exactly the bytes it is given (bare LF, pipelined commands, bytes
trickled one by one) and reads replies line by line, switching to TLS when told: what a
hostile client does and ``smtplib`` would not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest
import trustme

from mta.config import Config, parse_text
from mta.events import Event
from mta.model import Envelope, QueueId
from mta.receive.auth import PasswordFile, add_user
from mta.receive.server import Authenticator, Sessions, start_listeners
from mta.receive.tls import server_context

HOST = "127.0.0.1"
TRUSTED = "127.0.0.2"  # the only relay.networks entry in these tests
TIMEOUT = 10.0
USER, PASSWORD = "alice", "correct horse battery"
T = TypeVar("T")
ADDRESS_USER = "bob@local.test"  # a login that is an address: it may send as itself
# What USER may send as (a login that is not an address owns nothing it is not granted).
SENDER_LOGINS = f"""
[[sender_login]]
user = "{USER}"
senders = ["{USER}@example.test", "@shop.test"]
"""


class Recorder:
    """A fake ``accept``: records what it is given, or raises ``fail``."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[Envelope, bytes]] = []
        self.attempts = 0

    async def __call__(self, envelope: Envelope, content: bytes) -> QueueId:
        self.attempts += 1
        if self.fail is not None:
            raise self.fail
        self.calls.append((envelope, content))
        return QueueId(f"Q{len(self.calls):04d}")


class Relay:
    """``start_listeners`` running on an event loop in a background thread."""

    def __init__(
        self,
        config: Config,
        accept: Recorder,
        context: ssl.SSLContext,
        authenticator: Authenticator | None,
    ) -> None:
        self.config, self.accept, self.context = config, accept, context
        self.authenticator = authenticator
        self.ports: list[int] = []
        self.sessions = Sessions(config.limits)  # the live sessions (read them with ``call``)
        self.events: list[Event] = []  # what the listeners told of (MessageReceived)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            servers = await start_listeners(
                self.config,
                self.accept,
                lambda _l: self.context,
                self.authenticator,
                "mx.test",
                self.sessions,
                self.events.append,
            )
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self.ports = [server.sockets[0].getsockname()[1] for server in servers]
        self._ready.set()
        await self._stop.wait()
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()

    def __enter__(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "listeners did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "listeners did not stop"

    @property
    def port(self) -> int:
        return self.ports[0]

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run on the relay's event loop (its sessions live there)."""
        assert self._loop is not None

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(TIMEOUT)

    def client(self, source: str = HOST) -> smtplib.SMTP:
        return smtplib.SMTP(
            HOST,
            self.port,
            local_hostname="client.test",
            timeout=TIMEOUT,
            source_address=(source, 0),
        )


def make_config(
    home: Path,
    *,
    listener: str = 'mode = "relay"',
    auth: bool = True,
    limits: str = "",
    top: str = "",
) -> Config:
    """A test policy; listener ports are set to 0 (the OS picks) after validation.

    ``top``: top-level keys, then tables of the policy (``SENDER_LOGINS`` always follow).
    """
    text = f"""
hostname = "mx.test"
{top}
{SENDER_LOGINS}
[[listener]]
address = "{HOST}"
{listener}
[relay]
networks = ["{TRUSTED}/32"]
local_domains = ["local.test"]
[limits]
{limits}
{"" if "message_size" in limits else 'message_size = "64k"'}
"""
    if auth:
        text += '[auth]\npassword_file = "passwd"\n'
    config = parse_text(text, "test.toml", home)
    ports0 = tuple(dataclasses.replace(lc, port=0) for lc in config.listeners)
    return dataclasses.replace(config, listeners=ports0)


def listener_context(ca: trustme.CA, directory: Path) -> ssl.SSLContext:
    """The listener's TLS context, with a certificate for HOST and mx.test from ``ca``."""
    issued = ca.issue_cert(HOST, "mx.test")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    return server_context([(cert, key)])


def password_file(directory: Path) -> PasswordFile:
    """A password file with USER and ADDRESS_USER, both with PASSWORD."""
    path = directory / "passwd"
    add_user(path, USER, PASSWORD)
    add_user(path, ADDRESS_USER, PASSWORD)
    return PasswordFile.load(path)


def wait_for_record(caplog: pytest.LogCaptureFixture, event: str) -> logging.LogRecord:
    """The server logs on its own thread: wait (bounded) for the record to arrive."""
    pause = threading.Event()
    for _ in range(100):
        for record in caplog.records:
            if record.getMessage() == event:
                return record
        pause.wait(0.05)
    raise AssertionError(f"no {event} record")


class RawSmtp:
    """A client that sends exactly the bytes it is given and reads replies line by line.

    Parameters:
        port: the server's port (on ``host``).
        host: the server's address.
        source: our address (127.0.0.0/8 has many: a test can be several clients).
        timeout: for connecting and for each read.
    """

    def __init__(
        self, port: int, host: str = HOST, *, source: str = HOST, timeout: float = TIMEOUT
    ) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0)
        )
        self._buffer = b""

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, pause: float) -> tuple[float, bytes]:
        """Send ``data`` a byte at a time, ``pause`` seconds apart, until the server says
        something or hangs up; return (seconds that took, what it said)."""
        started = time.monotonic()
        for byte in data:
            try:
                self.sock.sendall(bytes([byte]))
            except OSError:
                break
            if self.pending_into_buffer(pause):
                break
        return time.monotonic() - started, self.pending(0)

    def pending_into_buffer(self, wait: float) -> bool:
        """Wait up to ``wait`` seconds for the server; True if it sent something or hung up."""
        self.sock.settimeout(wait)
        try:
            return not self._fill() or bool(self._buffer)
        except TimeoutError:
            return bool(self._buffer)
        finally:
            self.sock.settimeout(self.timeout)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)

    def line(self) -> bytes:
        """One line as sent (with its line ending); ``EOFError`` if the server hung up."""
        while b"\n" not in self._buffer:
            if not self._fill():
                raise EOFError(f"connection closed; unfinished line {self._buffer!r}")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def reply(self) -> str:
        """One whole reply, its lines joined by newlines, without CRLF."""
        lines: list[str] = []
        while True:
            line = self.line().decode("ascii", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        """Send one command line (CRLF added) and return its reply."""
        self.send(line.encode("ascii") + b"\r\n")
        return self.reply()

    def pending(self, wait: float) -> bytes:
        """What has arrived, or arrives within ``wait`` seconds (b"" for nothing, or at EOF)."""
        if not self._buffer and wait > 0:
            self.pending_into_buffer(wait)
        data, self._buffer = self._buffer, b""
        return data

    def rest(self) -> bytes:
        """Everything until the server closes the connection (``TimeoutError`` if it does not)."""
        while self._fill():
            pass
        data, self._buffer = self._buffer, b""
        return data

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "mx.test") -> None:
        """Start TLS on the socket. Plaintext the server sent after its 220 is an error."""
        assert self._buffer == b"", f"plaintext after the 220 reply: {self._buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
