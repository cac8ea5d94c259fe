"""REQUIRETLS and ``TLS-Required: No`` end to end (RFC 8689 §4.2, §5), through the relay.

One world: the DNSSEC lab (knot + unbound) publishes a DANE domain and an MTA-STS
domain whose MX hosts advertise REQUIRETLS, a DANE domain whose MX does not, a plain
domain (no policy: ``encrypt``) whose MX does, and an MTA-STS domain whose MX presents a
certificate nobody trusts. The sender's own domain has an MX that advertises REQUIRETLS
too, so the bounce (DSN) can be seen arriving *without* it. The relay runs with
``honour_tls_required_no = true``; the default (off) is tested in tests/deliver.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme

from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.receivers import ReceivedMessage, Receiver
from tests.integration.relayproc import RelayProcess, client_tls, common_port, wait_until
from tests.integration.stsserver import StsServer
from tests.integration.test_policy_scenarios import STS_ID, spki_sha256

SENDER = "alice@sender-rt.test"
BODY = "secret body line"


@dataclass
class World:
    relay: RelayProcess
    receivers: dict[str, Receiver]


def _send(relay: RelayProcess, rcpt: str, *, requiretls: bool, headers: str = "") -> None:
    message = f"Subject: to {rcpt}\r\n{headers}\r\n{BODY}\r\n"
    with relay.smtp(starttls=False) as smtp:
        smtp.starttls(context=client_tls())
        options = ["REQUIRETLS"] if requiretls else []
        assert smtp.sendmail(SENDER, [rcpt], message, mail_options=options) == {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("requiretls-world")
    ca, rogue = trustme.CA(), trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ips = {
        "dane-rt.test": "127.0.0.140",
        "dane-nort.test": "127.0.0.141",
        "sts-rt.test": "127.0.0.142",
        "plain-rt.test": "127.0.0.143",
        "sts-rogue.test": "127.0.0.144",
        "sender-rt.test": "127.0.0.145",
    }
    sts_ips = {"sts-rt.test": "127.0.0.150", "sts-rogue.test": "127.0.0.151"}
    smtp_port = common_port([*ips.values(), *sts_ips.values()])
    https_port = common_port(list(sts_ips.values()))
    tlsa = f"_{smtp_port}._tcp.mx"
    certs = {
        "dane-rt.test": rogue.issue_cert("mx.dane-rt.test"),  # DANE-EE needs no CA
        "dane-nort.test": rogue.issue_cert("mx.dane-nort.test"),
        "sts-rt.test": ca.issue_cert("mx.sts-rt.test"),
        "plain-rt.test": ca.issue_cert("mx.plain-rt.test"),
        "sts-rogue.test": rogue.issue_cert("mx.sts-rogue.test"),
        "sender-rt.test": ca.issue_cert("mx.sender-rt.test"),
    }
    lab = DnsLab(work / "dns")
    for domain, ip in ips.items():
        records = ["@ MX 10 mx", f"mx A {ip}"]
        signed = domain.startswith("dane")
        if signed:
            records.append(f"{tlsa} TLSA 3 1 1 {spki_sha256(certs[domain])}")
        if domain in sts_ips:
            records += [f'_mta-sts TXT "v=STSv1; id={STS_ID}"', f"mta-sts A {sts_ips[domain]}"]
        lab.add_zone(domain, records, signed=signed, bogus=False)
    resolver_host, resolver_port = lab.start()
    receivers: dict[str, Receiver] = {}
    sts_servers: list[StsServer] = []
    relay = RelayProcess(
        work,
        f'[dns]\nresolvers = ["{resolver_host}:{resolver_port}"]\ndnssec_probe = "{PROBE}"\n'
        f'[tls]\nca_file = "{ca_file}"\n'
        f'[outbound]\nport = {smtp_port}\nretry_min = "1h"\nretry_max = "2h"\n'
        "honour_tls_required_no = true\n"
        f"[mta_sts]\nport = {https_port}\n",
    )
    try:
        for domain, ip in ips.items():
            advertises = domain != "dane-nort.test"
            receivers[domain] = Receiver(
                ip, smtp_port, tls="fs", ca=ca, cert=certs[domain], requiretls=advertises
            ).start()
        for domain, ip in sts_ips.items():
            server = StsServer(ip, https_port, cert=ca.issue_cert(f"mta-sts.{domain}"))
            server.set_policy(f"version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 86400\n")
            sts_servers.append(server.start())
        relay.start()
        yield World(relay, receivers)
    finally:
        relay.stop()
        for receiver in receivers.values():
            receiver.stop()
        for server in sts_servers:
            server.stop()
        lab.stop()


def _arrived(world: World, domain: str, rcpt: str) -> ReceivedMessage:
    receiver = world.receivers[domain]
    found: list[ReceivedMessage] = []

    def here() -> bool:
        found[:] = [m for m in receiver.messages if rcpt in m.rcpt_tos]
        return bool(found)

    wait_until(here, 30, f"a message for {rcpt}")
    return found[0]


def _bounce_for(world: World, rcpt: str) -> ReceivedMessage:
    """The DSN about ``rcpt`` that reached the sender's MX."""
    sender_mx = world.receivers["sender-rt.test"]
    found: list[ReceivedMessage] = []

    def here() -> bool:
        found[:] = [
            m for m in sender_mx.messages if m.mail_from == "<>" and rcpt.encode() in m.content
        ]
        return bool(found)

    wait_until(here, 30, f"the bounce about {rcpt}")
    return found[0]


@pytest.mark.parametrize("domain", ["dane-rt.test", "sts-rt.test"])
def test_requiretls_goes_to_an_authenticated_peer_that_offers_it(world: World, domain: str) -> None:
    rcpt = f"user@{domain}"
    _send(world.relay, rcpt, requiretls=True)
    got = _arrived(world, domain, rcpt)
    assert "REQUIRETLS" in got.mail_options  # the demand travels on
    assert got.tls_version is not None


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("dane-nort.test", "REQUIRETLS not offered"),
        ("plain-rt.test", "certificate not authenticated (policy default/encrypt)"),
    ],
)
def test_requiretls_bounces_with_5_7_30_and_a_dsn_without_body_or_requiretls(
    world: World, domain: str, why: str
) -> None:
    rcpt = f"user@{domain}"
    _send(world.relay, rcpt, requiretls=True)
    dsn = _bounce_for(world, rcpt)
    assert b"Status: 5.7.30" in dsn.content
    assert why.encode() in dsn.content
    assert BODY.encode() not in dsn.content  # RFC 8689 §5: headers only (RET=HDRS)
    assert "REQUIRETLS" not in dsn.mail_options  # so the bounce is not lost on the way
    assert not [m for m in world.receivers[domain].messages if rcpt in m.rcpt_tos]


def test_tls_required_no_is_delivered_despite_a_failing_mta_sts_check(world: World) -> None:
    rcpt = "relaxed@sts-rogue.test"
    _send(world.relay, rcpt, requiretls=False, headers="TLS-Required: No\r\n")
    got = _arrived(world, "sts-rogue.test", rcpt)
    assert got.tls_version is not None  # still over TLS


def test_without_the_header_the_failing_mta_sts_check_defers(world: World) -> None:
    rcpt = "strict@sts-rogue.test"
    _send(world.relay, rcpt, requiretls=False)

    def deferred() -> bool:
        return any(
            e["domains"] == ["sts-rogue.test"] and "certificate-not-trusted" in str(e["last_error"])
            for e in world.relay.queue()
        )

    wait_until(deferred, 30, "the message to be deferred")
    assert not [m for m in world.receivers["sts-rogue.test"].messages if rcpt in m.rcpt_tos]


def test_requiretls_outranks_tls_required_no(world: World) -> None:
    rcpt = "both@sts-rogue.test"
    _send(world.relay, rcpt, requiretls=True, headers="TLS-Required: No\r\n")

    # RFC 8689 §4.1: the header is ignored; the check fails, so the message waits (4.7.5)
    def deferred() -> bool:
        return any(
            "both@" in str(e) or "certificate-not-trusted" in str(e["last_error"])
            for e in world.relay.queue()
            if e["domains"] == ["sts-rogue.test"]
        )

    wait_until(deferred, 30, "the REQUIRETLS message to wait")
    assert not [m for m in world.receivers["sts-rogue.test"].messages if rcpt in m.rcpt_tos]


def test_requiretls_over_plaintext_to_the_relay_is_refused(world: World) -> None:
    with world.relay.smtp(starttls=False) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("requiretls")
        code, text = smtp.mail(SENDER, ["REQUIRETLS"])
        assert (code, text[:6]) == (530, b"5.7.10")
    assert isinstance(smtp, smtplib.SMTP)
