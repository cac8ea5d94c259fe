"""One delivery attempt for the recipients of one domain: route, look up, try hosts in order.

Where mail goes: a configured route (``config.route_for``) names a next hop, looked up
by MX unless it is ``[host]`` or an IP; otherwise the recipient domain's MX hosts, lowest
preference first (``policy.mx``), on ``outbound.port``. Each host's addresses (A, then
AAAA) are tried in turn; the first session that gets through a mail transaction decides
every recipient. A host that fails before that (refused, lost, 4xx, TLS not as
required) only moves us on to the next address.

The DNS answer decides when no session does (Postfix's replies): a null MX bounces with
``556 5.1.10``, a name that does not exist (or has no address) with ``550 5.4.4``; a
DNS timeout or SERVFAIL defers with ``451 4.4.3``. When every address fails, all
recipients are deferred with the last failure (``451 4.4.1`` for connections, ``451
4.7.5`` with its RFC 8460 reason for TLS).

This is also the supervision boundary of STYLE.md A.1: whatever goes wrong inside one
attempt becomes a deferral of this message, logged, and never reaches the scheduler.
One ``deliver.result`` line is logged per attempt.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

from mta.config import Config
from mta.deliver.session import (
    HostFailed,
    SessionOutcome,
    SessionSettings,
    Target,
    Transacted,
    Transaction,
    deliver_session,
)
from mta.deliver.tlsclient import client_context, secure_host_ok
from mta.errors import MtaError
from mta.log import redact
from mta.model import DeliveryResult, Envelope, Outcome, QueueId, RecipientResult, TlsLevel
from mta.policy.dns import AddressesFound, AddressLookup, DnsTempFail, MxLookup, NoDomain, NullMx
from mta.policy.mx import hosts_for
from mta.reply import SmtpReply

log = logging.getLogger(__name__)

MAX_MX_HOSTS: Final = 10  # MX hosts looked up per attempt
MAX_ADDRESSES: Final = 5  # connections per attempt (Postfix's smtp_mx_address_limit)

SessionRunner = Callable[[Target, Transaction], Awaitable[SessionOutcome]]


class DnsLookup(Protocol):
    """What the agent needs from DNS (``mta.policy.dns.DnsClient``; fakes in tests)."""

    async def mx(self, domain: str) -> MxLookup: ...

    async def addresses(self, host: str) -> AddressLookup: ...


def _all(
    rcpts: Sequence[str], outcome: Outcome, reply: SmtpReply, reason: str | None = None
) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(rcpt, outcome, reply, reason) for rcpt in rcpts)


class DeliveryAgent:
    """Delivers one domain's recipients of one message per call.

    Parameters:
        config: the relay configuration (routes, ``outbound.*``, ``tls.ca_file``).
        dns: MX and address lookups.
        rand: shuffles MX hosts of equal preference.
        session: runs one SMTP session (default: ``session.deliver_session``); tests
            inject a fake to drive the host iteration without sockets.
    """

    def __init__(
        self,
        config: Config,
        dns: DnsLookup,
        rand: random.Random,
        *,
        session: SessionRunner | None = None,
    ) -> None:
        self._config = config
        self._dns = dns
        self._rand = rand
        self._settings = SessionSettings(
            helo=config.outbound.helo_name or config.hostname or None,
            connect_timeout=config.outbound.connect_timeout,
            command_timeout=config.outbound.command_timeout,
        )
        self._contexts: dict[TlsLevel, ssl.SSLContext] = {}
        self._session: SessionRunner = session or self._smtp_session

    async def deliver(
        self,
        qid: QueueId,
        envelope: Envelope,
        domain: str,
        rcpts: Sequence[str],
        content: bytes,
    ) -> DeliveryResult:
        """One attempt to deliver ``content`` to ``rcpts`` (all in ``domain``).

        Never raises for a per-message problem: every recipient gets a result.
        """
        rcpts = tuple(rcpts)
        level = self._config.outbound.default_level
        txn = Transaction(envelope.mail_from, rcpts, content, envelope.smtputf8, envelope.body_8bit)
        try:
            result = await self._attempt(qid, domain, level, txn)
        except MtaError as err:
            log.warning("deliver.failed", extra={"qid": qid, "domain": domain, "error": str(err)})
            reply = SmtpReply(err.reply.code, err.reply.enhanced, str(err) or err.reply.text)
            reason = getattr(err, "reason", None)
            result = DeliveryResult(domain, _all(rcpts, Outcome.DEFERRED, reply, reason))
        except Exception:  # the supervision boundary (module docstring)
            log.exception("deliver.error", extra={"qid": qid, "domain": domain})
            reply = SmtpReply(451, "4.3.0", "Local error in processing")
            result = DeliveryResult(domain, _all(rcpts, Outcome.DEFERRED, reply))
        _log_result(qid, level, result)
        return result

    def _context(self, level: TlsLevel) -> ssl.SSLContext:
        context = self._contexts.get(level)
        if context is None:
            context = client_context(level, self._config.tls.ca_file)
            self._contexts[level] = context
        return context

    async def _smtp_session(self, target: Target, txn: Transaction) -> SessionOutcome:
        return await deliver_session(target, txn, self._settings, self._context(target.level))

    async def _attempt(
        self, qid: QueueId, domain: str, level: TlsLevel, txn: Transaction
    ) -> DeliveryResult:
        self._context(level)  # a level we cannot enforce defers before any connection
        route = self._config.route_for(domain)
        port = self._config.outbound.port
        nexthop, mx_lookup = domain, True
        if route is not None:
            nexthop, mx_lookup = route.nexthop.host, route.nexthop.mx_lookup
            port = route.nexthop.port or port

        if mx_lookup:
            found = await self._dns.mx(nexthop)
            if isinstance(found, NullMx):
                reply = SmtpReply(556, "5.1.10", f"Domain {nexthop} does not accept mail (null MX)")
                return DeliveryResult(domain, _all(txn.rcpts, Outcome.BOUNCED, reply))
            if isinstance(found, NoDomain):
                reply = SmtpReply(550, "5.4.4", f"Host or domain name not found: {found.reason}")
                return DeliveryResult(domain, _all(txn.rcpts, Outcome.BOUNCED, reply))
            if isinstance(found, DnsTempFail):
                reply = SmtpReply(
                    451, "4.4.3", f"Host or domain name lookup failed: {found.reason}"
                )
                return DeliveryResult(domain, _all(txn.rcpts, Outcome.DEFERRED, reply))
            hosts = hosts_for(nexthop, found.records, self._rand)
        else:
            hosts = [nexthop]

        last: HostFailed | None = None
        last_host: str | None = None
        dns_failure: DnsTempFail | NoDomain | None = None
        tried = 0
        for host in hosts[:MAX_MX_HOSTS]:
            if tried >= MAX_ADDRESSES:
                break
            if level is TlsLevel.SECURE and not secure_host_ok(host, nexthop):
                last, last_host = (
                    HostFailed(
                        SmtpReply(
                            451,
                            "4.7.5",
                            f"MX host {host} is not {nexthop} or within it (level secure)",
                        ),
                        "certificate-host-mismatch",
                    ),
                    host,
                )
                continue
            addresses = AddressesFound((host,)) if _is_ip(host) else await self._dns.addresses(host)
            if isinstance(addresses, NoDomain | DnsTempFail):
                if not isinstance(dns_failure, DnsTempFail):
                    dns_failure = addresses
                continue
            for address in addresses.addresses[: MAX_ADDRESSES - tried]:
                tried += 1
                outcome = await self._session(Target(address, port, host, level), txn)
                if isinstance(outcome, Transacted):
                    return DeliveryResult(domain, outcome.results, mx=host, tls=outcome.tls)
                last, last_host = outcome, host
                log.info(
                    "deliver.host.failed",
                    extra={
                        "qid": qid,
                        "domain": domain,
                        "mx": host,
                        "address": address,
                        "reply": f"{outcome.reply.code} {outcome.reply.enhanced}",
                        "reason": outcome.reason or "-",
                    },
                )

        if last is not None:
            results = _all(txn.rcpts, Outcome.DEFERRED, last.reply, last.reason)
            return DeliveryResult(domain, results, mx=last_host, tls=last.tls)
        if isinstance(dns_failure, NoDomain):
            reply = SmtpReply(550, "5.4.4", f"Host or domain name not found: {dns_failure.reason}")
            return DeliveryResult(domain, _all(txn.rcpts, Outcome.BOUNCED, reply))
        detail = dns_failure.reason if dns_failure is not None else f"no host for {nexthop}"
        reply = SmtpReply(451, "4.4.3", f"Host or domain name lookup failed: {detail}")
        return DeliveryResult(domain, _all(txn.rcpts, Outcome.DEFERRED, reply))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _log_result(qid: QueueId, level: TlsLevel, result: DeliveryResult) -> None:
    counts = dict.fromkeys(Outcome, 0)
    for rcpt in result.results:
        counts[rcpt.outcome] += 1
    unsent = next((r for r in result.results if r.outcome is not Outcome.SENT), None)
    decisive = unsent or (result.results[0] if result.results else None)
    log.info(
        "deliver.result",
        extra={
            "qid": qid,
            "domain": result.domain,
            "mx": result.mx or "-",
            "level": level.label,
            "tls": result.tls.version if result.tls else "none",
            "cipher": result.tls.cipher if result.tls else "-",
            "sent": counts[Outcome.SENT],
            "deferred": counts[Outcome.DEFERRED],
            "bounced": counts[Outcome.BOUNCED],
            "reply": f"{decisive.reply.code} {decisive.reply.enhanced}" if decisive else "-",
            "reason": (decisive.reason if decisive else None) or "-",
            "rcpt": redact(unsent.rcpt) if unsent else "-",
        },
    )
