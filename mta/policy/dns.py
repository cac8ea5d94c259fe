"""DNS lookups for delivery (MX, A, AAAA) on dnspython's asyncio resolver, as typed results.

This is the I/O edge for DNS: every dnspython exception is translated here, once, into
one of the result types below, and nothing above this module sees ``dns.*`` errors.
Absent and temporarily unknown are different results (STYLE.md C.3): NXDOMAIN is
``NoDomain`` (bounce), a timeout or SERVFAIL is ``DnsTempFail`` (defer), NODATA for MX
is ``MxHosts(())`` (the implicit MX of RFC 5321 §5.1).

dnspython does not validate DNSSEC and does not read /etc/hosts: with no resolvers
configured it uses the system's resolv.conf nameservers.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from mta.config import Resolver
from mta.errors import ConfigError
from mta.policy.mx import MxRecord, is_null_mx, normalise_host

_PER_TRY_TIMEOUT: Final = 2.0  # one query to one nameserver; the lifetime bounds the whole


@dataclass(frozen=True, slots=True)
class MxHosts:
    """The domain's MX RRset; empty when the domain exists but has no MX (implicit MX)."""

    records: tuple[MxRecord, ...]


@dataclass(frozen=True, slots=True)
class NullMx:
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""


@dataclass(frozen=True, slots=True)
class NoDomain:
    """The name does not exist (NXDOMAIN), has no address, or is not a valid name."""

    reason: str


@dataclass(frozen=True, slots=True)
class DnsTempFail:
    """The answer is unknown for now (timeout, SERVFAIL, no nameserver answered)."""

    reason: str


@dataclass(frozen=True, slots=True)
class AddressesFound:
    """IP addresses of a host, IPv4 first, then IPv6."""

    addresses: tuple[str, ...]


MxLookup = MxHosts | NullMx | NoDomain | DnsTempFail
AddressLookup = AddressesFound | NoDomain | DnsTempFail


@dataclass(frozen=True, slots=True)
class _NoData:
    """The name exists but has no records of the asked type."""


class DnsClient:
    """MX and address lookups through the configured resolvers (or the system's).

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
        resolver.cache = None
        self._resolver = resolver

    async def mx(self, domain: str) -> MxLookup:
        """The MX RRset of ``domain`` (RFC 7505 null MX recognised)."""
        answer = await self._query(domain, dns.rdatatype.MX)
        if isinstance(answer, NoDomain | DnsTempFail):
            return answer
        if isinstance(answer, _NoData):
            return MxHosts(())
        records = tuple(
            MxRecord(rdata.preference, normalise_host(rdata.exchange.to_text()))
            for rdata in answer
            if isinstance(rdata, MX)
        )
        if is_null_mx(records):
            return NullMx()
        return MxHosts(records)

    async def addresses(self, host: str) -> AddressLookup:
        """The A then AAAA addresses of ``host``; an IP literal is returned as is."""
        if _is_ip(host):
            return AddressesFound((host,))
        results = await asyncio.gather(
            self._query(host, dns.rdatatype.A), self._query(host, dns.rdatatype.AAAA)
        )
        found: list[str] = []
        for answer in results:
            if isinstance(answer, list):
                found += [str(rdata) for rdata in answer]
        if found:
            return AddressesFound(tuple(dict.fromkeys(found)))
        for answer in results:
            if isinstance(answer, DnsTempFail):
                return answer
        for answer in results:
            if isinstance(answer, NoDomain):
                return answer
        return NoDomain(f"{host} has no A or AAAA record")

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> list[object] | _NoData | NoDomain | DnsTempFail:
        """One query; dnspython's exceptions become results here and nowhere else."""
        kind = dns.rdatatype.to_text(rdtype)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as err:
            return NoDomain(f"invalid domain name {name!r}: {err}")
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return NoDomain(f"{name}: host not found (NXDOMAIN, type={kind})")
        except dns.resolver.NoAnswer:
            return _NoData()
        except dns.resolver.NoNameservers:
            return DnsTempFail(f"{name}: no nameserver answered (SERVFAIL, type={kind})")
        except dns.exception.Timeout:
            return DnsTempFail(f"{name}: DNS timeout (type={kind})")
        except dns.exception.DNSException as err:
            return DnsTempFail(f"{name}: DNS error (type={kind}): {err}")
        return list(answer)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
