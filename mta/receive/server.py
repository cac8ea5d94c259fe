"""The inbound listeners: one aiosmtpd server per ``[[listener]]``, with its TLS and limits.

Modes:

- ``relay`` (port 25 style): STARTTLS offered; with ``require_tls`` every mail
  command before STARTTLS gets ``530 5.7.0`` (never set that on a public MX, RFC 3207).
- ``submission`` (587): STARTTLS and AUTH both required (``530 5.7.0`` before).
- ``smtps`` (465, RFC 8314): TLS from the first byte; no STARTTLS. AUTH is offered
  but not required; relay control is as on a relay listener.

AUTH (PLAIN, LOGIN) is offered only over TLS and only when a password file is
configured. Messages over ``limits.message_size`` get ``552 5.3.4`` (at ``MAIL
SIZE=`` or at the end of DATA); an idle client is dropped after
``limits.idle_timeout``.

``RelaySMTP`` adapts aiosmtpd: its stock replies get enhanced status codes (RFC 2034,
since we advertise ENHANCEDSTATUSCODES), a second STARTTLS is refused, the raw
RCPT argument is kept so the handler can see source routes aiosmtpd strips, and
sessions drop aiosmtpd's deprecated ``login_data`` (a warning per AUTH otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiosmtpd.smtp import SMTP, AuthResult, Session

from mta.config import Config, ListenerConfig
from mta.errors import ConfigError
from mta.receive.handler import Accept, RelayHandler
from mta.reply import S501_BAD_ADDRESS, S530_STARTTLS_FIRST, S552_TOO_BIG

log = logging.getLogger(__name__)

Authenticator = Callable[..., Any]
"""aiosmtpd's ``authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult``."""

TLS_HANDSHAKE_TIMEOUT: Final = 30.0
IDENT: Final = "ESMTP mta"

# aiosmtpd's own replies that we word differently (code or enhanced code).
_REWRITE: Final = {
    "552 Error: message size exceeds fixed maximum message size": str(S552_TOO_BIG),
    "552 Error: Too much mail data": str(S552_TOO_BIG),
    "530 Must issue a STARTTLS command first": str(S530_STARTTLS_FIRST),
    "553 5.1.3 Error: malformed address": str(S501_BAD_ADDRESS),
}
# The enhanced code (RFC 3463) for aiosmtpd's other stock replies, by reply code.
_ENHANCED: Final = {
    221: "2.0.0",
    250: "2.0.0",
    451: "4.3.0",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.7.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
_SINGLE_LINE = re.compile(r"(\d{3}) (.*)", re.DOTALL)


def enhance(reply: str, *, hostname: str) -> str:
    """Give an aiosmtpd stock reply an enhanced status code (leave greetings, EHLO alone)."""
    if reply in _REWRITE:
        return _REWRITE[reply]
    match = _SINGLE_LINE.fullmatch(reply)
    if not match or _HAS_ENHANCED.match(reply) or reply in ("250 HELP", f"250 {hostname}"):
        return reply
    enhanced = _ENHANCED.get(int(match.group(1)))
    return f"{match.group(1)} {enhanced} {match.group(2)}" if enhanced else reply


class _Session(Session):
    """aiosmtpd's session without the deprecated ``login_data``, which logs a warning
    on every successful AUTH. The user name is in ``auth_data``."""

    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with the adaptations above.

    Parameters:
        implicit_tls: the transport is TLS from the start (an smtps listener).
    """

    def __init__(
        self,
        handler: RelayHandler,
        *,
        implicit_tls: bool = False,
        authenticator: Authenticator | None = None,
        **kwargs: Any,
    ):
        self._check_credentials = authenticator
        self._captured: tuple[str, Any] | None = None
        if authenticator is not None:
            kwargs["authenticator"] = self._capture
        else:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        super().__init__(handler, **kwargs)
        self.implicit_tls = implicit_tls
        self.rcpt_argument: str | None = None

    # aiosmtpd calls its authenticator synchronously, on the event loop; a scrypt check
    # there would stall every session for tens of milliseconds per AUTH attempt. So
    # aiosmtpd's PLAIN/LOGIN parsing hands us the credentials (``_capture``) and the
    # real check runs in a worker thread.

    def _capture(
        self, server: SMTP, session: Session, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self._captured = (mechanism, auth_data)
        return AuthResult(success=False, handled=True)

    async def _check_in_thread(self, parsing: Awaitable[AuthResult]) -> AuthResult:
        self._captured = None
        result = await parsing
        captured, self._captured = self._captured, None
        if captured is None or self._check_credentials is None:
            return result  # the client aborted or sent garbage; aiosmtpd has replied
        mechanism, auth_data = captured
        checked = await asyncio.to_thread(
            self._check_credentials, self, self.session, self.envelope, mechanism, auth_data
        )
        return checked if isinstance(checked, AuthResult) else AuthResult(success=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_in_thread(super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_in_thread(super().auth_LOGIN(_, args))

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            await super().push(enhance(status, hostname=self.hostname))
        else:
            await super().push(status)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.implicit_tls or (self.session is not None and self.session.ssl is not None):
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.rcpt_argument = arg
        try:
            await super().smtp_RCPT(arg)
        finally:
            self.rcpt_argument = None


def _protocol_factory(
    config: Config,
    listener: ListenerConfig,
    handler: RelayHandler,
    context: ssl.SSLContext,
    authenticator: Authenticator | None,
    hostname: str,
) -> Callable[[], RelaySMTP]:
    implicit = listener.mode == "smtps"
    submission = listener.mode == "submission"

    def build() -> RelaySMTP:
        return RelaySMTP(
            handler,
            implicit_tls=implicit,
            hostname=hostname,
            ident=IDENT,
            decode_data=False,
            enable_SMTPUTF8=False,
            data_size_limit=config.limits.message_size,
            timeout=config.limits.idle_timeout,
            tls_context=None if implicit else context,
            require_starttls=not implicit and (listener.require_tls or submission),
            # On smtps the whole connection is TLS, so AUTH needs no STARTTLS first.
            auth_require_tls=not implicit,
            auth_required=submission,
            authenticator=authenticator,
            loop=asyncio.get_running_loop(),
        )

    return build


async def start_listeners(
    config: Config,
    accept: Accept,
    tls_for: Callable[[ListenerConfig], ssl.SSLContext],
    authenticator: Authenticator | None,
    hostname: str,
) -> list[asyncio.Server]:
    """Start one server per configured listener; return them once all accept connections.

    Parameters:
        config: the configuration; ``config.listeners`` says where and how to listen.
        accept: stores a message durably and schedules it (see ``handler.Accept``).
        tls_for: the server TLS context for a listener.
        authenticator: checks AUTH credentials; None means AUTH is not offered.
        hostname: our name in the banner, EHLO and ``Received:``.

    A listener that cannot bind raises ``ConfigError`` naming it; any already started
    are closed first.
    """
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    try:
        for index, listener in enumerate(config.listeners):
            if listener.mode == "submission" and authenticator is None:
                raise ConfigError(
                    config.source, "auth.password_file", "required by a submission listener"
                )
            context = tls_for(listener)
            handler = RelayHandler(config, listener, accept, hostname)
            factory = _protocol_factory(config, listener, handler, context, authenticator, hostname)
            try:
                server = await loop.create_server(
                    factory,
                    host=listener.address,
                    port=listener.port,
                    ssl=context if listener.mode == "smtps" else None,
                    ssl_handshake_timeout=(
                        TLS_HANDSHAKE_TIMEOUT if listener.mode == "smtps" else None
                    ),
                    reuse_address=True,
                )
            except OSError as err:
                where = f"{listener.address}:{listener.port}"
                raise ConfigError(
                    config.source,
                    f"listener[{index}]",
                    f"cannot listen on {where}: {err.strerror or err}",
                ) from None
            servers.append(server)
            port = server.sockets[0].getsockname()[1] if server.sockets else listener.port
            log.info(
                "receive.listening",
                extra={
                    "address": listener.address,
                    "port": port,
                    "mode": listener.mode,
                    "auth": authenticator is not None,
                },
            )
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers
