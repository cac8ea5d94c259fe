"""The SMTP session policy: aiosmtpd hooks that decide each reply, and hand mail to the spool.

``RelayHandler`` answers EHLO (adding PIPELINING and ENHANCEDSTATUSCODES), MAIL, RCPT
and DATA. It never delivers anything: a message that passes every check goes to
``accept`` (store durably, then schedule), and only after that returns does the
client get ``250``.

- RCPT is relay control. A client in ``relay.networks``, or one that authenticated,
  may send anywhere; anyone else only to ``relay.local_domains``, and never through
  sender-specified routing (``user%other@local``, ``@a:b@local``, ``a!b@local``,
  ``"a@b"@local``), which gets ``554 5.7.1``. Broken syntax is ``501 5.1.3`` for all.
  ``RCPT TO:<postmaster>`` (no domain, any case) is accepted from anyone and stored as
  the configured ``postmaster`` (RFC 5321 §4.5.1).
- MAIL after AUTH: the sender must be one the login owns (``senders``: Postfix's
  ``reject_sender_login_mismatch``), else ``553 5.7.1 <addr>: Sender address rejected:
  not owned by user alice``; checked at every MAIL, so after RSET too.
- DATA with a bare CR or LF (outside CRLF) is refused with ``550 5.5.2``: aiosmtpd
  passes them through, and a downstream server that takes ``<LF>.<LF>`` as the end of
  data could be fed a second, smuggled message (SMTP smuggling, CVE-2023-51764).
- Accepted mail gets a Postfix-style ``Received:`` header with the TLS protocol and
  cipher, or ``(no TLS)``, and after AUTH ``(Authenticated sender: alice)``. It carries
  no ``id``: the queue id exists only once the spool has stored the message, and the
  header is part of what it stores.
- REQUIRETLS (RFC 8689): advertised in EHLO on TLS sessions only; ``MAIL FROM:<...>
  REQUIRETLS`` outside TLS gets ``530 5.7.10``; inside, the flag is kept in the sealed
  envelope and delivery honours it (``deliver.agent``).
- ``accept`` raising ``SpoolError`` is ``452 4.3.1``; any other error ``451 4.3.0``.
  The session carries on either way.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiosmtpd.smtp import SMTP, Session, TLSSetupException
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from cryptography import x509

from mta.clock import Clock, SystemClock
from mta.config import Config, IpNetwork, ListenerConfig
from mta.crlf import has_bare_line_ending
from mta.errors import SpoolError
from mta.events import EventSink, MessageReceived
from mta.log import redact
from mta.model import Envelope, QueueId
from mta.receive.addresses import (
    AddressError,
    MailPath,
    is_bare_postmaster,
    is_local,
    parse_path,
    path_argument,
    relay_tricks,
)
from mta.receive.senders import SenderLogins
from mta.reply import (
    S250_RCPT_OK,
    S250_SENDER_OK,
    S451_LOCAL_ERROR,
    S452_TOO_MANY_RCPTS,
    S501_BAD_ADDRESS,
    S501_BAD_SENDER,
    S530_REQUIRETLS_NEEDS_TLS,
    S550_BARE_LINE_ENDING,
    S554_RELAY_DENIED,
    SmtpReply,
)

log = logging.getLogger(__name__)

Accept = Callable[[Envelope, bytes], Awaitable[QueueId]]
"""Store a message durably and schedule it; return its queue id (``SpoolError`` if full)."""


_HELO_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
_EXTRA_EHLO: Final = ("PIPELINING", "ENHANCEDSTATUSCODES")
REQUIRETLS: Final = "REQUIRETLS"  # EHLO keyword and MAIL parameter (RFC 8689 §2)


def client_ip(session: Session) -> str:
    """The peer's IP address as text (IPv4-mapped IPv6 shown as IPv4); ``""`` if unknown."""
    return peer_ip(session.peer)


def peer_ip(peer: object) -> str:
    """The address in a ``peername`` tuple, as ``client_ip`` shows it; ``""`` if none."""
    if not isinstance(peer, tuple) or not peer:
        return ""
    return _shown_ip(str(peer[0]))


@functools.lru_cache(maxsize=4096)
def _shown_ip(host: str) -> str:
    """Parsing an address cost 2-3 % of the relay's loop when done for every command
    (py-spy, 4 KiB reused sessions); a session's few peers repeat, so it is cached."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


@functools.lru_cache(maxsize=4096)
def _in_networks(ip: str, networks: tuple[IpNetwork, ...]) -> bool:
    """Whether ``ip`` (as ``peer_ip`` shows it) is in one of ``networks``; cached by both,
    so a reload that changes the networks asks anew."""
    address = ipaddress.ip_address(ip)
    return any(address in network for network in networks)


def tls_object(server: SMTP, session: Session) -> ssl.SSLObject | ssl.SSLSocket | None:
    """The TLS state of the connection: after STARTTLS, or on an implicit-TLS listener."""
    if session.ssl:
        found = session.ssl.get("ssl_object")
    else:
        transport = server.transport
        found = transport.get_extra_info("ssl_object") if transport is not None else None
    return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None


def client_certificate(tls: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The common name of a verified client certificate (listener ``tls_client_ca``), if any.

    The listener verifies a presented certificate against its CA during the handshake, so
    a non-empty ``getpeercert()`` is a verified one (another relay of ours).
    """
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "(unparseable)"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if dns_names:
        return dns_names[0]
    return str(common[0].value) if common else cert.subject.rfc4514_string() or "(no name)"


def tls_comment(tls: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))`` or ``(no TLS)``."""
    cipher = tls.cipher() if tls is not None else None
    if tls is None or cipher is None:
        return "(no TLS)"
    name, _protocol, bits = cipher
    comment = f"(using {tls.version()} with cipher {name} ({bits}/{bits} bits))"
    client = client_certificate(tls)
    return comment + (f"\n\t(client certificate {client} verified)" if client else "")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date of a second: formatting it for every message took 2 % of the loop
    (py-spy), and messages arrive many per second."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def received_header(
    *,
    helo: str,
    ip: str,
    hostname: str,
    protocol: str,
    tls: str,
    now: float,
    user: str | None = None,
) -> bytes:
    """A ``Received:`` trace field (RFC 5321 §4.4), folded as Postfix folds it.

    Parameters:
        helo: the name the client gave in HELO/EHLO (unsafe characters replaced).
        ip: the client's address; written as an address literal.
        hostname: our name.
        protocol: ``SMTP``, ``ESMTP``, ``ESMTPS``, ``ESMTPA`` or ``ESMTPSA`` (RFC 3848).
        tls: ``tls_comment(...)``.
        now: seconds since the epoch.
        user: the AUTH login, written ``(Authenticated sender: alice)`` as Postfix's
            ``smtpd_sasl_authenticated_header`` does (the name only, never a secret).
    """
    name = safe_comment(helo) if helo else "unknown"
    literal = ""
    if ip:
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
    when = _date(int(now))  # whole seconds, as format_datetime shows them
    lines = [
        f"Received: from {name} ({literal or 'unknown'})",
        f"\t{tls}",
        *([f"\t(Authenticated sender: {safe_comment(user)})"] if user is not None else []),
        f"\tby {hostname} (mta) with {protocol};",
        f"\t{when}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def safe_comment(text: str) -> str:
    """``text`` fit for a header comment or a reply: printable ASCII, no parentheses."""
    return _HELO_UNSAFE.sub("?", text)[:255] or "?"


def login_of(session: Session) -> str | None:
    """The user name the client logged in as (``auth.PasswordFile`` stores it), or None."""
    if not session.authenticated:
        return None
    return session.auth_data if isinstance(session.auth_data, str) else ""


def postmaster_address(configured: str, hostname: str) -> str:
    """Where ``RCPT TO:<postmaster>`` goes: the ``postmaster`` key, else
    ``postmaster@<hostname>`` (an address literal when the host name is an address)."""
    if configured:
        return configured
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        return f"postmaster@{hostname.lower().rstrip('.')}"
    literal = f"IPv6:{address.compressed}" if address.version == 6 else str(address)
    return f"postmaster@[{literal}]"


def sender_not_owned(sender: MailPath, user: str) -> SmtpReply:
    """Postfix's words for ``reject_sender_login_mismatch``."""
    return SmtpReply(
        553,
        "5.7.1",
        f"<{sender.address}>: Sender address rejected: not owned by user {safe_comment(user)}",
    )


def with_protocol(session: Session, tls: bool) -> str:
    """The RFC 3848 ``with`` keyword for this session."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if session.authenticated else "")


_HOOK_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attributes of ``cls`` whose names start with one of ``prefixes``, once per class.

    aiosmtpd finds its command, hook and AUTH methods with ``dir()`` and
    ``inspect.getmembers`` (which reads every attribute, properties included) on the
    protocol and on the handler for every new connection: with a new connection per
    message that was a seventh of the receiving process's time. Those methods are the
    classes'; the ``__dir__`` of ``RelayHandler`` and ``RelaySMTP`` lists only them.
    """
    names = _HOOK_NAMES.get((cls, prefixes))
    if names is None:
        names = _HOOK_NAMES[cls, prefixes] = [n for n in dir(cls) if n.startswith(prefixes)]
    return list(names)


def _listening_on(server: SMTP, listener: ListenerConfig) -> str:
    """``address:port`` the session came in on (the bound port, where ``port = 0``)."""
    transport = getattr(server, "transport", None)
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return f"{listener.address}:{sockname[1]}"
    return f"{listener.address}:{listener.port}"


class RelayEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope, plus what our DATA reader learned of the content."""

    def __init__(self) -> None:
        super().__init__()
        self.dot_free = False  # ``receive.data.DataStream.dot_free``


class RelayHandler:
    """aiosmtpd handler for one listener.

    Parameters:
        config: the whole configuration (relay networks, local domains, limits).
        listener: the listener this handler serves.
        accept: stores a message durably and schedules it; returns its queue id.
        hostname: our name, for the ``Received:`` header.
        clock: wall-clock time for ``Received:`` and the envelope (default: system).
        events: told of every accepted message (``events.MessageReceived``).
    """

    def __init__(
        self,
        config: Config,
        listener: ListenerConfig,
        accept: Accept,
        hostname: str,
        *,
        clock: Clock | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.events = events
        self.accept = accept
        self.hostname = hostname
        self.clock: Clock = clock or SystemClock()
        self.sender_logins = SenderLogins(config.sender_logins)
        self.postmaster = postmaster_address(config.postmaster, hostname)

    def __dir__(self) -> list[str]:
        return hook_names(type(self), ("handle_", "auth_"))  # see hook_names

    # --- hooks (aiosmtpd calls these by name) ---

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Add our extensions; drop an ``AUTH`` line that lists no mechanism.

        ``REQUIRETLS`` only on a TLS session (RFC 8689 §2: after STARTTLS, or on smtps):
        a client must not be told before TLS that its demand could be honoured.
        """
        session.host_name = hostname
        greeting, *extensions = (line[4:] for line in responses)
        keep = [ext for ext in extensions if ext.strip() != "AUTH" and ext not in _EXTRA_EHLO]
        extra = [*_EXTRA_EHLO, *([REQUIRETLS] if tls_object(server, session) else [])]
        keep[-1:-1] = extra  # before the closing HELP
        lines = [greeting, *keep]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        try:
            sender = parse_path(address, allow_null=True)
        except AddressError:
            return str(S501_BAD_SENDER)
        if REQUIRETLS in mail_options and tls_object(server, session) is None:
            # RFC 8689 §2: the option is only valid in a session that is itself TLS.
            log.info("receive.requiretls.no_tls", extra={"client": client_ip(session)})
            return str(S530_REQUIRETLS_NEEDS_TLS)
        user = login_of(session)
        if user is not None and not self.sender_logins.allows(user, sender):
            # Checked at every MAIL, so a second transaction (after RSET) is checked too.
            log.info(
                "receive.sender_login_mismatch",
                extra={
                    "client": client_ip(session),
                    "user": redact(user),
                    "sender": redact(sender.address),
                },
            )
            return str(sender_not_owned(sender, user))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(S250_SENDER_OK)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        # aiosmtpd strips a source route before we see ``address``; the raw argument
        # (kept by server.RelaySMTP) still shows it, and a route is a relay trick.
        raw = getattr(server, "rcpt_argument", None)
        try:
            text = path_argument(raw, "TO:") if isinstance(raw, str) else address
            postmaster = is_bare_postmaster(text)
            path = parse_path(self.postmaster if postmaster else text)
        except AddressError:
            return str(S501_BAD_ADDRESS)
        if len(envelope.rcpt_tos) >= self.config.limits.recipients:
            return str(S452_TOO_MANY_RCPTS)
        # <postmaster> is accepted from anyone (RFC 5321 §4.5.1); it goes to one address
        # of the operator's choosing, so it opens no relay.
        denied = None if postmaster else self._relay_denied(server, session, path)
        if denied:
            log.info(
                "receive.relay_denied",
                extra={"client": client_ip(session), "rcpt": redact(path.address), "why": denied},
            )
            return str(S554_RELAY_DENIED)
        envelope.rcpt_tos.append(path.address)
        envelope.rcpt_options.extend(rcpt_options)
        return str(S250_RCPT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content  # our DATA reader's buffer: see ``receive.data``
        if not isinstance(raw, bytes | bytearray):
            raw = bytes(raw or b"")
        started = time.perf_counter()
        ip = client_ip(session)
        if has_bare_line_ending(raw):
            log.warning("receive.bare_line_ending", extra={"client": ip, "size": len(raw)})
            return str(S550_BARE_LINE_ENDING)
        tls = tls_object(server, session)
        now = self.clock.now()
        header = received_header(
            helo=session.host_name or "",
            ip=ip,
            hostname=self.hostname,
            protocol=with_protocol(session, tls is not None),
            tls=tls_comment(tls),
            now=now,
            user=login_of(session),
        )
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        message = Envelope(
            mail_from=mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            received_at=now,
            client_address=ip,
            helo=session.host_name or "",
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
            requiretls=REQUIRETLS in envelope.mail_options,
            crlf_only=True,  # checked above: a bare CR or LF was refused
            dot_free=isinstance(envelope, RelayEnvelope) and envelope.dot_free,
        )
        content = b"".join((header, raw))  # the one copy of the message made here
        # The body without our header is no longer needed: let it go before the fsync
        # wait instead of holding a second copy of every message in flight.
        envelope.content = envelope.original_content = None
        del raw
        facts: dict[str, Any] = {
            "client": ip,
            "sender": redact(mail_from),
            "rcpts": len(message.rcpt_tos),
            "size": len(content),
            "tls": tls.version() if tls is not None else "none",
        }
        if session.authenticated:
            facts["user"] = redact(login_of(session) or "")
        if message.requiretls:
            facts["requiretls"] = True
        try:
            qid = await self.accept(message, content)
        except SpoolError as err:
            log.error("receive.spool_failed", extra={**facts, "error": type(err).__name__})
            return str(err.reply)
        except Exception:
            log.exception("receive.accept_failed", extra=facts)
            return str(S451_LOCAL_ERROR)
        log.info("receive.accepted", extra={"qid": qid, **facts})
        if self.events is not None:
            self.events(
                MessageReceived(
                    now,
                    qid,
                    _listening_on(server, self.listener),
                    tls.version() if tls is not None else None,
                    bool(session.authenticated),
                    len(content),
                    len(message.rcpt_tos),
                    time.perf_counter() - started,
                )
            )
        return f"250 2.0.0 Ok: queued as {qid}"

    async def handle_exception(self, error: Exception) -> str:
        """Any other error in a hook: log it, answer 451, keep the session."""
        if isinstance(error, TLSSetupException):
            cause = error.__cause__ or error
            reason = getattr(cause, "reason", None) or type(cause).__name__
            log.info("receive.tls_failed", extra={"reason": reason})
        else:
            log.error("receive.session_error", exc_info=error)
        return str(S451_LOCAL_ERROR)

    # --- relay control ---

    def _relay_denied(self, server: SMTP, session: Session, path: MailPath) -> str | None:
        """Why this recipient may not be accepted from this client; None when it may."""
        if session.authenticated or self._trusted_network(session):
            return None
        if client_certificate(tls_object(server, session)) is not None:
            return None  # a relay of ours, proven by its client certificate
        tricks = relay_tricks(path)
        if tricks:
            return ",".join(tricks)
        if not is_local(path.domain, self.config.relay.local_domains):
            return "not-local"
        return None

    def _trusted_network(self, session: Session) -> bool:
        ip = client_ip(session)
        return bool(ip) and _in_networks(ip, self.config.relay.networks)
