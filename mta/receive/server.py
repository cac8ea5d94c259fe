"""The inbound listeners: one aiosmtpd server per ``[[listener]]``, with its TLS and limits.

Modes:

- ``relay`` (port 25 style): STARTTLS offered; with ``require_tls`` every mail
  command before STARTTLS gets ``530 5.7.0`` (never set that on a public MX, RFC 3207).
- ``submission`` (587): STARTTLS and AUTH both required (``530 5.7.0`` before).
- ``smtps`` (465, RFC 8314): TLS from the first byte; no STARTTLS. AUTH is offered
  but not required; relay control is as on a relay listener.

AUTH (PLAIN, LOGIN) is offered only over TLS and only when a password file is
configured.

Hostile input, and the reply each limit gives (``limits.*`` in the policy):

- A command line (or an AUTH continuation line) ended by a bare LF, or holding a bare
  CR, gets ``521 5.5.2 <host> Error: bare <LF> received`` and the connection is
  closed, as Postfix's ``smtpd_forbid_bare_newline = reject`` does: a relay that took
  such lines as commands could be steered by the same ambiguity SMTP smuggling uses.
  (Bare CR or LF inside DATA is the handler's business: ``550 5.5.2``, session goes on.)
  A NUL in a command line is refused the same way (``521 5.5.2 ... <NUL> received``).
- The message itself (``receive.data.refusal``), at the end of DATA, nothing stored and
  the session going on: a NUL anywhere ``550 5.6.0``; a header field over
  ``limits.header_size`` or a header section over ``limits.header_section_size``
  ``552 5.3.4``; ``limits.hop_count`` ``Received:``/``Delivered-To:`` fields (ours
  counted) ``554 5.4.6``.
- Commands pipelined after STARTTLS are discarded with the plaintext buffer when TLS
  starts (aiosmtpd >= 1.4.6, CVE-2024-34083); we log that they were there.
- Line lengths (RFC 5321 §4.5.3.1.4, §4.5.3.1.6): a command line over 512 octets
  (MAIL: 549, for SIZE and REQUIRETLS) gets ``500 5.5.2``; a text line over 1000 octets
  ends DATA with ``500 5.5.2 Line too long`` and nothing is stored (RFC 5321
  §4.5.3.1.9's "500 Line too long"; a syntax error of the DATA stream, not of the
  message, hence 5.5.2).
- Size: ``MAIL SIZE=`` over ``limits.message_size``, or more data than that, gets
  ``552 5.3.4``.
- Sessions: beyond ``limits.connections`` in total or ``limits.connections_per_client``
  from one client, a connection gets ``421 4.7.0 <host> Error: too many connections``
  instead of the greeting. After ``limits.errors`` error replies, ``421 4.7.0 ... too
  many errors`` and disconnect (``limits.ErrorBudget`` says which replies count).
- Time: ``limits.idle_timeout`` to send each command; ``limits.data_timeout`` for the
  whole message after ``354``, however slowly it trickles in. Either runs out:
  ``421 4.4.2 <host> Error: timeout exceeded`` and the connection is dropped.
- Junk: more than ``limits.junk_commands`` NOOP, RSET, VRFY, HELP, HELO or EHLO
  since the last accepted message (Postfix's ``smtpd_junk_command_limit``) get ``421
  4.7.0 <host> Error: too many junk commands`` and disconnect: a client cannot hold a
  slot for ever by sending something harmless now and then.
- Stress: while ``limits.connections`` is nearly used up (``limits.STRESS_ENTER``), every
  idle session gets ``limits.stress_idle_timeout`` instead of ``limits.idle_timeout``
  (Postfix's stress mode), logged once on entering and once on leaving.
- Unread replies: replies held back for pipelining are sent once they reach
  ``HELD_REPLIES`` octets, and a session whose client does not read them stops reading
  its commands until the transport's buffer drains (back-pressure); if it has not
  within ``limits.idle_timeout`` of the last command, the session is dropped (Postfix's
  ``smtpd_timeout`` covers writes too). Memory per session stays bounded.
- Shutdown: every session gets ``421 4.3.2 Service shutting down`` and is closed; a
  message in the middle of DATA is dropped (nothing of it is kept), one being stored is
  stored and acknowledged first.
- AUTH: after ``limits.auth_failures`` failures from one client address within
  ``limits.auth_failure_window``, AUTH from it gets ``421 4.7.0`` (and disconnect),
  right password or not, until the oldest failure leaves the window.

Every reply that ends a session (``421``, ``521``, and ``221`` to QUIT) is followed at
once by the end of its task, so nothing the client pipelined after it is executed
(aiosmtpd alone would still run a DATA pipelined after QUIT, and store the message).

``RelaySMTP`` adapts aiosmtpd: its stock replies get enhanced status codes (RFC 2034,
since we advertise ENHANCEDSTATUSCODES), a second STARTTLS is refused, the raw
RCPT argument is kept so the handler can see source routes aiosmtpd strips, and
sessions drop aiosmtpd's deprecated ``login_data`` (a warning per AUTH otherwise).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, TLSSetupException, syntax

from mta.config import Config, LimitsConfig, ListenerConfig
from mta.errors import ConfigError
from mta.events import EventSink
from mta.receive.data import DataStream, Refusal
from mta.receive.data import refusal as message_refusal
from mta.receive.handler import Accept, RelayEnvelope, RelayHandler, hook_names, peer_ip
from mta.receive.limits import AuthFailures, ConnectionGate, ErrorBudget
from mta.reply import (
    S421_SHUTTING_DOWN,
    S501_BAD_ADDRESS,
    S503_NEED_RCPT,
    S530_STARTTLS_FIRST,
    S550_NUL_CHARACTER,
    S552_HEADER_TOO_BIG,
    S552_TOO_BIG,
    S554_TOO_MANY_HOPS,
    SmtpReply,
)

log = logging.getLogger(__name__)

Authenticator = Callable[..., Any]
"""aiosmtpd's ``authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult``."""

TLS_HANDSHAKE_TIMEOUT: Final = 30.0
IDENT: Final = "ESMTP mta"
DATA_CHUNK: Final = 64 * 1024  # octets read at a time in DATA
COMMAND_LINE: Final = 512  # octets, CRLF not counted (RFC 5321 §4.5.3.1.4)
SIZE_PARAMETER: Final = 26  # " SIZE=" and up to 20 digits: MAIL may be this much longer (RFC 1870)
REQUIRETLS_PARAMETER: Final = 11  # " REQUIRETLS" (RFC 8689 §2)
HELD_REPLIES: Final = 4096  # octets of replies held back for pipelining, at most (_send)
STORE_GRACE: Final = 10.0  # seconds a message being stored may take at shutdown
_REFUSED: Final[dict[Refusal, SmtpReply]] = {
    Refusal.NUL: S550_NUL_CHARACTER,
    Refusal.HEADER_TOO_BIG: S552_HEADER_TOO_BIG,
    Refusal.TOO_MANY_HOPS: S554_TOO_MANY_HOPS,
}

# aiosmtpd's own replies that we word differently (code or enhanced code).
_REWRITE: Final = {
    "552 Error: message size exceeds fixed maximum message size": str(S552_TOO_BIG),
    "552 Error: Too much mail data": str(S552_TOO_BIG),
    "530 Must issue a STARTTLS command first": str(S530_STARTTLS_FIRST),
    "553 5.1.3 Error: malformed address": str(S501_BAD_ADDRESS),
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (1000 octets at most)",
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
_SAID_AT_ONCE: Final = ("220", "221", "354", "421", "521")  # never held back (_send)
_SINGLE_LINE = re.compile(r"(\d{3}) (.*)", re.DOTALL)
# ``<dot-atom@domain>`` then nothing, or spaces and parameters: what nearly every client
# sends. aiosmtpd parses each address with the email package's header parser (and
# defines a class per call); for this form that parser returns exactly the text
# between the brackets, so it is taken as it is (``test_fast_getaddr``). A final dot on
# the domain (``<x@example.com.>``, a fully qualified name), which that parser refuses, is
# accepted and dropped, as the rest of the address code does (``addresses.parse_path``).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(
    rf" *<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)\.?>(?:$| +(?=[^ (]|$))"
)


def enhance(reply: str, *, hostname: str) -> str:
    """Give an aiosmtpd stock reply an enhanced status code (leave greetings, EHLO alone)."""
    if reply in _REWRITE:
        return _REWRITE[reply]
    match = _SINGLE_LINE.fullmatch(reply)
    if not match or _HAS_ENHANCED.match(reply) or reply in ("250 HELP", f"250 {hostname}"):
        return reply
    enhanced = _ENHANCED.get(int(match.group(1)))
    return f"{match.group(1)} {enhanced} {match.group(2)}" if enhanced else reply


class ForbiddenInCommand(Exception):
    """A command line holding what none may; ``said``: what the 521 reply names."""

    def __init__(self, said: str) -> None:
        super().__init__(f"{said} in a command line")
        self.said = said


class BareLineEnding(ForbiddenInCommand):
    """A command line ended by a bare LF, or holding a CR that no LF follows."""

    def __init__(self, what: str) -> None:
        super().__init__(f"bare {what}")
        self.what = what


class NulInCommand(ForbiddenInCommand):
    """A command line holding a NUL: a hop that drops NULs would read another command."""

    def __init__(self) -> None:
        super().__init__("<NUL>")


class _CommandLineReader(asyncio.StreamReader):
    """aiosmtpd's stream, but a command line must end in CRLF and hold no other CR, nor NUL.

    aiosmtpd reads command lines (and AUTH continuation lines) with the default
    separator, a bare LF, and DATA lines with CRLF; only the former are checked here.
    A line too long for the buffer is drained with ``read`` (and refused with ``500``);
    the CRLF ending it may then be split across two reads.
    """

    _cr_before = False  # the last read() ended with a CR

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._cr_before = data.endswith(b"\r")
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        line = await super().readuntil(separator)
        cr_before, self._cr_before = self._cr_before, False
        if separator == b"\n":
            if not line.endswith(b"\r\n") and not (line == b"\n" and cr_before):
                raise BareLineEnding("<LF>")
            if b"\r" in line[:-2]:
                raise BareLineEnding("<CR>")
            if b"\0" in line:
                raise NulInCommand()
        return line

    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._buffer)  # type: ignore[attr-defined]

    def has_line(self) -> bool:
        """Whether a whole line is already here: reading it will not wait for the client."""
        return b"\n" in self._buffer  # type: ignore[attr-defined]


class _CommandSizeLimits(dict[str, int]):
    """Command line limits, fixed for the session.

    aiosmtpd keeps these in a class-level dict that every new session clears and every
    EHLO raises (MAIL by 26 for SIZE): one client sending EHLO over and over would
    lengthen the limit for every session. Ours belongs to the session and ignores writes.
    """

    def __missing__(self, command: str) -> int:
        extra = SIZE_PARAMETER + REQUIRETLS_PARAMETER if command == "MAIL" else 0
        return COMMAND_LINE + extra

    def __setitem__(self, command: str, limit: int) -> None:
        pass


class _Session(Session):
    """aiosmtpd's session without the deprecated ``login_data``, which logs a warning
    on every successful AUTH. The user name is in ``auth_data``."""

    @property
    def login_data(self) -> Any:
        return None

    @login_data.setter
    def login_data(self, value: Any) -> None:
        pass


def _junk_command(
    command: Callable[[SMTP, str], Awaitable[Any]],
) -> Callable[[RelaySMTP, str], Coroutine[Any, Any, Any]]:
    """aiosmtpd's ``command``, counted as junk first (``RelaySMTP._count_junk``); its
    ``@syntax`` attributes (read by HELP) are kept."""

    @functools.wraps(command)
    async def counted(self: RelaySMTP, arg: str) -> None:
        if await self._count_junk():
            await command(self, arg)

    return counted


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP protocol with the adaptations above.

    Parameters:
        implicit_tls: the transport is TLS from the start (an smtps listener).
        sessions: every listener's live sessions (connection limits, stress, shutdown).
    """

    def __init__(
        self,
        handler: RelayHandler,
        *,
        implicit_tls: bool = False,
        authenticator: Authenticator | None = None,
        limits: LimitsConfig | None = None,
        sessions: Sessions | None = None,
        auth_failures: AuthFailures | None = None,
        **kwargs: Any,
    ):
        self._check_credentials = authenticator
        self._captured: tuple[str, Any] | None = None
        if authenticator is not None:
            kwargs["authenticator"] = self._capture
        else:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        self.command_size_limits = _CommandSizeLimits()
        super().__init__(handler, **kwargs)
        # aiosmtpd builds its stream reader inline; hand the protocol ours instead, before
        # any connection exists (this only re-runs the base constructor with it).
        reader = _CommandLineReader(limit=self.line_length_limit, loop=self.loop)
        asyncio.StreamReaderProtocol.__init__(
            self, reader, client_connected_cb=self._cb_client_connected, loop=self.loop
        )
        self.implicit_tls = implicit_tls
        self.rcpt_argument: str | None = None
        self._in_mail = False  # parsing MAIL's parameters (``_getparams``)
        self.limits = limits or LimitsConfig()
        self.sessions = sessions
        self.auth_failures = auth_failures
        self.errors = ErrorBudget(self.limits.errors)
        self._held: list[str] = []  # replies to pipelined commands, not sent yet (_send)
        self._held_size = 0  # their octets, line ends included
        self._junk = 0  # junk commands since the last accepted message (_count_junk)
        self._idle_since: float | None = None  # the idle timer's start; None while in DATA
        self.storing = False  # the handler is storing a message: let it finish at shutdown
        self.client = ""  # the peer's address, once connected
        self._connected = False
        self._admitted = False  # counted by ``sessions``: release once
        self._refused = False  # turned away at connect: aiosmtpd never saw the connection

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
        if not isinstance(checked, AuthResult):
            checked = AuthResult(success=False)
        if not checked.success and self.auth_failures is not None:
            self.auth_failures.record(self.client, self.loop.time())
        return checked

    async def smtp_AUTH(self, arg: str) -> None:
        failures = self.auth_failures
        if failures is not None and failures.blocked(self.client, self.loop.time()):
            log.warning("receive.auth.rate_limited", extra={"client": self.client})
            await self.push(
                f"421 4.7.0 {self.hostname} Error: too many AUTH failures from {self.client}"
            )
            return
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_in_thread(super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check_in_thread(super().auth_LOGIN(_, args))

    def _create_session(self) -> Session:
        return _Session(self.loop)

    # --- connection accounting, replies that end the session, timeouts ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connected:  # the connection itself, not the TLS layer after STARTTLS
            self._connected = True
            self.client = peer_ip(transport.get_extra_info("peername"))
            refusal = self.sessions.admit(self) if self.sessions is not None else None
            if refusal is not None:
                self._refused = True
                log.warning(
                    "receive.connection_refused", extra={"client": self.client, "why": refusal}
                )
                cast(asyncio.WriteTransport, transport).write(
                    f"421 4.7.0 {self.hostname} Error: {refusal}\r\n".encode()
                )
                transport.close()
                return
            self._admitted = self.sessions is not None
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted and self.sessions is not None:
            self._admitted = False
            self.sessions.release(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return False
        result: bool | None = super().eof_received()
        return result

    async def push(self, status: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # we have hung up: nothing more to say
        if isinstance(status, bytes):  # as it is (an AUTH challenge), after anything held
            await self._send(None)
            await super().push(status)
            return
        reply = enhance(status, hostname=self.hostname)
        await self._send(reply)
        if reply.startswith(("421", "521")):
            await self._hang_up()
        elif self.errors.spend(reply):
            log.warning(
                "receive.too_many_errors",
                extra={"client": self.client, "errors": self.errors.errors},
            )
            await self._send(f"421 4.7.0 {self.hostname} Error: too many errors")
            await self._hang_up()

    def __dir__(self) -> list[str]:
        return hook_names(type(self), ("smtp_", "auth_"))  # see handler.hook_names

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    async def _send(self, reply: str | None) -> None:
        """Say ``reply``, or hold it back while the client's next command is already here.

        RFC 2920: a server may collect the replies to pipelined commands, as long as it
        never waits for more input with replies unsent. A client that pipelines MAIL,
        RCPT and DATA then gets their three replies in one TLS record and one write
        instead of three. The lines of a multi-line reply (aiosmtpd pushes EHLO's one by
        one) wait for its last line. Replies that change the connection (220 before TLS,
        221, 354, 421, 521) always go out at once, with whatever was held. ``None``: only
        flush.

        Held replies go out anyway once they reach ``HELD_REPLIES`` octets, and sending
        waits for the transport to drain (aiosmtpd's ``push``): a client that pipelines
        without reading stops being read, instead of piling up replies in memory.
        """
        reader = self._reader
        pending = isinstance(reader, _CommandLineReader) and reader.has_line()
        continued = reply is not None and reply[3:4] == "-"  # its last line is still to come
        if reply is not None and (continued or (pending and not reply.startswith(_SAID_AT_ONCE))):
            self._held.append(reply)
            self._held_size += len(reply) + 2
            if self._held_size < HELD_REPLIES:
                return
            reply = None
        lines, self._held, self._held_size = (
            [*self._held, *([] if reply is None else [reply])],
            [],
            0,
        )
        if lines:
            await super().push("\r\n".join(lines))

    async def _hang_up(self) -> None:
        """Close the connection and end the session task here and now, so that nothing
        the client pipelined after this reply is executed."""
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        await asyncio.sleep(0)  # inside the session task, the cancellation lands here

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, ForbiddenInCommand):
            event = "receive.nul_character" if isinstance(error, NulInCommand) else None
            log.warning(
                event or "receive.bare_line_ending",
                extra={"client": self.client, "where": "command"},
            )
            return f"521 5.5.2 {self.hostname} Error: {error.said} received"
        status: str = await super().handle_exception(error)
        return status

    def _timeout_cb(self) -> None:
        """``idle_timeout`` or ``data_timeout`` ran out: say so (RFC 5321 §3.8), then drop
        the connection without waiting for the client to read it."""
        if self.transport is None:
            return  # already gone
        # uvloop's transports are not asyncio.Transport instances, hence a cast, not a check
        transport = cast(asyncio.Transport, self.transport)
        log.info("receive.timeout", extra={"client": self.client})
        if not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
        transport.abort()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's timer; without ``duration``, the idle timeout (shorter under stress)."""
        if duration is None:
            self._idle_since = self.loop.time()
            if self.sessions is not None:
                duration = self.sessions.idle_timeout
            else:
                duration = self.limits.idle_timeout
        else:
            self._idle_since = None
        super()._reset_timeout(duration)

    def tighten(self, idle_timeout: float) -> None:
        """Make an idle session's timer run out ``idle_timeout`` after its last command,
        if that is sooner (stress: the slots are needed)."""
        handle = self._timeout_handle
        if self._idle_since is None or handle is None or self.transport is None:
            return  # in DATA (its deadline stands), or not connected
        deadline = self._idle_since + idle_timeout
        if deadline < handle.when():
            handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def shut_down(self) -> None:
        """Say ``421 4.3.2`` (after any replies held back), end the session task and
        close: the relay is stopping. Whatever DATA had come in is dropped unstored."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is None or transport.is_closing():
            return
        lines, self._held, self._held_size = [*self._held, str(S421_SHUTTING_DOWN)], [], 0
        transport.write(("\r\n".join(lines) + "\r\n").encode())
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        transport.close()

    async def _count_junk(self) -> bool:
        """Count a command that moves no mail; False (after ``421``, hanging up) once
        there were more than ``limits.junk_commands`` since the last accepted message."""
        self._junk += 1
        if self._junk <= self.limits.junk_commands:
            return True
        log.warning("receive.too_many_junk_commands", extra={"client": self.client})
        await self.push(f"421 4.7.0 {self.hostname} Error: too many junk commands")
        return False

    smtp_NOOP = _junk_command(SMTP.smtp_NOOP)
    smtp_RSET = _junk_command(SMTP.smtp_RSET)
    smtp_VRFY = _junk_command(SMTP.smtp_VRFY)
    smtp_HELP = _junk_command(SMTP.smtp_HELP)
    smtp_HELO = _junk_command(SMTP.smtp_HELO)
    smtp_EHLO = _junk_command(SMTP.smtp_EHLO)

    async def smtp_QUIT(self, arg: str) -> None:
        await super().smtp_QUIT(arg)
        await asyncio.sleep(0)  # aiosmtpd cancelled the session task: let it end here

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's timer restarts only when a command arrives, so once armed here it is
        # a deadline for the whole message, however slowly the bytes trickle in.
        self._reset_timeout(self.limits.data_timeout)
        try:
            await self._data(arg)
        finally:
            if self.transport is not None and not self.transport.is_closing():
                self._reset_timeout()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the stream in chunks (``receive.data``) instead of a
        Python loop iteration per line; replies, limits and hooks as aiosmtpd has them."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(S503_NEED_RCPT))
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        stream = DataStream(self.data_size_limit or 0, self.line_length_limit)
        while True:
            chunk = await self._reader.read(DATA_CHUNK)
            if not chunk:
                return  # the client went away mid-DATA; aiosmtpd ends the session
            if stream.feed(chunk):
                break
        # Whatever followed the end is the next command(s): give it back to the reader.
        self._reader._buffer[:0] = stream.leftover  # type: ignore[attr-defined]
        if stream.too_long or stream.too_big:
            too_long = "500 Line too long (see RFC5321 4.5.3.1.6)"
            await self.push(too_long if stream.too_long else "552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        limits = self.limits
        refused = message_refusal(
            stream.content,
            header_size=limits.header_size,
            header_section_size=limits.header_section_size,
            hop_count=limits.hop_count,
        )
        if refused is not None:
            log.warning(
                "receive.message_refused",
                extra={"client": self.client, "why": refused.value, "size": len(stream.content)},
            )
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(_REFUSED[refused]))
            return
        # The reader's own buffer, not a ``bytes`` copy of it (aiosmtpd types these as
        # bytes; our handler takes either): see ``receive.data``. Held by the envelope
        # alone, which the handler clears once it has made the content it stores.
        self.envelope.content = stream.take()  # type: ignore[assignment]
        assert isinstance(self.envelope, RelayEnvelope)  # always ours: _create_envelope
        self.envelope.dot_free = stream.dot_free
        self.envelope.original_content = self.envelope.content  # type: ignore[assignment]
        self.storing = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self.storing = False
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        reply = "250 OK" if status is MISSING else str(status)
        if reply.startswith("250"):
            self._junk = 0  # Postfix forgives junk commands once a message is accepted
        await self.push(reply)
        if self.sessions is not None and self.sessions.closing:
            await self.push(str(S421_SHUTTING_DOWN))

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207 with the event loop's own TLS (uvloop's, in C, under ``mta run``).

        aiosmtpd drives STARTTLS through asyncio's pure-Python TLS layer; every reply and
        every read then costs a Python-level encryption step. ``loop.start_tls`` hands the
        connection to the loop's implementation instead. Afterwards, as aiosmtpd does:
        everything learned before TLS is forgotten and bytes pipelined after STARTTLS are
        discarded, never executed (CVE-2024-34083, RFC 3207 §4.2).
        """
        if self.implicit_tls or (self.session is not None and self.session.ssl is not None):
            await self.push("503 5.5.1 TLS already active")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        reader = self._reader
        pipelined = reader.buffered() if isinstance(reader, _CommandLineReader) else 0
        if pipelined:
            log.warning(
                "receive.starttls.pipelined", extra={"client": self.client, "bytes": pipelined}
            )
        await self.push("220 2.0.0 Ready to start TLS")
        plain = self.transport
        # The plaintext pipelined after STARTTLS is dropped here, with no await between
        # this and start_tls taking the transport over. Not after the handshake: by then
        # the buffer may hold the client's first command under TLS (sent with its TLS 1.3
        # Finished), and a client that waits for its reply would hang.
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        try:
            secure = await self.loop.start_tls(
                cast(asyncio.WriteTransport, plain),
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        if secure is None:  # the peer went away during the handshake
            raise TLSSetupException()
        self._original_transport = plain
        self._tls_protocol = secure  # type: ignore[assignment]  # only its truth is read
        self.transport = secure
        # The same private hand-over aiosmtpd's own connection_made does after STARTTLS.
        self._reader._transport = secure  # type: ignore[attr-defined]
        self._writer._transport = secure  # type: ignore[attr-defined]
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = secure.get_extra_info("peername")
        self.session.ssl = {
            "ssl_object": secure.get_extra_info("ssl_object"),
            "peercert": secure.get_extra_info("peercert"),
            "cipher": secure.get_extra_info("cipher"),
        }
        self._tls_handshake_okay = True
        self._reset_timeout()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._in_mail = True
        try:
            await super().smtp_MAIL(arg)
        finally:
            self._in_mail = False

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """aiosmtpd's parameter parsing, with ``REQUIRETLS`` (no value) taken as known on
        MAIL: aiosmtpd would answer ``555``. It stays in ``mail_options``, where the
        handler decides (``530 5.7.10`` outside TLS, RFC 8689 §2)."""
        found: dict[str, str | bool] | None = super()._getparams(params)
        if self._in_mail and found is not None and found.get("REQUIRETLS") is True:
            del found["REQUIRETLS"]
        return found

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = _PLAIN_ANGLE_ADDR.match(arg)
        if plain is None:
            try:
                return super()._getaddr(arg)
            except Exception:  # the email parser crashes on some junk
                # ("<" raises IndexError, "1@[" AttributeError): the client's syntax
                # error, not ours, so 501 rather than 451 and a traceback in the log.
                return None, None
        address = plain.group(1)
        if self.local_part_limit and address.rfind("@") > self.local_part_limit:
            return None, None
        return address, arg[plain.end() :]

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.rcpt_argument = arg
        try:
            await super().smtp_RCPT(arg)
        finally:
            self.rcpt_argument = None


class Sessions:
    """Every listener's live sessions: the connection limits, stress mode, shutdown.

    Parameters:
        limits: ``connections``, ``connections_per_client``, ``idle_timeout`` and
            ``stress_idle_timeout``.
    """

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.gate = ConnectionGate(limits.connections, limits.connections_per_client)
        self.live: set[RelaySMTP] = set()
        self.closing = False  # shutting down: a session that stores a message then ends

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle session is given now (shorter under stress)."""
        if self.gate.stressed:
            return min(self.limits.idle_timeout, self.limits.stress_idle_timeout)
        return self.limits.idle_timeout

    def admit(self, session: RelaySMTP) -> str | None:
        """Count a new session; None when admitted (then ``release`` it once), else why not."""
        refusal = self.gate.admit(session.client)
        if refusal is None:
            self.live.add(session)
            self._check_stress()
        return refusal

    def release(self, session: RelaySMTP) -> None:
        self.live.discard(session)
        self.gate.release(session.client)
        self._check_stress()

    def _check_stress(self) -> None:
        if not self.gate.stress_changed():
            return
        facts = {"sessions": self.gate.count, "limit": self.gate.total}
        if self.gate.stressed:
            log.warning("receive.stress.start", extra={**facts, "idle_s": self.idle_timeout})
            for session in self.live:
                session.tighten(self.idle_timeout)
        else:
            log.info("receive.stress.end", extra=facts)

    async def shut_down(self, grace: float = STORE_GRACE) -> None:
        """Tell every session ``421 4.3.2`` and end it. One storing a message is given
        up to ``grace`` seconds to finish (and acknowledge it) first."""
        self.closing = True
        storing = []
        for session in list(self.live):
            if session.storing and session._handler_coroutine is not None:
                storing.append(session._handler_coroutine)
            else:
                session.shut_down()
        if storing:
            await asyncio.wait(storing, timeout=grace)
        for session in list(self.live):
            session.shut_down()
        if self.live:
            log.info("receive.sessions_closed", extra={"sessions": len(self.live)})
        await asyncio.sleep(0)  # let the transports write what they were given


@dataclass(frozen=True)
class Serving:
    """What a listener builds its next session with. A reload swaps it whole
    (``Listener.serving``); a session keeps the one it started with to its end."""

    config: Config
    listener: ListenerConfig
    handler: RelayHandler
    context: ssl.SSLContext
    authenticator: Authenticator | None
    hostname: str


def _protocol_factory(
    slot: Listener, sessions: Sessions, auth_failures: AuthFailures
) -> Callable[[], RelaySMTP]:
    def build() -> RelaySMTP:
        serving = slot.serving  # read per connection: a reload swaps it
        config, listener, context = serving.config, serving.listener, serving.context
        implicit = listener.mode == "smtps"
        submission = listener.mode == "submission"
        return RelaySMTP(
            serving.handler,
            implicit_tls=implicit,
            hostname=serving.hostname,
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
            authenticator=serving.authenticator,
            limits=config.limits,
            sessions=sessions,
            auth_failures=auth_failures,
            loop=asyncio.get_running_loop(),
        )

    return build


class Listener:
    """One running listener: its server, and what its next session is built with."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.server: asyncio.Server | None = None

    def handshake_context(self) -> ssl.SSLContext:
        """smtps: the server's TLS context, fixed when it starts. Each handshake switches
        to the listener's context of the moment, as an SNI callback may (OpenSSL calls
        it for every ClientHello, with or without a server name), so renewed
        certificates are served without a new socket."""

        def switch(ssl_object: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self.serving.context
            if ssl_object.context is not current:
                ssl_object.context = current

        first = self.serving.context
        first.sni_callback = switch
        return first


def bind_listener(config: Config, index: int) -> socket.socket:
    """A socket bound to ``config.listeners[index]``'s address, not yet listening: the
    kernel accepts no connection on it until ``start_listeners`` listens. Bound before
    the relay gives up root (``mta.privileges``); ``ConfigError`` names the listener.

    In a relay group (``server.workers`` > 1) every worker binds the same address with
    SO_REUSEPORT, and the kernel spreads new connections over those listening; a
    single relay does not, so a port another process holds stays an error."""
    listener = config.listeners[index]
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.server.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio does: [::] is not 0.0.0.0 too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
    except OSError as err:
        sock.close()
        raise _cannot_listen(config, index, err) from None
    sock.setblocking(False)
    return sock


def bind_listeners(config: Config) -> list[socket.socket]:
    """``bind_listener`` for every listener; on a failure the ones bound are closed."""
    bound: list[socket.socket] = []
    try:
        for index in range(len(config.listeners)):
            bound.append(bind_listener(config, index))
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def _cannot_listen(config: Config, index: int, err: OSError) -> ConfigError:
    listener = config.listeners[index]
    where = f"{listener.address}:{listener.port}"
    # uvloop words it "error while attempting to bind on address ...": the errno's own
    # text is the one line an operator needs.
    reason = os.strerror(err.errno) if err.errno else str(err)
    return ConfigError(config.source, f"listener[{index}]", f"cannot listen on {where}: {reason}")


def serving_for(
    config: Config,
    accept: Accept,
    tls_for: Callable[[ListenerConfig], ssl.SSLContext],
    authenticator: Authenticator | None,
    hostname: str,
    events: EventSink | None = None,
) -> list[Serving]:
    """What each of ``config.listeners`` serves with, built and checked (a submission
    listener needs a password file) before anything listens or is swapped."""
    serving: list[Serving] = []
    for listener in config.listeners:
        if listener.mode == "submission" and authenticator is None:
            raise ConfigError(
                config.source, "auth.password_file", "required by a submission listener"
            )
        handler = RelayHandler(config, listener, accept, hostname, events=events)
        serving.append(
            Serving(config, listener, handler, tls_for(listener), authenticator, hostname)
        )
    return serving


class Listeners:
    """The running listeners, in the order of ``config.listeners``.

    Parameters:
        sessions: every listener's live sessions (one count for all: another port is no
            way around a limit).
        limits: the AUTH failure limits (``auth_failures``, ``auth_failure_window``).
    """

    def __init__(self, sessions: Sessions, limits: LimitsConfig) -> None:
        self.sessions = sessions
        self.running: list[Listener] = []
        self._limits = limits
        self.auth_failures = AuthFailures(limits.auth_failures, limits.auth_failure_window)

    @property
    def servers(self) -> list[asyncio.Server]:
        return [slot.server for slot in self.running if slot.server is not None]

    async def open(self, serving: Serving, sock: socket.socket, index: int) -> Listener:
        """Start listening on ``sock`` (bound already) for ``serving.listener``."""
        slot = Listener(serving)
        listener = serving.listener
        smtps = listener.mode == "smtps"
        factory = _protocol_factory(slot, self.sessions, self.auth_failures)
        try:
            slot.server = await asyncio.get_running_loop().create_server(
                factory,
                sock=sock,
                ssl=slot.handshake_context() if smtps else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if smtps else None,
            )
        except OSError as err:
            sock.close()
            raise _cannot_listen(serving.config, index, err) from None
        server = slot.server
        port = server.sockets[0].getsockname()[1] if server.sockets else listener.port
        log.info(
            "receive.listening",
            extra={
                "address": listener.address,
                "port": port,
                "mode": listener.mode,
                "auth": serving.authenticator is not None,
            },
        )
        return slot

    async def start(
        self, serving: Sequence[Serving], bound: Sequence[socket.socket] | None = None
    ) -> None:
        """Open every listener; a listener that cannot bind raises ``ConfigError``
        naming it, and the ones already started are closed first."""
        try:
            for index, each in enumerate(serving):
                sock = bound[index] if bound is not None else bind_listener(each.config, index)
                self.running.append(await self.open(each, sock, index))
        except BaseException:
            self.close()
            for sock in bound or ():
                sock.close()
            raise

    async def swap(
        self,
        serving: Sequence[Serving],
        kept: Sequence[tuple[int, int]],
        added: Mapping[int, socket.socket | None],
    ) -> None:
        """A reload: the kept listeners (old index, new index) serve their next sessions
        with the new ``serving``; the others are closed; ``added`` ones (new index ->
        socket bound already, or None: bind now) start. Sessions in progress go on."""
        keep = {old: new for old, new in kept}
        slots: dict[int, Listener] = {}
        for old_index, slot in enumerate(self.running):
            if old_index in keep:
                slot.serving = serving[keep[old_index]]
                slots[keep[old_index]] = slot
            elif slot.server is not None:
                slot.server.close()  # its sessions go on; it accepts no more
        config = serving[0].config if serving else None
        if config is not None and config.limits != self._limits:
            self._limits = config.limits
            self.sessions.limits = config.limits
            self.sessions.gate.total = config.limits.connections
            self.sessions.gate.per_client = config.limits.connections_per_client
            # The failures counted so far stay counted, against the new limit.
            self.auth_failures.limit = config.limits.auth_failures
            self.auth_failures.window = config.limits.auth_failure_window
        for index, sock in sorted(added.items()):
            assert config is not None
            sock = sock if sock is not None else bind_listener(config, index)
            slots[index] = await self.open(serving[index], sock, index)
        self.running = [slots[index] for index in sorted(slots)]

    def close(self) -> None:
        for server in self.servers:
            server.close()


async def start_listeners(
    config: Config,
    accept: Accept,
    tls_for: Callable[[ListenerConfig], ssl.SSLContext],
    authenticator: Authenticator | None,
    hostname: str,
    sessions: Sessions | None = None,
    events: EventSink | None = None,
    bound: Sequence[socket.socket] | None = None,
) -> list[asyncio.Server]:
    """Start one server per configured listener; return them once all accept connections.

    Parameters:
        config: the configuration; ``config.listeners`` says where and how to listen.
        accept: stores a message durably and schedules it (see ``handler.Accept``).
        tls_for: the server TLS context for a listener.
        authenticator: checks AUTH credentials; None means AUTH is not offered.
        hostname: our name in the banner, EHLO and ``Received:``.
        sessions: where the sessions are kept; the caller's, to ``shut_down`` them when
            the relay stops (default: a new one, from ``config.limits``).
        events: told of every accepted message.
        bound: the listeners' sockets, bound already (``bind_listeners``), one per
            listener in order; None: each is bound here.

    A listener that cannot bind raises ``ConfigError`` naming it; any already started
    are closed first. (``Listeners`` is the same, kept for a reload.)
    """
    listeners = Listeners(
        sessions if sessions is not None else Sessions(config.limits), config.limits
    )
    try:
        serving = serving_for(config, accept, tls_for, authenticator, hostname, events)
    except BaseException:
        for sock in bound or ():
            sock.close()
        raise
    await listeners.start(serving, bound)
    return listeners.servers
