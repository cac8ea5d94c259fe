"""DnsClient against a real DNS server on loopback (UDP on the wire, dnspython unmocked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from mta.config import Resolver
from mta.policy.dns import (
    AddressesFound,
    DnsClient,
    DnsTempFail,
    MxHosts,
    NoDomain,
    NullMx,
)
from mta.policy.mx import MxRecord
from tests.integration.dnsserver import DROP, SERVFAIL, TinyDns, Zone

ZONE: Zone = {
    "example.test": {"MX": ["10 mx1.example.test.", "20 MX2.Example.Test."]},
    "mx1.example.test": {"A": ["127.0.0.21"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.22", "127.0.0.23"]},
    "nullmx.test": {"MX": ["0 ."]},
    "implicit.test": {"A": ["127.0.0.24"]},  # no MX: NODATA
    "v6only.test": {"AAAA": ["::1"]},
    "empty.test": {"TXT": ["nothing here"]},
    "broken.test": SERVFAIL,
    "silent.test": DROP,
}


@pytest.fixture(scope="module")
def server() -> Iterator[TinyDns]:
    with TinyDns(ZONE) as dns_server:
        yield dns_server


def client(server: TinyDns, timeout: float = 2.0) -> DnsClient:
    return DnsClient([Resolver("127.0.0.1", server.port)], timeout)


def test_mx_records_come_back_normalised(server: TinyDns) -> None:
    found = asyncio.run(client(server).mx("example.test"))
    assert isinstance(found, MxHosts)
    assert sorted(found.records, key=lambda r: r.preference) == [
        MxRecord(10, "mx1.example.test"),
        MxRecord(20, "mx2.example.test"),
    ]


def test_null_mx_is_recognised(server: TinyDns) -> None:
    assert asyncio.run(client(server).mx("nullmx.test")) == NullMx()


def test_no_mx_records_means_implicit_mx(server: TinyDns) -> None:
    assert asyncio.run(client(server).mx("implicit.test")) == MxHosts(())


def test_nxdomain_is_no_domain(server: TinyDns) -> None:
    found = asyncio.run(client(server).mx("missing.test"))
    assert isinstance(found, NoDomain)
    assert "NXDOMAIN" in found.reason


def test_servfail_is_a_temporary_failure(server: TinyDns) -> None:
    found = asyncio.run(client(server).mx("broken.test"))
    assert isinstance(found, DnsTempFail)
    assert "SERVFAIL" in found.reason


def test_no_answer_is_a_temporary_failure_within_the_timeout(server: TinyDns) -> None:
    started = time.monotonic()
    found = asyncio.run(client(server, timeout=0.5).mx("silent.test"))
    assert isinstance(found, DnsTempFail)
    assert "timeout" in found.reason
    assert time.monotonic() - started < 3


def test_addresses_ipv4_first_then_ipv6(server: TinyDns) -> None:
    found = asyncio.run(client(server).addresses("mx1.example.test"))
    assert found == AddressesFound(("127.0.0.21", "::1"))


def test_several_a_records(server: TinyDns) -> None:
    found = asyncio.run(client(server).addresses("mx2.example.test"))
    assert isinstance(found, AddressesFound)
    assert sorted(found.addresses) == ["127.0.0.22", "127.0.0.23"]


def test_ipv6_only_host(server: TinyDns) -> None:
    assert asyncio.run(client(server).addresses("v6only.test")) == AddressesFound(("::1",))


def test_ip_literal_needs_no_query(server: TinyDns) -> None:
    before = len(server.queries)
    assert asyncio.run(client(server).addresses("127.0.0.9")) == AddressesFound(("127.0.0.9",))
    assert len(server.queries) == before


@pytest.mark.parametrize("host", ["missing.test", "empty.test"])
def test_host_without_addresses_is_no_domain(server: TinyDns, host: str) -> None:
    assert isinstance(asyncio.run(client(server).addresses(host)), NoDomain)


def test_address_lookup_servfail_is_temporary(server: TinyDns) -> None:
    assert isinstance(asyncio.run(client(server).addresses("broken.test")), DnsTempFail)


def test_invalid_name_is_no_domain_without_a_query(server: TinyDns) -> None:
    before = len(server.queries)
    found = asyncio.run(client(server).mx("bad..name.test"))
    assert isinstance(found, NoDomain)
    assert len(server.queries) == before


def test_every_query_sent_is_observed_by_type_and_result(server: TinyDns) -> None:
    """The metrics' mta_dns_lookups_total: one per query sent, cache hits not counted."""
    seen: list[tuple[str, str]] = []
    dns_client = DnsClient([Resolver("127.0.0.1", server.port)], 0.5, observe=_record(seen))

    async def lookups() -> None:
        await dns_client.mx("example.test")
        await dns_client.mx("example.test")  # cached: no query
        await dns_client.mx("implicit.test")
        await dns_client.mx("missing.test")
        await dns_client.mx("broken.test")
        await dns_client.mx("silent.test")
        await dns_client.txt("empty.test")
        await dns_client.addresses("mx2.example.test")

    asyncio.run(lookups())
    assert seen[:6] == [
        ("MX", "ok"),
        ("MX", "nodata"),
        ("MX", "nxdomain"),
        ("MX", "servfail"),
        ("MX", "timeout"),
        ("TXT", "ok"),
    ]
    assert sorted(seen[6:]) == [("A", "ok"), ("AAAA", "nodata")]  # asked together


def _record(seen: list[tuple[str, str]]) -> Callable[[str, str], None]:
    return lambda rdtype, result: seen.append((rdtype, result))
