"""STARTTLS stripping: a man in the middle hides STARTTLS, or answers it with 454.

Whatever says TLS is required for a destination -- the default level ``encrypt``, a
local ``verify`` policy, DANE (a DNSSEC-signed TLSA record for the MX host) or an
MTA-STS ``enforce`` policy -- the relay defers with ``starttls-not-supported`` and never
sends a single mail command in plaintext. The same destinations, through the same man
in the middle in ``pass`` mode, do get their mail: the deferral is the stripping's doing.

One world for the module: a DNSSEC lab (knot + unbound) with a zone per destination,
whose MX host is a ``StrippingProxy`` in front of one real receiving server; an HTTPS
server publishes the MTA-STS policy. Delivery runs through ``DeliveryAgent`` in-process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.config import Config, validate
from mta.model import DeliveryResult, Outcome
from tests.integration import outbound
from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.hostile import ProxyMode, StrippingProxy
from tests.integration.receivers import Receiver
from tests.integration.relayproc import common_port
from tests.integration.stsserver import StsServer

RECEIVER_IP = "127.0.0.164"
STS_IP = "127.0.0.165"
PROXY_IPS = {
    "encrypt-strip.test": "127.0.0.166",
    "verify-strip.test": "127.0.0.167",
    "dane-strip.test": "127.0.0.168",
    "sts-strip.test": "127.0.0.169",
}
DOMAINS = list(PROXY_IPS)
CONTENT = b"Subject: stripping\r\n\r\nsecret\r\n"


def spki_sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@dataclass
class World:
    config: Config
    receiver: Receiver
    proxies: dict[str, StrippingProxy]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("stripping")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert(*(f"mx.{domain}" for domain in DOMAINS))
    smtp_port = common_port(list(PROXY_IPS.values()))
    https_port = common_port([STS_IP])

    lab = DnsLab(work / "dns")
    for domain, ip in PROXY_IPS.items():
        records = ["@ MX 10 mx", f"mx A {ip}"]
        if domain == "dane-strip.test":
            records.append(f"_{smtp_port}._tcp.mx TLSA 3 1 1 {spki_sha256(leaf)}")
        if domain == "sts-strip.test":
            records += ['_mta-sts TXT "v=STSv1; id=strip1"', f"mta-sts A {STS_IP}"]
        lab.add_zone(domain, records, signed=domain == "dane-strip.test")
    resolver_host, resolver_port = lab.start()

    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "dns": {
            "resolvers": [f"{resolver_host}:{resolver_port}"],
            "timeout": "5s",
            "dnssec_probe": PROBE,
        },
        "tls": {"ca_file": str(ca_file)},
        "mta_sts": {"port": https_port, "cache_file": str(work / "sts-cache.json")},
        "outbound": {"port": smtp_port, "connect_timeout": "5s", "command_timeout": "5s"},
        "domain": [{"name": "verify-strip.test", "level": "verify"}],
    }
    config = validate(raw, "test.toml", work)
    sts = StsServer(STS_IP, https_port, cert=ca.issue_cert("mta-sts.sts-strip.test"))
    sts.set_policy("version: STSv1\nmode: enforce\nmx: mx.sts-strip.test\nmax_age: 86400\n")
    proxies: dict[str, StrippingProxy] = {}
    try:
        receiver = Receiver(RECEIVER_IP, tls="fs", ca=ca, cert=leaf).start()
        sts.start()
        for domain, ip in PROXY_IPS.items():
            proxy = StrippingProxy(ip, smtp_port, (RECEIVER_IP, receiver.port))
            proxies[domain] = proxy
            proxy.start()
        yield World(config, receiver, proxies)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        sts.stop()
        receiver.stop()
        lab.stop()


def deliver(config: Config, domain: str) -> DeliveryResult:
    return outbound.deliver(config, domain, [f"bob@{domain}"], CONTENT)


def through(world: World, domain: str, mode: ProxyMode) -> tuple[DeliveryResult, bytes, int]:
    """Deliver to ``domain`` with its man in the middle in ``mode``: the result, the
    plaintext the proxy saw from us, and how many messages the receiver got."""
    proxy = world.proxies[domain]
    proxy.mode, proxy.plaintext = mode, b""
    before = len(world.receiver.messages)
    result = deliver(world.config, domain)
    return result, proxy.plaintext, len(world.receiver.messages) - before


@pytest.mark.parametrize("domain", DOMAINS)
def test_without_the_stripping_the_mail_goes_over_tls(world: World, domain: str) -> None:
    result, plaintext, arrived = through(world, domain, "pass")
    assert [r.outcome for r in result.results] == [Outcome.SENT]
    assert arrived == 1
    assert world.receiver.messages[-1].tls_version is not None
    # the policy under test was in force: every one but encrypt authenticated the peer
    assert result.tls is not None
    assert result.tls.peer_verified is (domain != "encrypt-strip.test")
    assert b"MAIL FROM" not in plaintext
    assert plaintext.split(b"\r\n")[1] == b"STARTTLS"


@pytest.mark.parametrize("mode", ["hide", "454"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_stripped_starttls_defers_and_sends_nothing_in_clear(
    world: World, domain: str, mode: ProxyMode
) -> None:
    result, plaintext, arrived = through(world, domain, mode)
    ((outcome, code, enhanced, reason),) = {
        (r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in result.results
    }
    assert (outcome, code, enhanced, reason) == (
        Outcome.DEFERRED,
        451,
        "4.7.5",
        "starttls-not-supported",
    )
    assert arrived == 0
    assert plaintext.startswith(b"EHLO ")
    for command in (b"MAIL FROM", b"RCPT TO", b"DATA", b"AUTH"):
        assert command not in plaintext
