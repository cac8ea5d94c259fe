"""One delivery attempt for the recipients of one domain: decide, then try hosts in order.

``policy.resolver.DestinationResolver`` says where the domain's mail may go and what each
host must prove; this module only walks that plan: each candidate host's addresses in
turn, the first session that gets through a mail transaction deciding every recipient.
A host that fails before that (refused, lost, 4xx, TLS not as required, refused by the
policy) only moves us on to the next. A DNS answer that decides by itself (null MX,
no such domain, a failed lookup) ends the attempt without connecting. When every host
fails, all recipients are deferred with the last failure (``451 4.4.1`` for connections,
``451 4.7.5`` with its RFC 8460 reason for TLS): deferral, never a downgrade.

This is also the supervision boundary of STYLE.md A.1: whatever goes wrong inside one
attempt becomes a deferral of this message, logged, and never reaches the scheduler.
One ``deliver.result`` line is logged per attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from mta.config import Config
from mta.deliver import requiretls
from mta.deliver.pool import ConnectionCache
from mta.deliver.session import (
    HostFailed,
    SessionCache,
    SessionOutcome,
    SessionSettings,
    Target,
    Transacted,
    Transaction,
    deliver_session,
)
from mta.deliver.tlsclient import ClientContexts, client_contexts
from mta.errors import MtaError
from mta.log import redact
from mta.model import (
    DeliveryResult,
    Envelope,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    SessionRecord,
)
from mta.policy.dns import DnsTempFail, NoDomain
from mta.policy.resolver import DestinationResolver, DomainPlan, HostPlan
from mta.reply import SmtpReply

log = logging.getLogger(__name__)

MAX_ADDRESSES: Final = 5  # connections per attempt (Postfix's smtp_mx_address_limit)

SessionRunner = Callable[[Target, Transaction], Awaitable[SessionOutcome]]


def _all(
    rcpts: Sequence[str], outcome: Outcome, reply: SmtpReply, reason: str | None = None
) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(rcpt, outcome, reply, reason) for rcpt in rcpts)


def session_settings(config: Config) -> SessionSettings:
    """HELO name and timeouts from ``outbound.*`` (shared with ``mta check --connect``)."""
    return SessionSettings(
        helo=config.outbound.helo_name or config.hostname or None,
        connect_timeout=config.outbound.connect_timeout,
        command_timeout=config.outbound.command_timeout,
    )


class TlsContexts:
    """The client contexts (``tlsclient.ClientContexts``) per client identity: none, and
    each domain policy's certificate.

    All are built here, at start-up: a client certificate that cannot be loaded stops
    the relay with a ``ConfigError``, instead of failing (and being re-read from disk)
    at every delivery to that domain.
    """

    def __init__(self, config: Config) -> None:
        identities = {(None, None)} | {
            (policy.client_cert, policy.client_key)
            for policy in config.domains
            if policy.client_cert is not None
        }
        self._contexts: dict[tuple[Path | None, Path | None], ClientContexts] = {
            identity: client_contexts(*identity) for identity in identities
        }

    def for_target(self, target: Target) -> ClientContexts:
        return self._contexts[target.client_cert, target.client_key]


def targets(plan: DomainPlan, host: HostPlan, *, tls_required_no: bool = False) -> list[Target]:
    """The connections to make for one host (shared with ``mta check --connect``).
    ``tls_required_no``: the message's ``TLS-Required: No`` is honoured (``Target``)."""
    assert host.requirement is not None
    local = plan.policy.local
    return [
        Target(
            address,
            plan.port,
            host.host,
            host.requirement,
            local.client_cert if local else None,
            local.client_key if local else None,
            tls_required_no,
        )
        for address in host.addresses
    ]


def refusal_failure(host: HostPlan) -> HostFailed:
    """A host the policy will not send to, as a host failure (defer, with the reason)."""
    assert host.refusal is not None
    reply = SmtpReply(451, "4.7.5", f"{host.host}: {host.refusal}")
    return HostFailed(reply, host.refusal.reason)


class DeliveryAgent:
    """Delivers one domain's recipients of one message per call.

    Parameters:
        config: the relay configuration (``outbound.*``).
        destinations: the policy decisions (``policy.resolver.DestinationResolver``).
        session: runs one SMTP session (default: ``session.deliver_session``); tests
            inject a fake to drive the host iteration without sockets.
    """

    def __init__(
        self,
        config: Config,
        destinations: DestinationResolver,
        *,
        session: SessionRunner | None = None,
    ) -> None:
        self._destinations = destinations
        self._settings = session_settings(config)
        self._contexts = TlsContexts(config)
        self._connections: SessionCache = ConnectionCache()
        self._session: SessionRunner = session or self._smtp_session
        self._honour_tls_required_no = config.outbound.honour_tls_required_no

    async def close(self) -> None:
        """Close the idle cached connections (shutdown)."""
        await self._connections.close()

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
        txn = Transaction(
            envelope.mail_from,
            rcpts,
            content,
            envelope.smtputf8,
            envelope.body_8bit,
            envelope.requiretls,
            envelope.crlf_only,
            envelope.dot_free,
        )
        # RFC 8689 §4.1: with REQUIRETLS on MAIL FROM the header is ignored.
        relaxed = (
            self._honour_tls_required_no
            and not envelope.requiretls
            and requiretls.tls_required_no(content)
        )
        policy = "-"
        try:
            plan = await self._destinations.domain(domain)
            policy = f"{plan.policy.source.value}/{plan.policy.level.label}"
            result = await self._attempt(qid, plan, txn, relaxed)
        except MtaError as err:
            log.warning("deliver.failed", extra={"qid": qid, "domain": domain, "error": str(err)})
            reply = SmtpReply(err.reply.code, err.reply.enhanced, str(err) or err.reply.text)
            reason = getattr(err, "reason", None)
            result = DeliveryResult(domain, _all(rcpts, Outcome.DEFERRED, reply, reason))
        except Exception:  # the supervision boundary (module docstring)
            log.exception("deliver.error", extra={"qid": qid, "domain": domain})
            reply = SmtpReply(451, "4.3.0", "Local error in processing")
            result = DeliveryResult(domain, _all(rcpts, Outcome.DEFERRED, reply))
        _log_result(qid, policy, result)
        return result

    async def _smtp_session(self, target: Target, txn: Transaction) -> SessionOutcome:
        context = self._contexts.for_target(target)
        return await deliver_session(target, txn, self._settings, context, self._connections)

    async def _attempt(
        self, qid: QueueId, plan: DomainPlan, txn: Transaction, relaxed: bool = False
    ) -> DeliveryResult:
        domain = plan.domain
        sessions = _refused_by_sts(plan)
        if plan.terminal is not None:
            end = plan.terminal
            results = _all(txn.rcpts, end.outcome, end.reply, end.reason)
            return DeliveryResult(domain, results, sessions=tuple(sessions))

        last: HostFailed | None = None
        last_host: str | None = None
        last_address: str | None = None
        dns_failure: DnsTempFail | NoDomain | None = None
        temporary = False  # some host failed for a reason other than REQUIRETLS
        tried = 0
        for name in plan.hosts:
            if tried >= MAX_ADDRESSES:
                break
            host = await self._destinations.host(plan, name)
            if host.dns_failure is not None:
                temporary = True
                if not isinstance(dns_failure, DnsTempFail):
                    dns_failure = host.dns_failure
                continue
            if host.refusal is not None:
                temporary = True
                last, last_host, last_address = refusal_failure(host), name, None
                sessions.append(SessionRecord(name, "", last.reply, last.reason))
                _log_host_failure(qid, domain, name, "-", last)
                continue
            for target in targets(plan, host, tls_required_no=relaxed)[: MAX_ADDRESSES - tried]:
                tried += 1
                outcome = await self._session(target, txn)
                sessions.append(_session_record(name, target.address, outcome))
                if isinstance(outcome, Transacted):
                    return DeliveryResult(
                        domain,
                        outcome.results,
                        name,
                        outcome.tls,
                        target.address,
                        outcome.policy,
                        tuple(sessions),
                    )
                temporary = temporary or not outcome.requiretls
                last, last_host, last_address = outcome, name, target.address
                _log_host_failure(qid, domain, name, target.address, outcome)

        if last is not None:
            # RFC 8689 §4.2.1: no MX host can take a REQUIRETLS message: a non-delivery
            # report (5.7.30), never a downgrade. While some host failed for another
            # reason (it may yet prove itself), the message waits instead.
            bounce = last.requiretls and not temporary
            reply = last.reply
            if last.requiretls and not bounce:
                reply = SmtpReply(451, "4.7.30", reply.text)
            decided = Outcome.BOUNCED if bounce else Outcome.DEFERRED
            results = _all(txn.rcpts, decided, reply, last.reason)
            return DeliveryResult(
                domain, results, last_host, last.tls, last_address, last.policy, tuple(sessions)
            )
        if isinstance(dns_failure, NoDomain):
            reply = SmtpReply(550, "5.4.4", f"Host or domain name not found: {dns_failure.reason}")
            return DeliveryResult(domain, _all(txn.rcpts, Outcome.BOUNCED, reply))
        detail = dns_failure.reason if dns_failure is not None else f"no host for {plan.nexthop}"
        reply = SmtpReply(451, "4.4.3", f"Host or domain name lookup failed: {detail}")
        return DeliveryResult(domain, _all(txn.rcpts, Outcome.DEFERRED, reply))


def _refused_by_sts(plan: DomainPlan) -> list[SessionRecord]:
    """MX hosts outside the MTA-STS ``enforce`` policy: each a failed session that never
    connected (``validation-failure``), as TLS-RPT reports them."""
    sts = plan.policy.sts
    if not plan.refused or sts is None:
        return []
    policy = HostPolicy(
        PolicySource.MTA_STS,
        plan.policy.level,
        "pkix",
        policy_strings=sts.lines(),
        mx_patterns=sts.mx,
    )
    return [
        SessionRecord(
            host,
            "",
            SmtpReply(451, "4.7.5", f"MX host {host} is not in the MTA-STS policy"),
            "validation-failure",
            policy=policy,
        )
        for host in plan.refused
    ]


def _session_record(mx: str, address: str, outcome: SessionOutcome) -> SessionRecord:
    if isinstance(outcome, Transacted):
        reply = outcome.results[0].reply if outcome.results else SmtpReply(250, "2.0.0", "")
        return SessionRecord(
            mx, address, reply, None, outcome.tls, outcome.policy, outcome.local_address
        )
    return SessionRecord(
        mx,
        address,
        outcome.reply,
        outcome.reason,
        outcome.tls,
        outcome.policy,
        outcome.local_address,
    )


def _log_host_failure(qid: QueueId, domain: str, mx: str, address: str, failed: HostFailed) -> None:
    log.info(
        "deliver.host.failed",
        extra={
            "qid": qid,
            "domain": domain,
            "mx": mx,
            "address": address,
            "reply": f"{failed.reply.code} {failed.reply.enhanced}",
            "reason": failed.reason or "-",
        },
    )


def _log_result(qid: QueueId, domain_policy: str, result: DeliveryResult) -> None:
    """One line per attempt. ``policy`` and ``verified`` are those of the host that got
    (or failed) the mail (``DeliveryResult.policy``), else the domain's decision."""
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
            "address": result.address or "-",
            "policy": result.policy.label if result.policy else domain_policy,
            "tls": result.tls.version if result.tls else "none",
            "cipher": result.tls.cipher if result.tls else "-",
            "key": (result.tls.peer_key if result.tls else None) or "-",
            "verified": result.policy.auth.value if result.policy else PeerAuth.NONE.value,
            "sent": counts[Outcome.SENT],
            "deferred": counts[Outcome.DEFERRED],
            "bounced": counts[Outcome.BOUNCED],
            "reply": f"{decisive.reply.code} {decisive.reply.enhanced}" if decisive else "-",
            "reason": (decisive.reason if decisive else None) or "-",
            "rcpt": redact(unsent.rcpt) if unsent else "-",
        },
    )
