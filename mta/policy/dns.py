"""DNS lookups for delivery (MX, A, AAAA, TLSA, TXT) on dnspython's asyncio resolver.

This is the I/O edge for DNS: every dnspython exception is translated here, once, into
one of the typed results below, and nothing above this module sees ``dns.*`` errors.
Absent and temporarily unknown are different results (STYLE.md C.3): NXDOMAIN is
``NoDomain`` (bounce), a timeout or SERVFAIL is ``DnsTempFail`` (defer), NODATA for MX
is ``MxHosts(())`` (the implicit MX of RFC 5321 §5.1).

dnspython does not validate DNSSEC and does not read /etc/hosts: with no resolvers
configured it uses the system's resolv.conf nameservers. DNSSEC status comes from the
resolver: every query sets DO and AD, and an answer (or a denial) is ``secure`` when
the response carries AD. That means something only when the resolver validates and
the path to it cannot be tampered with: ``resolver_is_trusted`` says when (loopback,
or marked trusted by the operator). A bogus answer reaches us as SERVFAIL, hence
``DnsTempFail``, never as "no records" (RFC 7672 §2.2).

``tlsa_for_host`` is RFC 7672 §2.2.2: TLSA records count only when the host's address
records are secure, and for a CNAME'd host they are looked up at the fully expanded
name first, then at the original one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT

from mta.config import Resolver, is_ip
from mta.errors import ConfigError
from mta.policy.dane import TlsaRecord, is_usable
from mta.policy.decide import TlsaFacts, TlsaStatus
from mta.policy.mx import MxRecord, is_null_mx, normalise_host

_CACHE_ENTRIES: Final = 10_000  # answers kept (oldest dropped first)
_CACHE_MAX_TTL: Final = 3600.0  # seconds, whatever the TTL says
_NEGATIVE_TTL: Final = 60.0  # seconds a denial (NXDOMAIN, NODATA) is remembered
_PER_TRY_TIMEOUT: Final = 2.0  # one query to one nameserver; the lifetime bounds the whole
_EDNS_PAYLOAD: Final = 1232  # DNS flag day 2020: no IP fragmentation; larger answers go TCP
MAX_CNAME_CHAIN: Final = 8  # CNAMEs followed for one name; dnspython itself stops at 16


@dataclass(frozen=True, slots=True)
class MxHosts:
    """The domain's MX RRset; empty when the domain exists but has no MX (implicit MX).

    ``secure``: the resolver validated the RRset (or the denial) with DNSSEC (AD bit).
    """

    records: tuple[MxRecord, ...]
    secure: bool = False


@dataclass(frozen=True, slots=True)
class NullMx:
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""


@dataclass(frozen=True, slots=True)
class NoDomain:
    """The name does not exist (NXDOMAIN), has no such records (NODATA), or is not valid.

    ``secure``: the denial itself was DNSSEC-validated (AD bit on the NXDOMAIN/NODATA).
    """

    reason: str
    secure: bool = False


@dataclass(frozen=True, slots=True)
class DnsTempFail:
    """The answer is unknown for now (timeout, SERVFAIL, no nameserver answered).

    ``timed_out``: no answer came at all, as opposed to a failure answer (SERVFAIL is
    also how a validating resolver reports a bogus, possibly forged, answer).
    """

    reason: str
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class AddressesFound:
    """IP addresses of a host, IPv4 first, then IPv6.

    ``secure``: every address RRset found was DNSSEC-validated (AD bit), CNAMEs included.
    ``canonical``: the name after CNAME expansion when the host is an alias, else empty.
    """

    addresses: tuple[str, ...]
    secure: bool = False
    canonical: str = ""


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """The TLSA RRset at ``name`` (``_25._tcp.<host>``), usable records or not."""

    records: tuple[TlsaRecord, ...]
    secure: bool
    name: str


@dataclass(frozen=True, slots=True)
class TxtAnswer:
    """A TXT RRset: one string per record, its character-strings joined."""

    strings: tuple[str, ...]


MxLookup = MxHosts | NullMx | NoDomain | DnsTempFail
AddressLookup = AddressesFound | NoDomain | DnsTempFail
TlsaLookup = TlsaAnswer | NoDomain | DnsTempFail
TxtLookup = TxtAnswer | NoDomain | DnsTempFail


@dataclass(frozen=True, slots=True)
class _RRset:
    """A positive answer: the records, their DNSSEC status, the CNAME-expanded owner."""

    rdatas: tuple[dns.rdata.Rdata, ...]
    secure: bool
    canonical: str


@dataclass(frozen=True, slots=True)
class _NoData:
    """The name exists but has no records of the asked type."""

    secure: bool = False


def resolver_is_trusted(resolvers: Sequence[Resolver], trusted: bool) -> bool:
    """Whether the AD bit of these resolvers may be believed (DESIGN.md, DNSSEC).

    Only a validating resolver on loopback (127.0.0.0/8, ::1) is reached over a path
    no one else can tamper with; any other must be marked trusted by the operator.
    No resolvers at all (an unknown system configuration) is not trusted unless marked.

    Parameters:
        resolvers: the nameservers queried (``DnsClient.resolvers``).
        trusted: the operator's explicit "trust this resolver" setting.
    """
    if trusted:
        return True
    return bool(resolvers) and all(_is_loopback(r.host) for r in resolvers)


class DnsClient:
    """MX, address, TLSA and TXT lookups through the configured resolvers (or the system's).

    Parameters:
        resolvers: nameservers to ask, in order; empty means the system configuration.
        timeout: the most one lookup (all retries and nameservers together) may take.
    """

    def __init__(self, resolvers: Sequence[Resolver], timeout: float) -> None:
        if resolvers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(r.host, r.port) for r in resolvers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as err:
                raise ConfigError(
                    "(system resolver configuration)",
                    "dns.resolvers",
                    f"empty, and the system has no usable resolvers: {err}",
                ) from None
        resolver.lifetime = timeout
        resolver.timeout = min(_PER_TRY_TIMEOUT, timeout)
        resolver.cache = None  # ours (_query) keeps the typed results, DNSSEC status included
        self._cache: dict[
            tuple[str, dns.rdatatype.RdataType],
            tuple[float, _RRset | _NoData | NoDomain | DnsTempFail],
        ] = {}
        # DO: we want the DNSSEC status; AD: tell us it (RFC 6840 §5.7), even without RRSIGs.
        resolver.use_edns(0, dns.flags.DO, _EDNS_PAYLOAD)
        resolver.flags = dns.flags.RD | dns.flags.AD
        self._resolver = resolver

    @property
    def resolvers(self) -> tuple[Resolver, ...]:
        """The nameservers actually queried (the system's when none were configured)."""
        found: list[Resolver] = []
        for server in self._resolver.nameservers:
            if isinstance(server, dns.nameserver.AddressAndPortNameserver):
                found.append(Resolver(server.address, server.port))
            elif isinstance(server, str) and is_ip(server):
                port = self._resolver.nameserver_ports.get(server, self._resolver.port)
                found.append(Resolver(server, port))
            else:  # DoH URL or unknown: never loopback, so never trusted implicitly
                found.append(Resolver(str(server), 0))
        return tuple(found)

    async def mx(self, domain: str) -> MxLookup:
        """The MX RRset of ``domain`` (RFC 7505 null MX recognised)."""
        answer = await self._query(domain, dns.rdatatype.MX)
        if isinstance(answer, NoDomain | DnsTempFail):
            return answer
        if isinstance(answer, _NoData):
            return MxHosts((), secure=answer.secure)
        records = tuple(
            MxRecord(rdata.preference, normalise_host(rdata.exchange.to_text()))
            for rdata in answer.rdatas
            if isinstance(rdata, MX)
        )
        if is_null_mx(records):
            return NullMx()
        return MxHosts(records, secure=answer.secure)

    async def addresses(self, host: str) -> AddressLookup:
        """The A then AAAA addresses of ``host``; an IP literal is returned as is."""
        if is_ip(host):
            return AddressesFound((host,))
        results = await asyncio.gather(
            self._query(host, dns.rdatatype.A), self._query(host, dns.rdatatype.AAAA)
        )
        positive = [answer for answer in results if isinstance(answer, _RRset)]
        found = [str(rdata) for answer in positive for rdata in answer.rdatas]
        if found:
            canonical = positive[0].canonical
            return AddressesFound(
                tuple(dict.fromkeys(found)),
                secure=all(answer.secure for answer in positive),
                canonical=canonical if canonical != normalise_host(host) else "",
            )
        for answer in results:
            if isinstance(answer, DnsTempFail):
                return answer
        secure = all(isinstance(a, _NoData | NoDomain) and a.secure for a in results)
        for answer in results:
            if isinstance(answer, NoDomain):
                return NoDomain(answer.reason, secure=secure)
        return NoDomain(f"{host} has no A or AAAA record", secure=secure)

    async def tlsa(self, host: str, port: int = 25) -> TlsaLookup:
        """The TLSA RRset of ``_<port>._tcp.<host>`` (RFC 6698 §3), with its DNSSEC status.

        A bogus RRset is SERVFAIL at a validating resolver, so ``DnsTempFail``: never
        mistake it for "no records" (RFC 7672 §2.2).
        """
        name = f"_{port}._tcp.{normalise_host(host)}"
        answer = await self._query(name, dns.rdatatype.TLSA)
        if isinstance(answer, NoDomain | DnsTempFail):
            return answer
        if isinstance(answer, _NoData):
            return NoDomain(f"{name}: no TLSA records (NODATA)", secure=answer.secure)
        records = tuple(
            TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, rdata.cert)
            for rdata in answer.rdatas
            if isinstance(rdata, TLSA)
        )
        return TlsaAnswer(records, secure=answer.secure, name=name)

    async def tlsa_for_host(
        self, host: str, port: int = 25, *, addresses: AddressLookup | None = None
    ) -> TlsaFacts:
        """What DANE may use for ``host`` (RFC 7672 §2.2.2), as ``decide`` wants it.

        ``addresses``: the host's address lookup, when the caller has made it already
        (delivery has: it connects to them); else it is made here.

        The host's address records decide first: insecure -> ``INSECURE`` (no TLSA
        lookup); lookup failure -> ``FAILED``. With secure addresses, TLSA is looked up
        at the CNAME-expanded name, then (if that gives no secure records) at ``host``;
        ``base`` is where the records were found. A failed lookup at either name is
        ``FAILED``: an attacker must not turn a bogus answer into "no DANE".
        """
        host = normalise_host(host)
        if is_ip(host):
            return TlsaFacts(TlsaStatus.INSECURE, detail=f"{host} is an address, not a name")
        found = addresses if addresses is not None else await self.addresses(host)
        if isinstance(found, DnsTempFail):
            return TlsaFacts(TlsaStatus.FAILED, base=host, detail=found.reason)
        if isinstance(found, NoDomain):
            status = TlsaStatus.ABSENT if found.secure else TlsaStatus.INSECURE
            return TlsaFacts(status, detail=f"no address records: {found.reason}")
        if not found.secure:
            return TlsaFacts(
                TlsaStatus.INSECURE, detail=f"address records of {host} are not DNSSEC-secure"
            )
        names = [found.canonical, host] if found.canonical else [host]
        facts = TlsaFacts(TlsaStatus.ABSENT)
        for base in names:
            facts = _tlsa_facts(base, await self.tlsa(base, port))
            if facts.status not in (TlsaStatus.ABSENT, TlsaStatus.INSECURE):
                return facts
        return facts

    async def txt(self, name: str) -> TxtLookup:
        """The TXT RRset of ``name``; each record's character-strings joined (RFC 7208 §3.3).

        Bytes that are not UTF-8 become U+FFFD, which no parser of ours accepts.
        """
        answer = await self._query(name, dns.rdatatype.TXT)
        if isinstance(answer, NoDomain | DnsTempFail):
            return answer
        if isinstance(answer, _NoData):
            return NoDomain(f"{name}: no TXT records (NODATA)", secure=answer.secure)
        return TxtAnswer(
            tuple(
                b"".join(rdata.strings).decode("utf-8", errors="replace")
                for rdata in answer.rdatas
                if isinstance(rdata, TXT)
            )
        )

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> _RRset | _NoData | NoDomain | DnsTempFail:
        """One query, answered from the cache while its TTL lasts (failures are never cached)."""
        key = (name.lower(), rdtype)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        result, ttl = await self._ask(name, rdtype)
        if not isinstance(result, DnsTempFail) and ttl > 0:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache[key] = (now + min(ttl, _CACHE_MAX_TTL), result)
        return result

    async def _ask(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[_RRset | _NoData | NoDomain | DnsTempFail, float]:
        """One query; dnspython's exceptions become results here and nowhere else.

        Returns the result and how long it may be cached (the answer's TTL; a fixed short
        time for a denial; 0 for failures).
        """
        kind = dns.rdatatype.to_text(rdtype)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as err:
            return NoDomain(f"invalid domain name {name!r}: {err}"), 0
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as err:
            responses = _responses(err.kwargs.get("responses"))
            secure = bool(responses) and all(_is_secure(r) for r in responses)
            found = NoDomain(f"{name}: host not found (NXDOMAIN, type={kind})", secure=secure)
            return found, _NEGATIVE_TTL
        except dns.resolver.NoAnswer as err:
            response = err.kwargs.get("response")
            secure = isinstance(response, dns.message.Message) and _is_secure(response)
            return _NoData(secure), _NEGATIVE_TTL
        except dns.resolver.NoNameservers:
            return DnsTempFail(f"{name}: no nameserver answered (SERVFAIL, type={kind})"), 0
        except dns.exception.Timeout:
            return DnsTempFail(f"{name}: DNS timeout (type={kind})", timed_out=True), 0
        except dns.exception.DNSException as err:
            return DnsTempFail(f"{name}: DNS error (type={kind}): {err}"), 0
        if len(answer.chaining_result.cnames) > MAX_CNAME_CHAIN:
            chain = f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN} (type={kind})"
            return DnsTempFail(chain), 0
        rrset = _RRset(
            tuple(answer),
            secure=_is_secure(answer.response),
            canonical=normalise_host(answer.canonical_name.to_text()),
        )
        return rrset, float(answer.rrset.ttl if answer.rrset is not None else 0)


def _tlsa_facts(base: str, answer: TlsaLookup) -> TlsaFacts:
    """One TLSA lookup at ``base`` as ``decide`` sees it (RFC 7672 §2.2, §3.1.3)."""
    if isinstance(answer, DnsTempFail):
        return TlsaFacts(TlsaStatus.FAILED, base=base, detail=answer.reason)
    if isinstance(answer, NoDomain):
        status = TlsaStatus.ABSENT if answer.secure else TlsaStatus.INSECURE
        return TlsaFacts(status, base=base, detail=answer.reason)
    if not answer.secure:
        return TlsaFacts(TlsaStatus.INSECURE, base=base, detail=f"{answer.name}: not DNSSEC-secure")
    usable = tuple(record for record in answer.records if is_usable(record))
    if not usable:
        detail = f"{answer.name}: {len(answer.records)} TLSA record(s), none usable"
        return TlsaFacts(TlsaStatus.UNUSABLE, base=base, detail=detail)
    return TlsaFacts(TlsaStatus.USABLE, usable, base=base, detail=f"{answer.name}: secure")


def _responses(found: object) -> list[dns.message.Message]:
    """The responses dnspython attached to an NXDOMAIN (a name -> message dict)."""
    if not isinstance(found, dict):
        return []
    return [r for r in found.values() if isinstance(r, dns.message.Message)]


def _is_secure(response: dns.message.Message) -> bool:
    """The resolver vouches for the answer or denial (the AD bit, RFC 4035 §3.2.3)."""
    return bool(response.flags & dns.flags.AD)


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
