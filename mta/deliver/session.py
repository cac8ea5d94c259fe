"""One SMTP session to one address: connect, EHLO, STARTTLS, EHLO, MAIL, RCPT..., DATA.

This is the I/O edge for outbound SMTP: aiosmtplib, ``ssl`` and socket exceptions are
translated here, once, into a typed ``SessionOutcome``:

- ``Transacted``: the server took part in a mail transaction, and its answers decide
  each recipient (a 5xx to MAIL FROM bounces them all; RCPT and DATA replies decide one
  by one). The caller tries no other host.
- ``HostFailed``: nothing was decided here (connection refused or lost, timeout, a 4xx
  or 5xx greeting, a 4xx to MAIL FROM, a TLS requirement not met): try the next
  address. Its reply is a 4xx that names the host; ``reason`` is set, with the
  RFC 8460 result type, exactly when TLS was the problem. The one 5xx: a REQUIRETLS
  message (RFC 8689) and a host that did not prove its certificate or does not offer
  REQUIRETLS (``550 5.7.30``, ``requiretls`` set; ``mta.deliver.requiretls``), found
  before MAIL FROM: no other message is held to that.

TLS (RFC 3207): STARTTLS is required at every level but ``may``; a host that does not
offer it fails with ``starttls-not-supported``. After the handshake, a session without
forward secrecy is refused (``no-forward-secrecy``); at every level above ``may`` so is
a leaf certificate whose key is weak (``weak-key``, ``tlsbase.weak_public_key``: the
handshake itself never looks at it); then the presented chain is checked against the
host's requirement (DANE, PKIX or pinned fingerprints, ``policy.verify``) before a
single command is sent over it; then EHLO is sent again because everything learned
before TLS is forgotten. An MTA-STS ``testing`` requirement only logs a failed check
(``deliver.tls.report_only``) and goes on.

When the forward-secret handshake fails, a second connection tries the ``fallback``
context (``tlsclient``: TLS >= 1.2, any HIGH suite). At ``may`` mail goes over it
(``deliver.tls.weaker``, a WARNING): plaintext is for peers that offer no TLS at all,
or whose TLS fails even so (``deliver.tls.fallback``; a peer with TLS older than 1.2
only is one). Above ``may`` it only finds out why the first one failed: a peer that
resets the connection rather than send an alert is ``no-forward-secrecy`` when the
fallback negotiates a suite without it; nothing is ever sent over that connection.
At ``may`` a weak peer key is logged (``deliver.tls.weak_key``) and the mail goes.

Replies: a reply that arrives when none is due (say a second ``250`` in the segment of
the EHLO reply) would pair every later reply with the wrong command, so it ends the
session with a ``HostFailed`` (``451 4.5.0``); no recipient is decided by it. The
envelope is not trusted either: an address with a control character (CR, LF, NUL...)
is refused before anything of it is written (``553 5.1.7`` sender, ``553 5.1.3``
recipient). A ``552`` to RCPT is temporary (RFC 5321 §4.5.3.1.10): that recipient is
deferred. The DATA payload (dot-stuffed, CRLF line endings) is made by
``wire.data_payload_parts``, and written only as fast as the peer takes it
(``channel.Channel.write_paced``).

PIPELINING (RFC 2920), when the peer offers it: MAIL, every RCPT and DATA go in one
write and their replies are read in order (``channel``: aiosmtplib reads one reply per
command). The outcome is the same as one command per round trip: ``_decide`` reads
the same replies either way. What differs is only a DATA that a server answers ``354``
though no RCPT (or MAIL) was accepted: a lone dot ends the empty data, and no message
is sent. A transaction without an accepted recipient leaves the connection uncached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal, TypeAlias, TypeVar, cast

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.typing import Default

from mta.deliver import requiretls
from mta.deliver.channel import Channel, taken_over
from mta.deliver.pool import ConnectionCache
from mta.deliver.requiretls import RELAXABLE
from mta.deliver.tlschain import peer_chain
from mta.deliver.tlsclient import ClientContexts, classify_tls_error
from mta.deliver.wire import data_payload_parts
from mta.model import HostPolicy, Outcome, PeerAuth, RecipientResult, TlsInfo, TlsLevel
from mta.policy.decide import HostRequirement
from mta.policy.verify import VerifyResult, leaf_key, verify_peer
from mta.reply import SmtpReply
from mta.tlsbase import is_forward_secret

log = logging.getLogger(__name__)
_T = TypeVar("_T")


MAX_REPLY_TEXT: Final = 400  # remote reply text kept for the DSN and the queue listing
WRITE_CHUNK: Final = 64 * 1024  # DATA payload slice written at a time (see Channel.write_paced)
_ENHANCED: Final = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect and what the peer must prove there.

    ``mx`` is the host name the address belongs to; the requirement says the TLS level,
    the SNI name and the check on the presented chain.
    """

    address: str
    port: int
    mx: str
    requirement: HostRequirement
    client_cert: Path | None = None  # what we present for mutual TLS (a domain policy's)
    client_key: Path | None = None
    # "TLS-Required: No" honoured (RFC 8689 §4.2.2): a failed DANE/MTA-STS check only logs
    tls_required_no: bool = False

    @property
    def level(self) -> TlsLevel:
        return self.requirement.level


@dataclass(frozen=True, slots=True)
class Transaction:
    """What to send: the envelope (for these recipients only) and the content."""

    mail_from: str
    rcpts: tuple[str, ...]
    content: bytes
    smtputf8: bool = False
    body_8bit: bool = False
    requiretls: bool = False  # RFC 8689: authenticated TLS and REQUIRETLS, or not here
    crlf_only: bool = False  # ``content`` is known to have CRLF line endings only
    dot_free: bool = False  # ... and no line that begins with "."


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Per-agent session parameters (``outbound.*``)."""

    helo: str | None
    connect_timeout: float
    command_timeout: float


@dataclass(frozen=True, slots=True)
class Transacted:
    """The server's replies decided every recipient (in ``Transaction.rcpts`` order)."""

    results: tuple[RecipientResult, ...]
    tls: TlsInfo | None
    policy: HostPolicy | None = None  # what the peer had to prove, and how it did
    local_address: str = ""  # our end of the connection (TLS-RPT's sending-mta-ip)


@dataclass(frozen=True, slots=True)
class HostFailed:
    """Nothing decided at this address; try the next one."""

    reply: SmtpReply
    reason: str | None = None
    tls: TlsInfo | None = None
    policy: HostPolicy | None = None  # None: refused by the policy before connecting
    local_address: str = ""  # our end of the connection; "" when none was made
    requiretls: bool = False  # refused only for the message's REQUIRETLS (reply 5.7.30)


@dataclass(frozen=True, slots=True)
class Probed:
    """``mta check --connect``: the handshake happened and the check ran; no mail was sent."""

    tls: TlsInfo | None
    chain: tuple[bytes, ...]
    verify: VerifyResult | None


SessionOutcome = Transacted | HostFailed


def reply_from(code: int, message: str) -> SmtpReply:
    """A remote reply as an ``SmtpReply``: enhanced code from its text (RFC 2034) or the
    class default (``X.0.0``); multi-line text joined, control characters removed, capped.
    """
    klass = str(code // 100)
    enhanced = f"{klass}.0.0"
    parts: list[str] = []
    for index, line in enumerate(message.splitlines() or [""]):
        line = line.strip()
        match = _ENHANCED.match(line)
        if match and match.group(1) == klass:  # a code of another class is just text
            if index == 0:
                enhanced = ".".join(match.groups())
            line = line[match.end() :]
        parts.append(_UNPRINTABLE.sub(" ", line).strip())
    text = " ".join(part for part in parts if part)
    if len(text) > MAX_REPLY_TEXT:
        text = text[: MAX_REPLY_TEXT - 3] + "..."
    return SmtpReply(code, enhanced, text)


def _all(rcpts: Iterable[str], outcome: Outcome, reply: SmtpReply) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(rcpt, outcome, reply) for rcpt in rcpts)


class SurplusReply(aiosmtplib.SMTPException):
    """The server sent a reply (or part of one) when none was due."""


def _expect_no_surplus(smtp: aiosmtplib.SMTP) -> None:
    """Raise ``SurplusReply`` if bytes of a reply are waiting that no command asked for.

    aiosmtplib keeps what followed a complete reply in the same read in its protocol's
    buffer, and hands it out as the reply to the next command; data arriving while no
    command waits it drops. So, before each command (and after the reply to the end of
    DATA), that buffer must be empty. STARTTLS is the exception aiosmtplib handles
    itself: what follows the ``220`` is discarded (RFC 3207 §4.2).
    """
    protocol = smtp.protocol
    if protocol is not None and protocol._buffer:  # private: see the docstring
        raise SurplusReply("a reply arrived when none was due")


async def _last_reply(channel: Channel) -> aiosmtplib.SMTPResponse:
    """The next reply, which must be the last one due: anything after it is a surplus
    (after a ``354``, it would be taken for the reply to the end of the payload)."""
    reply = await channel.read_reply()
    if channel.buffer:
        raise SurplusReply("a reply arrived when none was due")
    return reply


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client that never sends a command while an unasked reply waits."""

    async def execute_command(
        self,
        *args: bytes,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 - as overridden
    ) -> aiosmtplib.SMTPResponse:
        _expect_no_surplus(self)
        return await super().execute_command(*args, timeout=timeout)


async def deliver_session(
    target: Target,
    txn: Transaction,
    settings: SessionSettings,
    contexts: ClientContexts,
    cache: SessionCache | None = None,
) -> SessionOutcome:
    """Send one transaction to ``target``: over a cached connection with exactly the same
    requirement if one is idle, else over a new one (at ``may``, with the fallback TLS,
    then plaintext, after a TLS failure). A connection that ends cleanly goes back to
    ``cache``.

    Parameters:
        target: the address, port, MX host name and what the peer must prove.
        txn: the envelope and content to send.
        settings: HELO name and timeouts.
        contexts: the client TLS contexts (``tlsclient.client_contexts``).
        cache: idle connections to reuse (Postfix's connection cache); None: no reuse.
    """
    key = cache_key(target)
    while cache is not None and (session := cache.take(key)) is not None:
        # No RSET probe: the last transaction ended cleanly, so MAIL may follow at once
        # (RFC 5321 §4.1.1.1). A peer that closed the idle connection in the meantime
        # fails MAIL FROM with the connection lost; then try the next one, or a new one.
        outcome = await session.send(txn)
        if isinstance(outcome, HostFailed) and session.stale:
            await session.close()
            continue
        return await _done(session, outcome, cache, key)
    session, failure = await _open(target, settings, contexts)
    if failure is not None:
        await session.close()
        return failure
    return await _done(session, await session.send(txn), cache, key)


async def _open(
    target: Target, settings: SessionSettings, contexts: ClientContexts
) -> tuple[_Session, HostFailed | None]:
    """A new connection, up to the point where mail may be sent (or why it may not).

    After a failed forward-secret handshake, the fallback context (module docstring):
    at ``may`` to send over it, above ``may`` to name the reason when the first failure
    did not (a reset, not an alert). At ``may``, plaintext when TLS still fails.
    """
    session = _Session(target, settings, contexts.strict, tls="strict")
    failure = await session.open()
    if failure is None:
        return session, failure
    may = target.level is TlsLevel.MAY
    if session.handshake_failed and (may or failure.reason == "validation-failure"):
        await session.close()
        session = _Session(target, settings, contexts.fallback, tls="fallback")
        retried = await session.open()
        if retried is None:  # only at may: above it the fallback never lets mail through
            return session, None
        if may or retried.reason == "no-forward-secrecy":
            failure = retried
    if _fall_back_to_plaintext(target, failure):
        await session.close()
        session = _Session(target, settings, contexts.strict, tls="none")
        failure = await session.open()
    return session, failure


async def _done(
    session: _Session, outcome: SessionOutcome, cache: SessionCache | None, key: CacheKey
) -> SessionOutcome:
    if cache is not None and isinstance(outcome, Transacted) and session.reusable:
        cache.give(key, session)
    else:
        await session.close()
    return outcome


async def probe_session(
    target: Target, settings: SessionSettings, contexts: ClientContexts
) -> Probed | HostFailed:
    """Connect, STARTTLS and check the peer exactly as delivery would, then QUIT."""
    session, failure = await _open(target, settings, contexts)
    await session.close()
    return failure or Probed(session.tls, session.chain, session.verified)


def _fall_back_to_plaintext(target: Target, failure: HostFailed) -> bool:
    """Only at ``may`` does a TLS failure lead to a plaintext retry (as Postfix does)."""
    if target.level is not TlsLevel.MAY or failure.reason is None:
        return False
    log.info(
        "deliver.tls.fallback",
        extra={"mx": target.mx, "address": target.address, "reason": failure.reason},
    )
    return True


CacheKey = tuple[str, int, str, HostRequirement, Path | None, Path | None, bool]
SessionCache: TypeAlias = "ConnectionCache[CacheKey, _Session]"


def cache_key(target: Target) -> CacheKey:
    """Connections are shared only between deliveries that demand exactly the same proof
    from the same peer, with the same client identity: one domain's policy can never
    carry over to another's mail through a reused connection."""
    return (
        target.address,
        target.port,
        target.mx,
        target.requirement,
        target.client_cert,
        target.client_key,
        target.tls_required_no,
    )


class _Session:
    """One connection: open (connect, EHLO, STARTTLS, check), then transactions, then close.

    ``stage`` names the step for the "lost connection" reply; ``reusable`` turns false
    as soon as anything unexpected happens on the connection. ``tls`` is ``"strict"``
    (the forward-secret context), ``"fallback"`` (module docstring) or ``"none"``
    (plaintext, at ``may`` only); ``handshake_failed`` says that STARTTLS was accepted
    but no forward-secret session came of it.
    """

    def __init__(
        self,
        target: Target,
        settings: SessionSettings,
        context: ssl.SSLContext,
        *,
        tls: Literal["strict", "fallback", "none"],
    ) -> None:
        self.target, self.settings, self.context = target, settings, context
        self.tls_mode = tls
        self.handshake_failed = False
        self.stage = "connect"
        self.tls: TlsInfo | None = None
        self.chain: tuple[bytes, ...] = ()
        self.verified: VerifyResult | None = None
        self.reusable = True
        self.uses = 0
        self.raw: asyncio.Transport | None = None  # the TCP transport under any TLS
        self.local_address = ""  # our IP on this connection, once connected
        self.where = f"{target.mx}[{target.address}]:{target.port}"
        self.smtp = _Client(
            hostname=target.address,
            port=target.port,
            local_hostname=settings.helo,
            timeout=settings.command_timeout,
            start_tls=False,
            use_tls=False,
        )

    def failed(self, code: int, enhanced: str, text: str, reason: str | None = None) -> HostFailed:
        return HostFailed(SmtpReply(code, enhanced, text), reason, self.tls, self.policy())

    def policy(self) -> HostPolicy:
        """The requirement this session enforced, and how the peer met it (so far)."""
        requirement = self.target.requirement
        verified = self.verified
        auth = verified.auth if verified is not None and verified.ok else PeerAuth.NONE
        report_only = requirement.report_only or self._relaxed
        reported = None
        if verified is not None and not verified.ok and report_only:
            reported = verified.reason or "validation-failure"
        return HostPolicy(
            requirement.source,
            requirement.level,
            requirement.check.kind,
            auth,
            report_only,
            reported_failure=reported,
            policy_strings=requirement.policy_strings,
            mx_patterns=requirement.sts.mx if requirement.sts is not None else (),
        )

    @property
    def _relaxed(self) -> bool:
        """A failed check of the domain's own DANE/MTA-STS policy only logs: the message
        says ``TLS-Required: No`` and the operator honours that (``requiretls``)."""
        return self.target.tls_required_no and self.target.requirement.source in RELAXABLE

    def remote_failure(self, reply: SmtpReply, after: str) -> HostFailed:
        """A refusal that only rules out this host: its 4xx as is; a 5xx becomes 451 4.4.0."""
        text = f"host {self.where} said: {reply} (in reply to {after})"
        if reply.is_temporary:
            return self.failed(reply.code, reply.enhanced, text)
        return self.failed(451, "4.4.0", text)

    async def _guarded(self, step: Callable[[], Awaitable[_T]]) -> _T | HostFailed:
        """Run a step; a timeout or a lost connection becomes a ``HostFailed`` (4.4.2)."""
        try:
            return await step()
        except SurplusReply:
            self.reusable = False  # and no QUIT: its reply could not be told apart
            return self.failed(
                451,
                "4.5.0",
                f"protocol error with {self.where}: a reply arrived when none was due "
                f"(before {self.stage})",
            )
        except aiosmtplib.SMTPTimeoutError:
            self.reusable = False
            return self.failed(451, "4.4.2", f"timeout with {self.where} during {self.stage}")
        except (aiosmtplib.SMTPException, OSError) as err:
            self.reusable = False
            return self.failed(
                451,
                "4.4.2",
                f"lost connection with {self.where} during {self.stage}: {_oneline(err)}",
            )

    async def open(self) -> HostFailed | None:
        """Connect, EHLO, STARTTLS and check the peer; None when mail may be sent."""
        result = await self._guarded(self._open)
        if result is not None:
            self.reusable = False
            result = replace(result, local_address=self.local_address)
        return result

    async def _open(self) -> HostFailed | None:
        failure = await self._connect()
        if failure is None:
            failure = await self._hello()
        if failure is None and self.tls_mode != "none":
            failure = await self._starttls()
        return failure

    async def send(self, txn: Transaction) -> SessionOutcome:
        """One mail transaction on the open connection."""
        self.uses += 1
        outcome = await self._guarded(lambda: self._transaction(txn))
        if isinstance(outcome, Transacted) and any(r.reply.code == 421 for r in outcome.results):
            self.reusable = False  # the server is closing the connection
        return replace(outcome, local_address=self.local_address)

    @property
    def stale(self) -> bool:
        """A reused connection that turned out dead before the first reply to MAIL FROM."""
        return self.uses > 1 and not self.reusable and self.stage == "MAIL FROM"

    async def close(self) -> None:
        """QUIT when the connection is healthy, then let the socket go."""
        if self.reusable and self.smtp.is_connected:
            self.stage = "quit"
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await self.smtp.quit(timeout=self.settings.connect_timeout)
        self.smtp.close()
        # Closing a TLS transport waits for the peer's close_notify (up to 30 s);
        # after QUIT there is nothing left to protect, so let the socket go now. After
        # a failure, drop what is still unsent: a peer that stopped reading would keep
        # a closing transport (and its buffer) alive for as long as it likes.
        if self.raw is not None and not self.reusable:
            self.raw.abort()
        elif self.raw is not None and not self.raw.is_closing():
            self.raw.close()

    async def _connect(self) -> HostFailed | None:
        try:
            await self.smtp.connect(timeout=self.settings.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as err:
            return self.remote_failure(reply_from(err.code, err.message), "the greeting")
        except aiosmtplib.SMTPConnectTimeoutError:
            return self.failed(451, "4.4.1", f"connect to {self.where}: timed out")
        except (aiosmtplib.SMTPConnectError, OSError) as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            return self.failed(451, "4.4.1", f"connect to {self.where}: {_oneline(cause)}")
        self.raw = cast(asyncio.Transport | None, self.smtp.transport)  # uvloop: no subclass
        self.local_address = _local_address(self.raw)
        return None

    async def _hello(self) -> HostFailed | None:
        self.stage = "EHLO"
        try:
            await self.smtp.ehlo()
        except aiosmtplib.SMTPHeloError as err:
            refused = reply_from(err.code, err.message)
            if err.code < 500:
                return self.remote_failure(refused, "EHLO")
            if self.target.level is not TlsLevel.MAY:  # no ESMTP, so no STARTTLS
                return self.failed(
                    451,
                    "4.7.5",
                    f"TLS is required, but host {self.where} refused EHLO: {refused}",
                    "starttls-not-supported",
                )
            self.stage = "HELO"
            await self.smtp.helo()
        return None

    async def _starttls(self) -> HostFailed | None:
        if not self.smtp.supports_extension("starttls"):
            if self.target.level is TlsLevel.MAY:
                return None
            return self.failed(
                451,
                "4.7.5",
                f"TLS is required, but was not offered by host {self.where}",
                "starttls-not-supported",
            )
        self.stage = "STARTTLS"
        _expect_no_surplus(self.smtp)
        try:
            await self.smtp.starttls(
                tls_context=self.context, server_hostname=self.target.requirement.sni
            )
        except ssl.SSLError as err:
            self.handshake_failed = True
            reason = classify_tls_error(err)
            detail = getattr(err, "verify_message", None) or getattr(err, "reason", None) or err
            return self.failed(
                451, "4.7.5", f"TLS with {self.where} failed: {reason}: {_oneline(detail)}", reason
            )
        except aiosmtplib.SMTPResponseException as err:
            refused = reply_from(err.code, err.message)
            return self.failed(
                451,
                "4.7.5",
                f"STARTTLS refused by {self.where}: {refused}",
                "starttls-not-supported",
            )
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as err:
            # A reset or EOF in the handshake may be the peer's way to refuse our suites
            # (``_open`` asks the fallback context); a timeout is not worth a second try.
            self.handshake_failed = not isinstance(err, aiosmtplib.SMTPTimeoutError)
            return self.failed(
                451,
                "4.7.5",
                f"TLS handshake with {self.where} failed: {_oneline(err)}",
                "validation-failure",
            )
        ssl_object = self.smtp.get_transport_info("ssl_object")
        version: str | None = None
        cipher: str | None = None
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            version = ssl_object.version()
            negotiated = ssl_object.cipher()
            cipher = negotiated[0] if negotiated else None
        self.tls = TlsInfo(version or "unknown", cipher or "unknown")
        forward_secret = is_forward_secret(version, cipher)
        if self.tls_mode == "fallback" and self.target.level is TlsLevel.MAY:
            log.warning(
                "deliver.tls.weaker",
                extra={
                    "mx": self.target.mx,
                    "address": self.target.address,
                    "tls": version,
                    "cipher": cipher,
                    "forward_secret": forward_secret,
                },
            )
        elif not forward_secret:
            self.handshake_failed = True
            return self.failed(
                451,
                "4.7.5",
                f"TLS with {self.where} has no forward secrecy: {version} {cipher}",
                "no-forward-secrecy",
            )
        elif self.tls_mode == "fallback":  # above may: this connection only tells why
            return self.failed(
                451,
                "4.7.5",
                f"TLS with {self.where} works only without the forward-secret floor: "
                f"{version} {cipher}",
                "validation-failure",
            )
        failure = self._check_peer(ssl_object)
        if failure is not None:
            return failure
        self.stage = "EHLO after STARTTLS"
        await self.smtp.ehlo()  # RFC 3207 §4.2: forget what was learned before TLS
        return None

    def _check_peer(self, ssl_object: object) -> HostFailed | None:
        """Check the presented chain against the requirement before anything is sent over it."""
        requirement = self.target.requirement
        leaf: bytes | None = None
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            self.chain = tuple(peer_chain(ssl_object))
            leaf = self.chain[0] if self.chain else ssl_object.getpeercert(binary_form=True)
        failure = self._check_key(leaf)
        if failure is not None:
            return failure
        result = verify_peer(requirement.check, self.chain, datetime.now(UTC))
        self.verified = result
        assert self.tls is not None
        self.tls = replace(self.tls, peer_verified=result.ok and requirement.check.kind != "none")
        if result.ok:
            return None
        if self._relaxed and not requirement.report_only:
            log.warning(
                "deliver.tls.required_no",
                extra={
                    "mx": self.target.mx,
                    "reason": result.reason,
                    "source": requirement.source.value,
                },
            )
            return None
        if requirement.report_only:
            log.warning(
                "deliver.tls.report_only",
                extra={
                    "mx": self.target.mx,
                    "reason": result.reason,
                    "source": requirement.source.value,
                },
            )
            return None
        return self.failed(
            451,
            "4.7.5",
            f"TLS peer {self.where} failed {requirement.check.kind} check: {result.detail}",
            result.reason or "validation-failure",
        )

    def _check_key(self, leaf: bytes | None) -> HostFailed | None:
        """The weak-key rule on the leaf, whatever the check (issue 8 §1): above ``may`` a
        weak or unreadable key fails; at ``may`` it is logged and the mail goes."""
        key = leaf_key(leaf) if leaf else None
        assert self.tls is not None
        self.tls = replace(self.tls, peer_key=key.kind if key else None)
        problem = "no readable certificate" if key is None else key.weak
        if problem is None:
            return None
        if self.target.level is TlsLevel.MAY:
            log.warning(
                "deliver.tls.weak_key",
                extra={"mx": self.target.mx, "address": self.target.address, "problem": problem},
            )
            return None
        return self.failed(
            451,
            "4.7.5",
            f"TLS peer {self.where}: {problem}",
            "validation-failure" if key is None else "weak-key",
        )

    async def _transaction(self, txn: Transaction) -> SessionOutcome:
        if _UNPRINTABLE.search(txn.mail_from):  # never trust the caller (module docstring)
            reply = SmtpReply(553, "5.1.7", "Bad sender address syntax: control character")
            return Transacted(_all(txn.rcpts, Outcome.BOUNCED, reply), self.tls, self.policy())
        unsafe = SmtpReply(553, "5.1.3", "Bad recipient address syntax: control character")
        decided: dict[str, RecipientResult] = {
            rcpt: RecipientResult(rcpt, Outcome.BOUNCED, unsafe)
            for rcpt in txn.rcpts
            if _UNPRINTABLE.search(rcpt)
        }
        if len(decided) == len(txn.rcpts):
            return Transacted(tuple(decided[r] for r in txn.rcpts), self.tls, self.policy())
        smtp = self.smtp
        options: list[str] = []
        encoding = "ascii"
        if txn.requiretls:
            refused = self._requiretls_refusal()
            if refused is not None:
                return refused
            options.append(requiretls.KEYWORD)
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(txn.content)}")
        if txn.body_8bit and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if txn.smtputf8 and smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
            encoding = "utf-8"
        elif not all(a.isascii() for a in (txn.mail_from, *txn.rcpts)):
            reply = SmtpReply(
                550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.where}"
            )
            return Transacted(_all(txn.rcpts, Outcome.BOUNCED, reply), self.tls, self.policy())

        try:
            mail = _command(b"MAIL FROM:", txn.mail_from, options, encoding)
        except ValueError:  # an address quote_address refuses
            reply = SmtpReply(553, "5.1.7", "Bad sender address syntax")
            return Transacted(_all(txn.rcpts, Outcome.BOUNCED, reply), self.tls, self.policy())
        lines: dict[str, bytes] = {}
        for rcpt in txn.rcpts:
            if rcpt in decided:
                continue
            try:
                lines[rcpt] = _command(b"RCPT TO:", rcpt, (), encoding)
            except ValueError:
                reply = SmtpReply(553, "5.1.3", "Bad recipient address syntax")
                decided[rcpt] = RecipientResult(rcpt, Outcome.BOUNCED, reply)
        if not lines:
            return Transacted(tuple(decided[r] for r in txn.rcpts), self.tls, self.policy())

        if smtp.supports_extension("pipelining"):
            replies = await self._pipelined(mail, tuple(lines.values()), txn)
        else:
            replies = await self._one_by_one(mail, tuple(lines.values()), txn)
        if replies.mail.code != 250:
            said = reply_from(*replies.mail)
            if said.code < 500:
                return self.remote_failure(said, "MAIL FROM")
            return Transacted(_all(txn.rcpts, Outcome.BOUNCED, said), self.tls, self.policy())
        decided.update(_decide(tuple(lines), replies))
        if not any(_accepted(reply) for reply in replies.rcpts):
            # No DATA, or DATA ended on a bare dot: the server's transaction may stay
            # open, and MAIL on this connection would be a nested MAIL (503). QUIT it.
            self.reusable = False
        return Transacted(tuple(decided[r] for r in txn.rcpts), self.tls, self.policy())

    async def _one_by_one(
        self, mail: bytes, rcpts: tuple[bytes, ...], txn: Transaction
    ) -> _Replies:
        """MAIL, each RCPT, DATA and the payload, each after the reply to the one before."""
        smtp = self.smtp
        self.stage = "MAIL FROM"
        replies = _Replies(await smtp.execute_command(mail))
        if replies.mail.code != 250:
            return replies
        self.stage = "RCPT TO"
        for rcpt in rcpts:
            replies.rcpts.append(await smtp.execute_command(rcpt))
        if not any(_accepted(reply) for reply in replies.rcpts):
            return replies
        self.stage = "DATA"
        replies.data = await smtp.execute_command(b"DATA")
        if replies.data.code == 354:
            _expect_no_surplus(smtp)
            with taken_over(smtp) as channel:
                replies.end = await self._payload(channel, txn)
        return replies

    async def _pipelined(self, mail: bytes, rcpts: tuple[bytes, ...], txn: Transaction) -> _Replies:
        """RFC 2920: MAIL, every RCPT and DATA (last: it changes the state) in one write,
        then their replies in order. The payload goes only after ``354``, and only when
        MAIL and a RCPT were accepted; after a ``354`` that must send nothing (every RCPT
        refused: a server need not refuse DATA then), a lone dot ends the empty data, as
        RFC 2920 §3.1 says."""
        smtp = self.smtp
        self.stage = "MAIL FROM"
        _expect_no_surplus(smtp)
        with taken_over(smtp) as channel:
            channel.write(b"".join(line + b"\r\n" for line in (mail, *rcpts, b"DATA")))
            replies = _Replies(await channel.read_reply())
            if replies.mail.code == 421:  # the server closes: no more replies come
                self.reusable = False
                return replies
            self.stage = "RCPT TO"
            for _ in rcpts:
                replies.rcpts.append(await channel.read_reply())
            self.stage = "DATA"
            replies.data = await _last_reply(channel)  # so far: none may follow the 354
            if replies.data.code != 354:
                return replies
            if replies.mail.code == 250 and any(_accepted(r) for r in replies.rcpts):
                replies.end = await self._payload(channel, txn)
            else:
                channel.write(b".\r\n")
                await _last_reply(channel)  # for nothing: no recipient waits on it
        return replies

    async def _payload(self, channel: Channel, txn: Transaction) -> aiosmtplib.SMTPResponse:
        """The DATA payload (``wire.data_payload_parts``) in ``WRITE_CHUNK`` slices as
        the connection takes them (``Channel.write_paced``), then the reply to it."""
        body, end = data_payload_parts(txn.content, crlf_only=txn.crlf_only, dot_free=txn.dot_free)
        await channel.write_paced(body, WRITE_CHUNK)
        channel.write(end)
        return await _last_reply(channel)

    def _requiretls_refusal(self) -> HostFailed | None:
        """RFC 8689 §4.2.1: a REQUIRETLS message goes only to a host that proved its
        certificate and offers REQUIRETLS; else ``5.7.30`` (the agent tries other hosts,
        then bounces). Nothing of the message has been sent; the connection stays sound."""
        why = requiretls.refusal(
            tls=self.tls is not None,
            policy=self.policy(),
            advertised=self.smtp.supports_extension(requiretls.KEYWORD),
        )
        if why is None:
            return None
        log.info(
            "deliver.requiretls.refused",
            extra={"mx": self.target.mx, "address": self.target.address, "why": why},
        )
        reply = SmtpReply(
            550, requiretls.STATUS, f"REQUIRETLS support required: host {self.where}: {why}"
        )
        return replace(self.failed(reply.code, reply.enhanced, reply.text), requiretls=True)


def _local_address(transport: asyncio.BaseTransport | None) -> str:
    """Our IP address on a connected transport ("" when the socket does not say)."""
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        return sockname[0]
    return ""


@dataclass(slots=True)
class _Replies:
    """The server's replies in one transaction, as far as it went: ``data`` is None when
    DATA was not sent, ``end`` when the payload was not (else the reply to its end)."""

    mail: aiosmtplib.SMTPResponse
    rcpts: list[aiosmtplib.SMTPResponse] = field(default_factory=list)
    data: aiosmtplib.SMTPResponse | None = None
    end: aiosmtplib.SMTPResponse | None = None


def _accepted(reply: aiosmtplib.SMTPResponse) -> bool:
    return reply.code in (250, 251)


def _decide(rcpts: tuple[str, ...], replies: _Replies) -> dict[str, RecipientResult]:
    """Each recipient's result, from the replies to its RCPT and to DATA and the payload
    (MAIL was accepted). Pure: the same for pipelined and one-by-one sessions."""
    decided: dict[str, RecipientResult] = {}
    accepted: list[str] = []
    for rcpt, response in zip(rcpts, replies.rcpts, strict=True):
        if _accepted(response):
            accepted.append(rcpt)
            continue
        reply = reply_from(*response)
        # Servers used 552 for "too many recipients"; RFC 5321 §4.5.3.1.10 asks clients
        # to take a 552 to RCPT as temporary.
        permanent = reply.code >= 500 and reply.code != 552
        outcome = Outcome.BOUNCED if permanent else Outcome.DEFERRED
        decided[rcpt] = RecipientResult(rcpt, outcome, reply)
    if accepted:
        final = replies.end if replies.end is not None else replies.data
        assert final is not None  # DATA is sent whenever a RCPT was accepted
        reply = reply_from(*final)
        if replies.end is not None and final.code == 250:
            outcome = Outcome.SENT
        else:
            outcome = Outcome.BOUNCED if final.code >= 500 else Outcome.DEFERRED
        decided.update((rcpt, RecipientResult(rcpt, outcome, reply)) for rcpt in accepted)
    return decided


def _command(verb: bytes, address: str, options: Iterable[str], encoding: str) -> bytes:
    """``MAIL FROM:<address> options`` or ``RCPT TO:<address>``, as aiosmtplib makes it;
    ``ValueError`` for an address ``quote_address`` refuses (control characters were
    refused before, by ``_UNPRINTABLE``)."""
    words = [verb + quote_address(address).encode(encoding)]
    words.extend(option.encode("ascii") for option in options)
    return b" ".join(words)


def _oneline(value: object) -> str:
    return _UNPRINTABLE.sub(" ", str(value)).strip()[:MAX_REPLY_TEXT]
