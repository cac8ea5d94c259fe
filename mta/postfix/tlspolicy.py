"""Our destination decision as one Postfix ``smtp_tls_policy_maps`` answer.

Pure: no I/O. ``DestinationResolver`` (the one ``mta check`` and delivery ask) gives a
``DomainPlan`` and a ``HostPlan`` per candidate MX host; Postfix asks once per next-hop
domain and applies one policy to every MX host. ``translate`` reduces the per-host
decision to that one answer without ever weakening it (Postfix ``postconf(5)``,
``smtp_tls_policy_maps``; ``TLS_README``):

- an answer we could not reach (MX lookup failed, no MX host in the MTA-STS policy, a
  host's address or TLSA lookup failed) is ``TEMP``: Postfix defers, as we would;
- DANE: any candidate host with usable TLSA records -> ``dane-only``. Postfix's ``dane``
  falls back to ``may`` (plaintext) on hosts without TLSA, below our ``encrypt`` floor;
  ``dane-only`` makes Postfix use only the hosts that prove DANE — stricter than our
  per-host rule (we would still send to a TLSA-less backup MX under ``encrypt``);
- MTA-STS ``enforce`` -> ``secure match=<mx patterns> servername=hostname`` (a ``*.``
  pattern becomes Postfix's ``.parent`` form);
- ``testing`` and the default -> the default level;
- local ``[[domain]]`` levels map one to one: ``may``, ``encrypt``, ``dane`` (``encrypt``
  unless TLSA make it ``dane-only``, as above), ``dane-only``, ``verify match=hostname``,
  ``secure match=<domain>:<its MX hosts inside it>``, ``fingerprint match=<AA:BB:..|..>``
  (SHA-256: Postfix's ``smtp_tls_fingerprint_digest`` must be ``sha256``); a ``ca_file``
  becomes ``tafile=``.

Every TLS answer carries our floors where Postfix has attributes for them:
``protocols=>=TLSv1.2 ciphers=high exclude=kRSA`` (no TLS 1.2 suite without (EC)DHE).
With ``tlsrpt`` (Postfix >= 3.10) an MTA-STS answer also carries the TLSRPT attributes
``policy_type=sts policy_domain= policy_ttl= mx_host_pattern= policy_string=``; older
Postfix rejects unknown attributes (the lookup becomes a deferral), so they are opt-in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mta.model import Outcome, PolicySource, TlsLevel
from mta.policy.decide import TlsaStatus
from mta.policy.dns import DnsTempFail
from mta.policy.mta_sts import StsPolicy
from mta.policy.mx import normalise_host
from mta.policy.resolver import DomainPlan, HostPlan
from mta.postfix.socketmap import Reply

__all__ = ["FLOORS", "Options", "lookup_domain", "translate"]

FLOORS: Final = ("protocols=>=TLSv1.2", "ciphers=high", "exclude=kRSA")
_DOMAIN: Final = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*$"
)


@dataclass(frozen=True, slots=True)
class Options:
    """How to speak to this Postfix (``[policy_server]``)."""

    tlsrpt: bool = False  # Postfix >= 3.10 understands the TLSRPT attributes


def lookup_domain(key: str) -> str | None:
    """The domain a lookup key names, or ``None`` for keys we leave to Postfix
    (``NOTFOUND``): its parent-domain probes (``.example.com``), explicit next hops
    (``[host]``, ``host:port``), IP literals and anything that is not a host name."""
    name = normalise_host(key)
    if not _DOMAIN.match(name) or name.replace(".", "").isdigit():
        return None
    return name


def translate(plan: DomainPlan, hosts: Sequence[HostPlan], options: Options) -> Reply:
    """The ``smtp_tls_policy_maps`` answer for ``plan``'s domain (see the module doc).

    Parameters:
        plan: ``DestinationResolver.domain``'s plan for the domain.
        hosts: ``DestinationResolver.host`` for each of ``plan.hosts``.
        options: what the Postfix on the other end understands.
    """
    terminal = plan.terminal
    if terminal is not None and terminal.outcome is Outcome.DEFERRED:
        return Reply.temp(f"{plan.domain}: {terminal.reply}")
    if terminal is not None:  # null MX, no such domain: Postfix finds out and bounces itself
        hosts = ()
    for host in hosts:
        if isinstance(host.dns_failure, DnsTempFail):  # its TLSA could not be looked up
            return Reply.temp(f"{plan.domain}: address lookup for {host.host} failed")
    policy = plan.policy
    local = policy.local
    if policy.level is TlsLevel.DANE_ONLY:
        return _answer("dane-only")
    if local is None or policy.level is TlsLevel.DANE:
        if any(h.requirement and h.requirement.check.kind == "dane" for h in hosts):
            return _answer("dane-only")
        for host in hosts:
            if host.refusal is not None and host.tlsa.status in (
                TlsaStatus.FAILED,
                TlsaStatus.UNVERIFIABLE,
            ):
                return Reply.temp(f"{plan.domain}: {host.refusal}")
    levels = [h.requirement.level for h in hosts if h.requirement is not None]
    level = max([policy.level, *levels])
    if level is TlsLevel.DANE:  # no usable TLSA anywhere: our dane means encrypt
        level = TlsLevel.ENCRYPT
    extra: list[str] = []
    if local is not None and local.ca_file is not None and level >= TlsLevel.VERIFY:
        extra.append(f"tafile={local.ca_file}")
    sts = policy.sts if policy.source is PolicySource.MTA_STS else None
    if sts is not None and level is TlsLevel.VERIFY:
        return _answer(_sts_secure(plan.nexthop, sts, options))
    if level is TlsLevel.VERIFY:
        return _answer("verify match=hostname servername=hostname", *extra)
    if level is TlsLevel.SECURE:
        inside = [h for h in plan.hosts if h == plan.domain or h.endswith(f".{plan.domain}")]
        names = ":".join(dict.fromkeys([plan.domain, *inside]))
        return _answer(f"secure match={names} servername=hostname", *extra)
    if level is TlsLevel.FINGERPRINT:
        prints = local.fingerprints if local is not None else ()
        return _answer(f"fingerprint match={'|'.join(map(_postfix_digest, prints))}")
    return _answer(f"{level.label} servername=hostname")


def _answer(*parts: str) -> Reply:
    return Reply.ok(" ".join((*parts, *FLOORS)))


def _sts_secure(domain: str, sts: StsPolicy, options: Options) -> str:
    """RFC 8461 enforce as Postfix knows it (postfix-mta-sts-resolver's form), and with
    ``tlsrpt`` the attributes by which Postfix >= 3.10 also holds each MX host name to
    the policy's patterns (one label per ``*``) and reports the policy."""
    patterns = ":".join(p[1:] if p.startswith("*.") else p for p in sts.mx)
    words = [f"secure match={patterns} servername=hostname"]
    if options.tlsrpt:
        words += ["policy_type=sts", f"policy_domain={domain}", f"policy_ttl={sts.max_age}"]
        words += [f"mx_host_pattern={p}" for p in sts.mx]
        words += [f"{{ policy_string = {line} }}" for line in sts.lines() if "}" not in line]
    return " ".join(words)


def _postfix_digest(fingerprint: str) -> str:
    """``sha256:abcd..`` -> ``AB:CD:..`` (how Postfix writes fingerprints)."""
    digits = fingerprint.removeprefix("sha256:").upper()
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
