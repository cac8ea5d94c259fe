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

One malformed TLSA record must not hide the others (RFC 7672 §3.1, RFC 6698: a record
whose data does not fit its matching type is unusable, and ignored). dnspython refuses
a whole response when one TLSA rdata is inconsistent (a 31-byte SHA-256 digest) and its
resolver then waits out the timeout for a "valid" one. So our nameserver
(``_Nameserver``) parses every response with ``continue_on_error``, and for TLSA the
records are read from the response's wire (``answer_rdatas``) whenever dnspython
recorded an error: every record is kept as published and ``dane.is_usable`` judges it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import dns._asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.wire
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TLSA import TLSA
from dns.rdtypes.ANY.TXT import TXT

from mta.config import Resolver, is_ip
from mta.errors import ConfigError
from mta.policy.dane import TlsaRecord, is_usable, parse_tlsa_rdata
from mta.policy.decide import TlsaFacts, TlsaStatus
from mta.policy.dnssec import ProbeAnswer, ProbeSpec
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
    """The TLSA RRset at ``name`` (``_<port>._tcp.<host>``), usable records or not."""

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


def _no_observer(_rdtype: str, _result: str) -> None:
    """The default observer: nobody is counting."""


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
        observe: told ``(type, result)`` of every query sent (not of cache hits), for
            the metrics: ``MX``..., and ``ok``, ``nxdomain``, ``nodata``, ``servfail``,
            ``timeout`` or ``other``.
    """

    def __init__(
        self,
        resolvers: Sequence[Resolver],
        timeout: float,
        *,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._observe = observe or _no_observer
        if resolvers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_Nameserver(r.host, r.port) for r in resolvers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as err:
                raise ConfigError(
                    "(system resolver configuration)",
                    "dns.resolvers",
                    f"empty, and the system has no usable resolvers: {err}",
                ) from None
            resolver.nameservers = [  # ours, so TLSA answers are parsed leniently (above)
                _Nameserver(server, resolver.nameserver_ports.get(server, resolver.port))
                if isinstance(server, str) and is_ip(server)
                else server
                for server in resolver.nameservers
            ]
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
        records: list[TlsaRecord] = []
        for rdata in answer.rdatas:
            if isinstance(rdata, TLSA):
                records.append(TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, rdata.cert))
            elif isinstance(rdata, dns.rdata.GenericRdata):  # read from the wire (see above)
                found = parse_tlsa_rdata(rdata.data)
                if found is not None:
                    records.append(found)
        return TlsaAnswer(tuple(records), secure=answer.secure, name=name)

    async def tlsa_for_host(
        self,
        host: str,
        port: int = 25,
        *,
        addresses: AddressLookup | None = None,
        unverified: bool = False,
    ) -> TlsaFacts:
        """What DANE may use for ``host`` (RFC 7672 §2.2.2), as ``decide`` wants it.

        ``addresses``: the host's address lookup, when the caller has made it already
        (delivery has: it connects to them); else it is made here.
        ``unverified``: the resolver failed the DNSSEC probe, so no AD bit can be believed
        or expected: report what is *published* (every answer counts as if secure); the
        caller must not authenticate with it (``resolver`` turns it into a refusal).

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
        if not found.secure and not unverified:
            return TlsaFacts(
                TlsaStatus.INSECURE, detail=f"address records of {host} are not DNSSEC-secure"
            )
        names = [found.canonical, host] if found.canonical else [host]
        facts = TlsaFacts(TlsaStatus.ABSENT)
        for base in names:
            facts = _tlsa_facts(base, await self.tlsa(base, port), unverified=unverified)
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

    async def probe_dnssec(self, spec: ProbeSpec) -> ProbeAnswer:
        """Ask the DNSSEC probe's question, uncached: does the answer carry AD?

        A denial with AD counts as validated too; a failure is not (the resolver is down,
        or refuses the name, or sees the answer as bogus: nothing validates either way).
        """
        found, _ttl = await self._ask(spec.name, dns.rdatatype.from_text(spec.rdtype))
        if isinstance(found, DnsTempFail):
            return ProbeAnswer(False, f"no answer to the probe {spec}: {found.reason}")
        if found.secure:
            return ProbeAnswer(True, f"{spec}: validated (AD bit set)")
        return ProbeAnswer(
            False,
            f"{spec} answered without the AD bit: the resolver does not validate DNSSEC "
            "(validation off, no trust anchor, or a forwarder)",
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
        time for a denial; 0 for failures). The observer is told how it went.
        """
        kind = dns.rdatatype.to_text(rdtype)
        found, ttl, outcome = await self._resolve(name, rdtype, kind)
        self._observe(kind, outcome)
        return found, ttl

    async def _resolve(
        self, name: str, rdtype: dns.rdatatype.RdataType, kind: str
    ) -> tuple[_RRset | _NoData | NoDomain | DnsTempFail, float, str]:
        """``_ask``'s work: the result, its cache time and the observer's result label."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as err:
            return NoDomain(f"invalid domain name {name!r}: {err}"), 0, "other"
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as err:
            responses = _responses(err.kwargs.get("responses"))
            secure = bool(responses) and all(_is_secure(r) for r in responses)
            found = NoDomain(f"{name}: host not found (NXDOMAIN, type={kind})", secure=secure)
            return found, _NEGATIVE_TTL, "nxdomain"
        except dns.resolver.NoAnswer as err:
            response = err.kwargs.get("response")
            if not isinstance(response, dns.message.Message):
                return _NoData(False), _NEGATIVE_TTL, "nodata"
            if rdtype == dns.rdatatype.TLSA and response.errors:  # every record refused
                return _labelled(*_rdata_from_wire(name, response))
            return _NoData(_is_secure(response)), _NEGATIVE_TTL, "nodata"
        except dns.resolver.NoNameservers:
            failed = DnsTempFail(f"{name}: no nameserver answered (SERVFAIL, type={kind})")
            return failed, 0, "servfail"
        except dns.exception.Timeout:
            return DnsTempFail(f"{name}: DNS timeout (type={kind})", timed_out=True), 0, "timeout"
        except dns.exception.DNSException as err:
            return DnsTempFail(f"{name}: DNS error (type={kind}): {err}"), 0, "other"
        if len(answer.chaining_result.cnames) > MAX_CNAME_CHAIN:
            chain = f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN} (type={kind})"
            return DnsTempFail(chain), 0, "other"
        if rdtype == dns.rdatatype.TLSA and answer.response.errors:  # some records refused
            return _labelled(*_rdata_from_wire(name, answer.response))
        rrset = _RRset(
            tuple(answer),
            secure=_is_secure(answer.response),
            canonical=normalise_host(answer.canonical_name.to_text()),
        )
        return rrset, float(answer.rrset.ttl if answer.rrset is not None else 0), "ok"


def _tlsa_facts(base: str, answer: TlsaLookup, *, unverified: bool = False) -> TlsaFacts:
    """One TLSA lookup at ``base`` as ``decide`` sees it (RFC 7672 §2.2, §3.1.3).

    ``unverified``: take every answer as if secure (what is published; see
    ``DnsClient.tlsa_for_host``).
    """
    if isinstance(answer, DnsTempFail):
        return TlsaFacts(TlsaStatus.FAILED, base=base, detail=answer.reason)
    if isinstance(answer, NoDomain):
        secure = answer.secure or unverified
        status = TlsaStatus.ABSENT if secure else TlsaStatus.INSECURE
        return TlsaFacts(status, base=base, detail=answer.reason)
    name = answer.name
    if not answer.secure and not unverified:
        return TlsaFacts(
            TlsaStatus.INSECURE, base=base, name=name, detail=f"{name}: not DNSSEC-secure"
        )
    usable = tuple(record for record in answer.records if is_usable(record))
    unusable = len(answer.records) - len(usable)
    if not usable:
        detail = f"{name}: {len(answer.records)} TLSA record(s), none usable"
        return TlsaFacts(TlsaStatus.UNUSABLE, base=base, name=name, detail=detail)
    state = "published (unverified)" if not answer.secure else "secure"
    detail = f"{name}: {state}" + (f", {unusable} unusable record(s) ignored" if unusable else "")
    return TlsaFacts(TlsaStatus.USABLE, usable, base=base, name=name, detail=detail)


def answer_rdatas(
    wire: bytes, owner: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> tuple[list[bytes], int]:
    """The rdata of every ``rdtype`` record at ``owner`` in the answer section of the DNS
    message ``wire``, as published, with the smallest TTL (0 when none).

    Reads the wire itself (RFC 1035 §4.1), so a record dnspython refuses is kept;
    a ``dns.exception.DNSException`` when the message itself is malformed.
    """
    parser = dns.wire.Parser(wire)
    _id, _flags, questions, answers, _authority, _additional = parser.get_struct("!HHHHHH")
    for _ in range(questions):
        parser.get_name(decompress=True)  # owner names may be compressed (RFC 3597 §4)
        parser.get_struct("!HH")
    found: list[bytes] = []
    ttls: list[int] = []
    for _ in range(answers):
        name = parser.get_name(decompress=True)
        kind, rdclass, ttl, length = parser.get_struct("!HHIH")
        data = parser.get_bytes(length)
        if name == owner and kind == rdtype and rdclass == dns.rdataclass.IN:
            found.append(data)
            ttls.append(ttl)
    return found, min(ttls, default=0)


def _labelled(
    found: _RRset | _NoData | DnsTempFail, ttl: float
) -> tuple[_RRset | _NoData | DnsTempFail, float, str]:
    """A TLSA answer read from the wire, with the observer's result label."""
    label = (
        "ok" if isinstance(found, _RRset) else "nodata" if isinstance(found, _NoData) else "other"
    )
    return found, ttl, label


def _rdata_from_wire(
    name: str, response: dns.message.Message
) -> tuple[_RRset | _NoData | DnsTempFail, float]:
    """A TLSA answer dnspython could not wholly parse: its records read from the wire, each
    as generic rdata (``DnsClient.tlsa`` judges them one by one)."""
    if not isinstance(response, dns.message.QueryMessage):
        return DnsTempFail(f"{name}: not a response to a query (type=TLSA)"), 0
    chain = response.resolve_chaining()
    if len(chain.cnames) > MAX_CNAME_CHAIN:
        return DnsTempFail(f"{name}: CNAME chain longer than {MAX_CNAME_CHAIN} (type=TLSA)"), 0
    try:
        found, ttl = answer_rdatas(response.wire or b"", chain.canonical_name, dns.rdatatype.TLSA)
    except dns.exception.DNSException as err:  # cut short, bad pointers: the message itself
        return DnsTempFail(f"{name}: malformed DNS response (type=TLSA): {err}"), 0
    if not found:
        return _NoData(_is_secure(response)), _NEGATIVE_TTL
    rdatas = tuple(
        dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, data) for data in found
    )
    canonical = normalise_host(chain.canonical_name.to_text())
    return _RRset(rdatas, secure=_is_secure(response), canonical=canonical), float(ttl)


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


class _Nameserver(dns.nameserver.Do53Nameserver):
    """A Do53 nameserver whose responses are parsed with ``continue_on_error``.

    dnspython's own exchange drops a response holding one rdata it refuses and waits for
    another until the query times out. Here the exchange is the same (UDP, TCP when the
    resolver asks after truncation) but the response is kept with the refused records
    listed in ``Message.errors``, for TLSA only (``DnsClient._ask`` rereads them from the
    wire); for any other type such a response is still ignored, as dnspython does.
    """

    async def async_query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,  # noqa: ASYNC109 - the signature dnspython calls
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: dns._asyncbackend.Backend,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        if source is not None or source_port or one_rr_per_rrset or ignore_trailing:
            return await super().async_query(  # options we never set: dnspython's exchange
                request, timeout, source, source_port, max_size, backend
            )
        deadline = time.monotonic() + timeout
        af = dns.inet.af_for_address(self.address)
        if max_size:
            return await self._tcp(request, af, deadline, backend)
        return await self._udp(request, af, deadline, backend)

    async def _udp(
        self,
        request: dns.message.QueryMessage,
        af: int,
        deadline: float,
        backend: dns._asyncbackend.Backend,
    ) -> dns.message.Message:
        target = (self.address, self.port)
        # dnspython's backend API is not annotated; these are its documented calls.
        connected = target if backend.datagram_connection_required() else None  # type: ignore[no-untyped-call]
        sock = await backend.make_socket(af, socket.SOCK_DGRAM, 0, None, connected)  # type: ignore[no-untyped-call]
        async with sock:
            await sock.sendto(request.to_wire(), target, _left(deadline))
            while True:
                wire, sender = await sock.recvfrom(65535, _left(deadline))
                if not _same_address(sender, target):
                    continue
                response = _lenient_response(wire, request, truncation=True)
                if response is not None:
                    return response

    async def _tcp(
        self,
        request: dns.message.QueryMessage,
        af: int,
        deadline: float,
        backend: dns._asyncbackend.Backend,
    ) -> dns.message.Message:
        target = (self.address, self.port)
        sock = await backend.make_socket(  # type: ignore[no-untyped-call]
            af, socket.SOCK_STREAM, 0, None, target, _left(deadline)
        )
        async with sock:
            await dns.asyncquery.send_tcp(sock, request, time.time() + _left(deadline))
            size = int.from_bytes(await _read_exactly(sock, 2, deadline), "big")
            wire = await _read_exactly(sock, size, deadline)
        response = _lenient_response(wire, request, truncation=False)
        if response is None:
            raise dns.query.BadResponse
        return response


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; ``Timeout`` once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise dns.exception.Timeout
    return left


async def _read_exactly(sock: dns._asyncbackend.StreamSocket, count: int, deadline: float) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await sock.recv(count - len(data), _left(deadline))  # type: ignore[no-untyped-call]
        if not chunk:
            raise EOFError("EOF")
        data += chunk
    return data


def _same_address(sender: object, target: tuple[str, int]) -> bool:
    """The datagram came from the nameserver asked (spoofed or stray ones are skipped)."""
    if not isinstance(sender, tuple) or len(sender) < 2:
        return False
    try:
        same = ipaddress.ip_address(str(sender[0])) == ipaddress.ip_address(target[0])
    except ValueError:
        return False
    return same and sender[1] == target[1]


def _lenient_response(
    wire: bytes, request: dns.message.QueryMessage, *, truncation: bool
) -> dns.message.Message | None:
    """``wire`` as the response to ``request``, or ``None`` to keep waiting for one.

    Records dnspython refuses are listed in ``errors`` and, for a TLSA question, the
    response is kept (``_rdata_from_wire`` reads them); for any other question such a
    response counts as unreadable, as in dnspython's own exchange.
    """
    try:
        response = dns.message.from_wire(
            wire, continue_on_error=True, raise_on_truncation=truncation
        )
    except dns.message.Truncated as err:
        partial = err.kwargs.get("message")
        if isinstance(partial, dns.message.Message) and request.is_response(partial):
            raise
        return None
    except Exception:  # not a DNS message at all
        return None
    if not request.is_response(response):
        return None
    if response.errors and request.question[0].rdtype != dns.rdatatype.TLSA:
        return None
    return response
