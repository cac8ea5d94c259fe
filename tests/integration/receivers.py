"""Receiving SMTP servers for integration tests: the far end of an outbound delivery.

``Receiver`` runs aiosmtpd on its own event loop in a background thread, on a loopback
address, with one of four TLS set-ups:

- ``"fs"``: STARTTLS offered, TLS >= 1.2, forward-secret suites only (``tlsbase.harden``),
  ECDSA certificate for ``localhost`` / ``mx.test`` (and the listening IP) from ``ca``.
- ``"none"``: no STARTTLS at all.
- ``"non-fs"``: STARTTLS offered, but only TLS 1.2 with RSA key exchange
  (``AES128-GCM-SHA256:AES256-GCM-SHA384``) and an RSA 2048 certificate.
- ``"implicit"``: TLS from the first byte (smtps), same context as ``"fs"``.

Every accepted message is recorded with the TLS protocol and cipher it arrived over.
``rcpt_reply`` maps a recipient address to the reply line to refuse it with (e.g.
``{"bad@dest.test": "550 5.1.1 No such user"}``); other recipients are accepted.
Two misbehaviours for fault tests: ``data_delay`` seconds of silence before the reply to
the end of DATA (the message is recorded after it, whether or not the client waited),
and ``drop_in_data``, which drops the connection (TCP reset) after the first line of
the message, without a reply.

    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as receiver:
        ...deliver to receiver.host:receiver.port...
        (got,) = receiver.wait_for(1, timeout=10)
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from asyncio import sslproto
from dataclasses import dataclass
from typing import Any, Final, Literal

import trustme
from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from mta.tlsbase import harden
from tests.integration.threaded import ThreadedServer

TlsMode = Literal["fs", "none", "non-fs", "implicit"]
TLS_MODES: Final = ("fs", "none", "non-fs", "implicit")
CERT_NAMES: Final = ("localhost", "mx.test")
NON_FS_CIPHERS: Final = "AES128-GCM-SHA256:AES256-GCM-SHA384"
SERVER_NAME: Final = "mx.test"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the receiver got it (content: CRLF lines, dot-stuffing undone)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls_version: str | None
    tls_cipher: str | None
    mail_options: tuple[str, ...] = ()  # the MAIL FROM parameters (``REQUIRETLS``...)


def _server_context(
    mode: TlsMode,
    ca: trustme.CA,
    host: str,
    cert: trustme.LeafCert | None = None,
    client_ca: trustme.CA | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if client_ca is not None:  # mutual TLS: no client certificate, no handshake
        context.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(context)
    if cert is not None:
        harden(context)
    elif mode == "non-fs":
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(NON_FS_CIPHERS)
        cert = ca.issue_cert(*CERT_NAMES, host, key_type=trustme.KeyType.RSA)
    else:
        harden(context)
        cert = ca.issue_cert(*CERT_NAMES, host)
    cert.configure_cert(context)  # the whole chain: leaf, then any intermediates
    return context


class _AlertingTlsProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer, but a failed handshake sends its alert before the connection
    drops (asyncio aborts without it; OpenSSL-based MTAs send it). Clients then see why:
    ``handshake_failure`` for no shared cipher, as with a real MTA without (EC)DHE."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            self._process_outgoing()  # type: ignore[attr-defined]
        super()._on_handshake_complete(handshake_exc)


class _Smtp(SMTP):
    """aiosmtpd's SMTP with ``_AlertingTlsProtocol`` under STARTTLS, and a DATA that can
    drop the connection part way (``drop_in_data``); else unchanged."""

    drop_in_data = False
    requiretls = False  # advertise and take REQUIRETLS (RFC 8689) once TLS is up

    def _getparams(self, params: Any) -> Any:
        found = super()._getparams(params)
        if self.requiretls and self._tls_protocol and found and found.get("REQUIRETLS") is True:
            del found["REQUIRETLS"]  # known here; it stays in mail_options
        return found

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if not self.drop_in_data or not (self.envelope and self.envelope.rcpt_tos):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readuntil(b"\r\n")  # the first line of the message, then gone
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()
        await self.loop.create_future()  # until connection_lost() cancels this handler

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        waiter = self.loop.create_future()
        self._tls_protocol = _AlertingTlsProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error


class _Handler:
    """aiosmtpd hooks: refuse the configured recipients, record every message."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        refusal = self.receiver.rcpt_reply.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.receiver.data_delay:
            await asyncio.sleep(self.receiver.data_delay)
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        version: str | None = None
        cipher: str | None = None
        if ssl_object is not None:
            version = ssl_object.version()
            negotiated = ssl_object.cipher()
            cipher = negotiated[0] if negotiated else None
        content = envelope.original_content or envelope.content or b""
        self.receiver._record(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=bytes(content),
                tls_version=version,
                tls_cipher=cipher,
                mail_options=tuple(envelope.mail_options),
            )
        )
        return "250 2.0.0 OK: queued"


class _RequireTlsHandler(_Handler):
    """``_Handler`` that adds ``REQUIRETLS`` to the EHLO reply after STARTTLS."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if server._tls_protocol:
            responses.insert(-1, "250-REQUIRETLS")
        return responses


class Receiver(ThreadedServer):
    """A receiving SMTP server on ``host:port`` (``port=0``: any free port; see ``.port``).

    Parameters:
        host: a loopback address (127.0.0.0/8).
        port: the port to listen on; 0 picks a free one.
        tls: ``"fs"``, ``"none"``, ``"non-fs"`` or ``"implicit"`` (module docstring).
        ca: the CA that issues the server certificate (a fresh one when None).
        rcpt_reply: recipient address -> reply line to refuse it with.
        cert: present this certificate chain instead of issuing one (policy scenarios).
        client_ca: require a client certificate issued by this CA (mutual TLS).
        data_delay: seconds to wait before answering the end of DATA.
        drop_in_data: drop the connection after the first line of each message.
        requiretls: advertise ``REQUIRETLS`` after STARTTLS and take the MAIL parameter.
    """

    kind = "receiver"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: TlsMode = "fs",
        ca: trustme.CA | None = None,
        rcpt_reply: dict[str, str] | None = None,
        cert: trustme.LeafCert | None = None,
        client_ca: trustme.CA | None = None,
        data_delay: float = 0.0,
        drop_in_data: bool = False,
        requiretls: bool = False,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, got {tls!r}")
        self.host = host
        self.port = port
        self.tls: TlsMode = tls
        self.ca = ca if ca is not None else trustme.CA()
        self.rcpt_reply = dict(rcpt_reply or {})
        self.data_delay = data_delay
        self.drop_in_data = drop_in_data
        self.requiretls = requiretls
        self.messages: list[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._servers: list[SMTP] = []
        self._context = (
            None if tls == "none" else _server_context(tls, self.ca, host, cert, client_ca)
        )

    # --- what arrived ---

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """The first ``count`` messages, waiting up to ``timeout`` seconds for them.

        Raises AssertionError when fewer than ``count`` arrive in time.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"receiver {self.host}:{self.port} got {len(self.messages)} "
                        f"message(s), expected {count} within {timeout}s"
                    )
                self._changed.wait(remaining)
            return list(self.messages[:count])

    @property
    def connections(self) -> int:
        """How many SMTP connections were accepted so far (connection reuse tests)."""
        return len(self._servers)

    def _record(self, message: ReceivedMessage) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    # --- the server thread ---

    def _factory(self) -> SMTP:
        server = _Smtp(
            (_RequireTlsHandler if self.requiretls else _Handler)(self),
            hostname=SERVER_NAME,
            ident="mta test receiver",
            tls_context=self._context if self.tls in ("fs", "non-fs") else None,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=True,
            timeout=30,
        )
        server.drop_in_data = self.drop_in_data
        server.requiretls = self.requiretls
        self._servers.append(server)
        return server

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    self._factory,
                    host=self.host,
                    port=self.port,
                    ssl=self._context if self.tls == "implicit" else None,
                )
            )
        except BaseException as err:  # reported to start() in the test's thread
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
        for smtp in self._servers:
            for transport in (smtp.transport, smtp._original_transport):
                if transport is not None:
                    transport.close()
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
