"""Destination policy precedence: what each MX host of a domain must prove, and why.

Pure: no I/O. The resolver gathers the facts (local policy entry, MTA-STS facts, TLSA
facts per host); this module is the one place that weighs them, so delivery and
``mta check`` cannot disagree. Precedence, first that applies wins (DESIGN.md):

1. a local policy file entry for the domain: its level, fingerprints and trust anchors;
   TLSA facts matter only at its levels ``dane`` and ``dane-only``;
2. DANE, per host: a DNSSEC-secure TLSA RRset with usable records (RFC 7672) — it beats
   MTA-STS (RFC 8461 §2: an MTA-STS result never overrides a failing DANE validation);
3. MTA-STS ``enforce``: only MX hosts matching the policy's ``mx`` patterns, each with a
   PKIX-valid certificate for its own name (RFC 8461 §4) — level ``verify``, or ``secure``
   when that is the default;
4. MTA-STS ``testing``: the default level, with the MTA-STS check reported, not enforced;
5. ``outbound.default_level``.

Nothing here lowers a level because a lookup failed, nor because DNSSEC is unverifiable
(the resolver fails the DNSSEC probe, ``mta.policy.dnssec``): then ``dane`` and
``dane-only`` local entries are refused (``dnssec-invalid``), a host that publishes
usable TLSA records is refused like a failed lookup (the resolver reports them as
``FAILED``), and a host that publishes none gets the rule below DANE, its ``why`` saying
that DANE was not checked. A TLSA lookup that failed (SERVFAIL,
bogus, timeout) refuses the host (``dnssec-invalid``) wherever TLSA could matter, and so do
``dane-only`` without usable TLSA (``dane-required``) and, under MTA-STS ``enforce``, a
host outside the policy's ``mx`` patterns (``validation-failure``) — checked for every
host, DANE or not, since the policy says which hosts may receive the domain's mail.
A secure TLSA RRset without usable records makes TLS mandatory (RFC 7672 §2.2): level
``encrypt`` with source DANE, unless the next rule already asks for more.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mta.errors import TlsPolicyFailure
from mta.model import PolicySource, TlsLevel  # PolicySource: re-exported
from mta.policy.dane import TlsaRecord
from mta.policy.local import DomainPolicy
from mta.policy.mta_sts import StsMode, StsPolicy
from mta.policy.mx import normalise_host
from mta.policy.verify import PeerCheck, TrustStore

__all__ = [
    "HostRequirement",
    "PolicySource",
    "StsFacts",
    "TlsaFacts",
    "TlsaStatus",
    "TransportPolicy",
    "decide_domain",
    "decide_host",
]


@dataclass(frozen=True, slots=True)
class StsFacts:
    """What the MTA-STS resolver knows about a domain right now."""

    policy: StsPolicy | None  # the policy in force (fresh or cached); None = no policy
    policy_id: str | None = None
    state: str = "none"  # "fresh" | "cached" | "none" | "fetch-error" | "invalid" | "disabled"
    error: str | None = None  # RFC 8460 reason when the last fetch failed


@dataclass(frozen=True, slots=True)
class TransportPolicy:
    """The domain-level decision, before any per-host DANE facts."""

    domain: str
    level: TlsLevel
    source: PolicySource  # LOCAL, MTA_STS, MTA_STS_TESTING or DEFAULT (DANE is per host)
    why: str
    local: DomainPolicy | None = None
    sts: StsPolicy | None = None  # the MTA-STS policy that decided (enforce or testing)

    def candidates(self, hosts: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(allowed, refused)``: under MTA-STS ``enforce`` only hosts matching ``mx``."""
        if self.source is not PolicySource.MTA_STS or self.sts is None:
            return list(hosts), []
        allowed = [host for host in hosts if self.sts.allows(host)]
        refused = [host for host in hosts if not self.sts.allows(host)]
        return allowed, refused


class TlsaStatus(enum.Enum):
    """The DNSSEC outcome of a host's TLSA lookup (RFC 7672 §2.2)."""

    USABLE = "usable"  # DNSSEC-secure RRset with >= 1 usable record
    UNUSABLE = "unusable"  # secure RRset, no usable record -> TLS mandatory, unauthenticated
    ABSENT = "absent"  # secure denial (NXDOMAIN/NODATA with AD)
    INSECURE = "insecure"  # no DNSSEC (or MX/host chain insecure): not DANE
    FAILED = "failed"  # SERVFAIL / bogus / timeout -> defer this host
    NOT_LOOKED_UP = "not-looked-up"  # DANE disabled or resolver not trusted
    UNVERIFIABLE = "unverifiable"  # the resolver fails the DNSSEC probe; no TLSA published


@dataclass(frozen=True, slots=True)
class TlsaFacts:
    """A host's TLSA lookup: its status and the usable records."""

    status: TlsaStatus
    records: tuple[TlsaRecord, ...] = ()  # usable ones
    base: str = ""  # TLSA base domain (the expanded CNAME target or the host)
    detail: str = ""
    name: str = ""  # the RRset's owner, _<port>._tcp.<base> (when an RRset was found)


@dataclass(frozen=True, slots=True)
class HostRequirement:
    """What one MX host must prove before it gets mail."""

    host: str
    level: TlsLevel  # effective level for this host
    source: PolicySource
    check: PeerCheck
    sni: str  # server_name for the handshake: TLSA base domain under DANE, else host
    report_only: bool = False  # MTA-STS testing: a failed check is logged, mail still goes
    why: str = ""
    sts: StsPolicy | None = None  # the MTA-STS policy the host was held to (enforce, testing)

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """What TLS-RPT names as the policy (RFC 8460 §4.4 ``policy-string``): the usable
        TLSA records under DANE, else the MTA-STS policy's lines, else nothing."""
        if self.check.kind == "dane":
            return tuple(str(record) for record in self.check.tlsa)
        return self.sts.lines() if self.sts is not None else ()


def decide_domain(
    domain: str, local: DomainPolicy | None, sts: StsFacts, default_level: TlsLevel
) -> TransportPolicy:
    """The domain-level policy: local entry > MTA-STS enforce > testing > default.

    Parameters:
        domain: the next-hop (recipient) domain.
        local: its local policy entry (``local.find_policy``), if any.
        sts: the MTA-STS facts; a policy with ``mode: none`` counts as no policy.
        default_level: ``outbound.default_level``.
    """
    domain = normalise_host(domain)
    if local is not None:
        why = f"local policy {local.name!r} ({local.source or 'config'}): {local.level.label}"
        return TransportPolicy(domain, local.level, PolicySource.LOCAL, why, local=local)
    policy = sts.policy
    about = f"MTA-STS policy id {sts.policy_id or '?'} ({sts.state})"
    if policy is not None and policy.mode is StsMode.ENFORCE:
        # PKIX for the MX host name (RFC 8461 §4.2); a default of secure stays secure.
        level = max(TlsLevel.VERIFY, default_level)
        why = f"{about}, mode enforce: MX hosts in the policy, {level.label}"
        return TransportPolicy(domain, level, PolicySource.MTA_STS, why, sts=policy)
    if policy is not None and policy.mode is StsMode.TESTING:
        why = f"{about}, mode testing: default level {default_level.label}, failures reported"
        return TransportPolicy(domain, default_level, PolicySource.MTA_STS_TESTING, why, sts=policy)
    if policy is not None:
        why = f"{about}, mode none: no MTA-STS policy"
    else:
        why = f"no MTA-STS policy ({sts.state}{f': {sts.error}' if sts.error else ''})"
    why = f"{why}; default level {default_level.label}"
    return TransportPolicy(domain, default_level, PolicySource.DEFAULT, why)


def decide_host(
    policy: TransportPolicy, host: str, tlsa: TlsaFacts, *, trust: TrustStore | None
) -> HostRequirement:
    """What ``host`` must prove, or ``TlsPolicyFailure`` (with its RFC 8460 reason) if it
    must not get mail at all.

    Parameters:
        policy: the domain's ``decide_domain`` result.
        host: the MX host (or next hop) about to be tried.
        tlsa: its TLSA facts (``NOT_LOOKED_UP`` when DANE is off or untrusted).
        trust: the PKIX anchors for this destination: a local entry's own ``ca_file``
            store when it names one, else the system store plus ``tls.ca_file``.
    """
    host = normalise_host(host)
    sts = policy.sts
    if policy.source is PolicySource.MTA_STS and sts is not None and not sts.allows(host):
        raise TlsPolicyFailure(
            f"MX host {host} is not in the MTA-STS policy of {policy.domain}",
            reason="validation-failure",
        )
    local = policy.local
    if local is None or local.level in (TlsLevel.DANE, TlsLevel.DANE_ONLY):
        if tlsa.status is TlsaStatus.FAILED:
            raise TlsPolicyFailure(
                f"TLSA lookup for {host} failed: {tlsa.detail or 'no secure answer'}",
                reason="dnssec-invalid",
            )
        if tlsa.status is TlsaStatus.UNVERIFIABLE and local is not None:
            raise TlsPolicyFailure(
                f"level {local.level.label} for {policy.domain}: TLSA of {host} cannot be "
                f"trusted, {tlsa.detail}",
                reason="dnssec-invalid",
            )
        if tlsa.status is TlsaStatus.USABLE:
            return _dane(policy, host, tlsa)
    if local is not None:
        return _by_level(policy, host, trust)
    requirement = _without_dane(policy, host, trust)
    if policy.sts is not None:
        requirement = replace(requirement, sts=policy.sts)
    if tlsa.status is TlsaStatus.UNUSABLE and requirement.level <= TlsLevel.ENCRYPT:
        why = f"TLSA RRset of {tlsa.base or host} is secure, none usable: TLS mandatory"
        return replace(requirement, level=TlsLevel.ENCRYPT, source=PolicySource.DANE, why=why)
    if tlsa.status is TlsaStatus.UNVERIFIABLE:  # no TLSA published: say DANE was not checked
        why = f"{requirement.why}; DNSSEC unverifiable, DANE not checked ({tlsa.detail})"
        return replace(requirement, why=why)
    return requirement


def _dane(policy: TransportPolicy, host: str, tlsa: TlsaFacts) -> HostRequirement:
    """RFC 7672 §3: the usable TLSA records; DANE-TA names: base domain, host, domain."""
    base = tlsa.base or host
    names = tuple(dict.fromkeys((base, host, policy.domain)))
    check = PeerCheck("dane", names=names, tlsa=tlsa.records)
    level = TlsLevel.DANE_ONLY if policy.level is TlsLevel.DANE_ONLY else TlsLevel.DANE
    source = PolicySource.LOCAL if policy.local is not None else PolicySource.DANE
    why = f"{len(tlsa.records)} usable TLSA record(s) at {tlsa.name or base} (DNSSEC-secure)"
    if policy.local is not None:
        why = f"{policy.why}; {why}"
    return HostRequirement(host, level, source, check, sni=base, why=why)


def _without_dane(policy: TransportPolicy, host: str, trust: TrustStore | None) -> HostRequirement:
    """No usable TLSA and no local entry: MTA-STS enforce, testing, or the default."""
    if policy.source is PolicySource.MTA_STS_TESTING and policy.level <= TlsLevel.ENCRYPT:
        sts = policy.sts
        why = policy.why
        if sts is not None and not sts.allows(host):
            why = f"{why}; {host} is not in the policy's mx (reported)"
        check = PeerCheck("pkix", names=(host,), trust=trust)
        return HostRequirement(
            host, policy.level, policy.source, check, host, report_only=True, why=why
        )
    return _by_level(policy, host, trust)


def _by_level(policy: TransportPolicy, host: str, trust: TrustStore | None) -> HostRequirement:
    """The check the policy's level asks for without usable TLSA (Postfix's meanings)."""
    level = policy.level
    if level is TlsLevel.DANE_ONLY:
        raise TlsPolicyFailure(
            f"level dane-only for {policy.domain}, but {host} has no usable TLSA records",
            reason="dane-required",
        )
    if level is TlsLevel.VERIFY:
        check = PeerCheck("pkix", names=(host,), trust=trust)
    elif level is TlsLevel.SECURE:
        domain = policy.domain
        within = host == domain or host.endswith(f".{domain}")
        names = tuple(dict.fromkeys((domain, host) if within else (domain,)))
        check = PeerCheck("pkix", names=names, trust=trust)
    elif level is TlsLevel.FINGERPRINT:
        fingerprints = policy.local.fingerprints if policy.local is not None else ()
        check = PeerCheck("fingerprint", fingerprints=fingerprints)
    else:  # may, encrypt, and dane without usable TLSA: TLS is not authenticated
        check = PeerCheck("none")
        if level is TlsLevel.DANE:
            level = TlsLevel.ENCRYPT
    return HostRequirement(host, level, policy.source, check, sni=host, why=policy.why)
