"""Where a domain's mail may go and what each host must prove: one decision for delivery and
for ``mta check``.

``DestinationResolver.domain`` gathers the facts for a recipient domain — its local
policy, MTA-STS policy, next hop and MX hosts (with their DNSSEC status) — and decides
the domain-level policy (``decide.decide_domain``). ``DestinationResolver.host`` looks up
one candidate host's addresses and TLSA records and decides what that host must prove
(``decide.decide_host``). The delivery agent walks the hosts in order and stops at the
first that takes the mail; ``mta check`` walks them all and reports. Neither decides
anything itself, so the two cannot disagree.

While the resolver fails the DNSSEC probe (``dnssec``), no AD bit means anything: TLSA
is then looked up as published, whatever the DNSSEC status of the chain, and a host
that publishes usable records is refused (``dnssec-invalid``: it looks like a DANE host,
and its records cannot be told from forged ones); one that publishes none is marked
``UNVERIFIABLE`` (``decide`` refuses it for ``dane``/``dane-only`` local entries and
says so in every other requirement's ``why``).

DNS answers that end the attempt (null MX, a domain that does not exist, a lookup that
failed) become a ``Terminal``; a host that must not get mail (bogus TLSA, not in the
MTA-STS policy) carries its ``refusal`` instead of a requirement.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

from mta.config import Config, is_ip
from mta.errors import TlsPolicyFailure
from mta.model import Outcome
from mta.policy.decide import (
    HostRequirement,
    StsFacts,
    TlsaFacts,
    TlsaStatus,
    TransportPolicy,
    decide_domain,
    decide_host,
)
from mta.policy.dns import (
    AddressesFound,
    AddressLookup,
    DnsTempFail,
    MxLookup,
    NoDomain,
    NullMx,
)
from mta.policy.dnssec import DnssecStatus
from mta.policy.local import DomainPolicy, Nexthop, find_policy
from mta.policy.mx import hosts_for
from mta.policy.verify import TrustStore
from mta.reply import SmtpReply

log = logging.getLogger(__name__)

MAX_MX_HOSTS: Final = 10  # MX hosts considered per domain


class DnsLookup(Protocol):
    """What the resolver needs from DNS (``mta.policy.dns.DnsClient``; fakes in tests)."""

    async def mx(self, domain: str) -> MxLookup: ...

    async def addresses(self, host: str) -> AddressLookup: ...

    async def tlsa_for_host(
        self,
        host: str,
        port: int = 25,
        *,
        addresses: AddressLookup | None = None,
        unverified: bool = False,
    ) -> TlsaFacts: ...


class DnssecHealth(Protocol):
    """Whether the resolver validates (``mta.policy.dnssec_probe.DnssecProbe``)."""

    async def current(self) -> DnssecStatus: ...


class StsLookup(Protocol):
    """What the resolver needs from MTA-STS (``mta.policy.sts_cache.StsResolver``)."""

    async def facts(self, domain: str) -> StsFacts: ...


@dataclass(frozen=True, slots=True)
class Terminal:
    """A DNS answer that decides every recipient of the domain without connecting."""

    outcome: Outcome
    reply: SmtpReply
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DomainPlan:
    """The domain-level decision and the ordered candidate hosts."""

    domain: str
    policy: TransportPolicy
    sts: StsFacts
    nexthop: str
    port: int
    mx_lookup: bool
    mx_secure: bool = False
    hosts: tuple[str, ...] = ()  # candidates, in the order to try them
    refused: tuple[str, ...] = ()  # MX hosts the MTA-STS policy does not allow
    terminal: Terminal | None = None


@dataclass(frozen=True, slots=True)
class HostPlan:
    """One candidate host: where it is, its TLSA facts, and what it must prove (or why not)."""

    host: str
    addresses: tuple[str, ...] = ()
    tlsa: TlsaFacts = field(default_factory=lambda: TlsaFacts(TlsaStatus.NOT_LOOKED_UP))
    requirement: HostRequirement | None = None
    refusal: TlsPolicyFailure | None = None
    dns_failure: NoDomain | DnsTempFail | None = None


class DestinationResolver:
    """Decides, for a recipient domain and then for each of its hosts, what delivery requires.

    Parameters:
        config: routes, domain policies, ``outbound.*``, ``dane.enabled``.
        dns: MX, address and TLSA lookups (DNSSEC status from the AD bit).
        sts: MTA-STS facts (``None`` when MTA-STS is disabled).
        trust: the PKIX trust store (system store plus ``tls.ca_file``).
        domain_trust: per-domain-policy trust stores (a policy's own ``ca_file``).
        dane_trusted: whether the resolver's AD bit may be trusted (loopback or marked).
        rand: orders MX hosts of equal preference.
        dnssec: the DNSSEC probe's status; ``None``: not probed (the AD bit is believed).
    """

    def __init__(
        self,
        config: Config,
        dns: DnsLookup,
        sts: StsLookup | None,
        trust: TrustStore | None,
        *,
        domain_trust: dict[str, TrustStore] | None = None,
        dane_trusted: bool,
        rand: random.Random,
        dnssec: DnssecHealth | None = None,
    ) -> None:
        self._config = config
        self._dns = dns
        self._sts = sts
        self._trust = trust
        self._domain_trust = domain_trust or {}
        self._dane = config.dane.enabled and dane_trusted
        self._rand = rand
        self._dnssec = dnssec

    @property
    def dane(self) -> bool:
        """Whether DANE is used at all (enabled, and the resolver's AD bit trusted)."""
        return self._dane

    async def dnssec_status(self) -> DnssecStatus:
        """The DNSSEC probe's status (after the first probe), for decisions and reports."""
        if self._dnssec is None:
            return DnssecStatus()
        return await self._dnssec.current()

    async def sts_facts(self, domain: str) -> StsFacts:
        if self._sts is None:
            return StsFacts(None, state="disabled")
        return await self._sts.facts(domain)

    async def domain(self, domain: str) -> DomainPlan:
        """The policy for ``domain`` and the hosts to try, or the ``Terminal`` that ends it."""
        local = find_policy(self._config.domains, domain)
        nexthop, port, mx_lookup = self._nexthop(domain, local)
        # A local policy outranks MTA-STS, so its lookup would change nothing; a fixed next
        # hop ([host] or an IP, a smarthost) never uses the domain's MX hosts that MTA-STS
        # speaks about; a routed MX lookup takes the next-hop domain's policy.
        if local is not None or not mx_lookup:
            sts = StsFacts(None, state="not-consulted")
        else:
            sts = await self.sts_facts(nexthop)
        policy = decide_domain(domain, local, sts, self._config.outbound.default_level)
        plan = DomainPlan(domain, policy, sts, nexthop, port, mx_lookup)
        if not mx_lookup:
            return replace(plan, hosts=(nexthop,))
        found = await self._dns.mx(nexthop)
        if isinstance(found, NullMx):
            reply = SmtpReply(556, "5.1.10", f"Domain {nexthop} does not accept mail (null MX)")
            return replace(plan, terminal=Terminal(Outcome.BOUNCED, reply))
        if isinstance(found, NoDomain):
            reply = SmtpReply(550, "5.4.4", f"Host or domain name not found: {found.reason}")
            return replace(plan, terminal=Terminal(Outcome.BOUNCED, reply))
        if isinstance(found, DnsTempFail):
            reply = SmtpReply(451, "4.4.3", f"Host or domain name lookup failed: {found.reason}")
            # A failure answer may be DNSSEC refusing a forged one (RFC 8460's
            # dnssec-invalid); a lookup that only timed out is no evidence of that.
            reason = None if found.timed_out else "dnssec-invalid"
            return replace(plan, terminal=Terminal(Outcome.DEFERRED, reply, reason))
        hosts = hosts_for(nexthop, found.records, self._rand)[:MAX_MX_HOSTS]
        allowed, refused = policy.candidates(hosts)
        plan = replace(plan, mx_secure=found.secure, hosts=tuple(allowed), refused=tuple(refused))
        if not allowed:
            reply = SmtpReply(
                451, "4.7.5", f"no MX host of {nexthop} matches its MTA-STS policy (RFC 8461)"
            )
            return replace(plan, terminal=Terminal(Outcome.DEFERRED, reply, "validation-failure"))
        return plan

    def _nexthop(self, domain: str, local: DomainPolicy | None) -> tuple[str, int, bool]:
        """(host, port, MX lookup?): a domain policy's nexthop, else a route, else the domain."""
        hop: Nexthop | None = local.nexthop if local else None
        if hop is None:
            route = self._config.route_for(domain)
            hop = route.nexthop if route else None
        port = self._config.outbound.port
        if hop is None:
            return domain, port, True
        return hop.host, hop.port or port, hop.mx_lookup

    async def host(self, plan: DomainPlan, host: str) -> HostPlan:
        """Addresses, TLSA facts and the requirement for one candidate host."""
        if is_ip(host):
            addresses: AddressLookup = AddressesFound((host,))
        else:
            addresses = await self._dns.addresses(host)
        if isinstance(addresses, NoDomain | DnsTempFail):
            return HostPlan(host, dns_failure=addresses)
        tlsa = await self._tlsa(plan, host, addresses)
        trust = self._trust
        if plan.policy.local is not None:
            trust = self._domain_trust.get(plan.policy.local.name, trust)
        try:
            requirement = decide_host(plan.policy, host, tlsa, trust=trust)
        except TlsPolicyFailure as refusal:
            return HostPlan(host, addresses.addresses, tlsa, refusal=refusal)
        return HostPlan(host, addresses.addresses, tlsa, requirement)

    async def _tlsa(self, plan: DomainPlan, host: str, addresses: AddressesFound) -> TlsaFacts:
        """RFC 7672 §2.2: DANE only over a DNSSEC-secure chain from the domain to the host."""
        if not self._dane or is_ip(host):
            return TlsaFacts(TlsaStatus.NOT_LOOKED_UP, detail="DANE disabled or not trusted")
        dnssec = await self.dnssec_status()
        if not dnssec.ok:
            return await self._tlsa_unverifiable(plan, host, addresses, dnssec)
        if plan.mx_lookup and not plan.mx_secure:
            return TlsaFacts(TlsaStatus.INSECURE, detail=f"MX RRset of {plan.nexthop} is insecure")
        return await self._dns.tlsa_for_host(host, plan.port, addresses=addresses)

    async def _tlsa_unverifiable(
        self, plan: DomainPlan, host: str, addresses: AddressesFound, dnssec: DnssecStatus
    ) -> TlsaFacts:
        """The resolver fails the DNSSEC probe: what ``host`` publishes decides (see above)."""
        why = f"DNSSEC unverifiable: resolver {dnssec.resolver} fails the probe {dnssec.probe}"
        facts = await self._dns.tlsa_for_host(host, plan.port, addresses=addresses, unverified=True)
        if facts.status is TlsaStatus.USABLE:
            detail = f"{facts.name} publishes usable TLSA records, but {why}"
            return replace(facts, status=TlsaStatus.FAILED, records=(), detail=detail)
        if facts.status in (TlsaStatus.ABSENT, TlsaStatus.INSECURE):
            return replace(facts, status=TlsaStatus.UNVERIFIABLE, detail=why)
        return facts  # FAILED (no answer either way), UNUSABLE (TLS is mandatory anyway)
