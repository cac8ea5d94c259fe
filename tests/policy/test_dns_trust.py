"""When the AD bit of the configured resolvers may be believed (DESIGN.md, DNSSEC)."""

from __future__ import annotations

import pytest

from mta.config import Resolver
from mta.policy.dns import DnsClient, resolver_is_trusted


@pytest.mark.parametrize(
    ("hosts", "trusted", "expected"),
    [
        (["127.0.0.1"], False, True),
        (["127.0.0.53"], False, True),  # all of 127.0.0.0/8 is loopback
        (["127.255.255.254"], False, True),
        (["::1"], False, True),
        (["::ffff:127.0.0.1"], False, True),  # IPv4-mapped loopback
        (["127.0.0.1", "::1"], False, True),
        (["192.0.2.53"], False, False),
        (["10.0.0.53"], False, False),  # private is not loopback: the path can be tampered with
        (["0.0.0.0"], False, False),
        (["::"], False, False),
        (["fe80::1"], False, False),
        (["::ffff:192.0.2.1"], False, False),
        (["127.0.0.1", "192.0.2.53"], False, False),  # one remote resolver spoils the set
        (["https://dns.example/dns-query"], False, False),  # not an address at all
        ([], False, False),  # unknown (system configuration): not trusted unless marked
        (["192.0.2.53"], True, True),  # the operator marked it trusted
        ([], True, True),
    ],
)
def test_resolver_is_trusted(hosts: list[str], trusted: bool, expected: bool) -> None:
    resolvers = [Resolver(host, 53) for host in hosts]
    assert resolver_is_trusted(resolvers, trusted) is expected


def test_port_does_not_matter() -> None:
    assert resolver_is_trusted([Resolver("127.0.0.1", 5353)], False)


def test_client_reports_the_resolvers_it_queries() -> None:
    resolvers = (Resolver("127.0.0.1", 5353), Resolver("::1", 53))
    client = DnsClient(resolvers, timeout=1.0)
    assert client.resolvers == resolvers
    assert resolver_is_trusted(client.resolvers, False)
