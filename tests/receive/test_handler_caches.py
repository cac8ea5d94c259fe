"""The per-message helpers cached for speed give what the uncached code gave."""

from __future__ import annotations

import datetime
import email.utils
import ipaddress

import pytest

from mta.receive.handler import _in_networks, peer_ip, received_header


@pytest.mark.parametrize("now", [0.0, 1.999, 1_764_820_000.5, 1_764_820_001.0])
def test_received_date_is_the_second_the_message_came(now: float) -> None:
    header = received_header(
        helo="c.test", ip="127.0.0.1", hostname="mx.test", protocol="ESMTPS", tls="", now=now
    )
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    assert header.endswith(f"\t{email.utils.format_datetime(moment)}\r\n".encode())


@pytest.mark.parametrize(
    ("peer", "shown"),
    [
        (("::ffff:192.0.2.7", 25, 0, 0), "192.0.2.7"),
        (("fe80::1%eth0", 25, 0, 2), "fe80::1"),
        (("192.0.2.7", 25), "192.0.2.7"),
        (("not an address", 25), ""),
        (None, ""),
    ],
)
def test_peer_ip(peer: object, shown: str) -> None:
    assert peer_ip(peer) == shown
    assert peer_ip(peer) == shown  # the cached answer too


def test_network_membership_follows_a_reload_of_the_networks() -> None:
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    other = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("::1/128"))
    assert _in_networks("127.0.0.1", loopback)
    assert not _in_networks("127.0.0.1", other)
    assert _in_networks("::1", other)
    assert not _in_networks("::1", loopback)
