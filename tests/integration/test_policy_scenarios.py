"""Destination policy end to end: DANE and MTA-STS against real servers, through the relay.

One world for the module: knot serves a DNSSEC-signed ``test.`` with a child zone per
scenario, unbound validates it, HTTPS servers publish MTA-STS policies with certificates
from a test CA, and receiving SMTP servers present the certificates each scenario needs.
One relay process delivers a message to every scenario domain; each test then compares
what the relay did with what we expect and with what ``mta check --connect --json``
predicts, since both must come from the same decision.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.receivers import ReceivedMessage, Receiver, TlsMode
from tests.integration.relayproc import RelayProcess, common_port, wait_until
from tests.integration.stsserver import StsServer

SENDER = "alice@sender.test"
STS_ID = "20261129T1"


def spki_sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def cert_sha256(ca: trustme.CA) -> str:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass
class Scenario:
    """One destination domain: what it publishes, what its MX presents, what must happen."""

    domain: str
    expected: str  # "deliver" | "defer"
    reason: str | None  # the RFC 8460 result type of a deferral
    mx_ip: str
    records: list[str] = field(default_factory=list)
    signed: bool = True
    bogus: bool = False
    tls: TlsMode = "fs"
    cert: trustme.LeafCert | None = None
    sts_policy: str | None = None  # served at https://mta-sts.<domain>/.well-known/mta-sts.txt
    sts_ip: str | None = None
    verified: bool | None = None  # the peer authenticated (when delivered)
    shares: str | None = None  # use this other scenario domain's MX host (and receiver)


@dataclass
class World:
    scenarios: dict[str, Scenario]
    receivers: dict[str, Receiver]
    sts_servers: dict[str, StsServer]
    relay: RelayProcess


def build_scenarios(ca: trustme.CA, smtp_port: int) -> list[Scenario]:
    """The table the issue asks for; each scenario gets its own MX address."""
    ta = ca.create_child_ca()
    rogue = trustme.CA()  # nobody trusts it
    tlsa = f"_{smtp_port}._tcp.mx"

    def leaf(issuer: trustme.CA, domain: str) -> trustme.LeafCert:
        return issuer.issue_cert(f"mx.{domain}")

    out: list[Scenario] = []

    def add(domain: str, expected: str, reason: str | None, **kw: object) -> Scenario:
        ip = f"127.0.0.{60 + len(out)}"
        scenario = Scenario(domain, expected, reason, ip, **kw)  # type: ignore[arg-type]
        if scenario.shares:
            scenario.records = [f"@ MX 10 mx.{scenario.shares}.", *scenario.records]
        else:
            scenario.records = ["@ MX 10 mx", f"mx A {ip}", *scenario.records]
        out.append(scenario)
        return scenario

    ee = leaf(rogue, "dane-ee.test")  # DANE-EE needs no CA at all
    add(
        "dane-ee.test",
        "deliver",
        None,
        cert=ee,
        verified=True,
        records=[f"{tlsa} TLSA 3 1 1 {spki_sha256(ee)}"],
    )
    add(
        "dane-ta.test",
        "deliver",
        None,
        cert=leaf(ta, "dane-ta.test"),
        verified=True,
        records=[f"{tlsa} TLSA 2 0 1 {cert_sha256(ta)}"],
    )
    malformed = leaf(rogue, "dane-malformed.test")
    add(  # one malformed record (a 31-byte SHA-256 digest) beside the good one (issue 8 §3)
        "dane-malformed.test",
        "deliver",
        None,
        cert=malformed,
        verified=True,
        records=[
            f"{tlsa} TLSA \\# 34 030101{'ee' * 31}",
            f"{tlsa} TLSA 3 1 1 {spki_sha256(malformed)}",
        ],
    )
    add(
        "dane-mismatch.test",
        "defer",
        "validation-failure",
        cert=leaf(ca, "dane-mismatch.test"),
        records=[f"{tlsa} TLSA 3 1 1 {'00' * 32}"],
    )
    add(
        "dane-unusable.test",
        "deliver",
        None,
        cert=leaf(rogue, "dane-unusable.test"),
        verified=False,
        records=[f"{tlsa} TLSA 0 0 1 {'11' * 32}", f"{tlsa} TLSA 1 1 1 {'22' * 32}"],
    )
    add(
        "dane-nostarttls.test",
        "defer",
        "starttls-not-supported",
        tls="none",
        records=[f"{tlsa} TLSA 3 1 1 {'33' * 32}"],
    )
    add(
        "insecure.test",
        "deliver",
        None,
        signed=False,
        cert=leaf(rogue, "insecure.test"),
        verified=False,
        records=[f"{tlsa} TLSA 3 1 1 {'44' * 32}"],
    )
    add("bogus.test", "defer", "dnssec-invalid", bogus=True, cert=leaf(ca, "bogus.test"))

    def sts(
        domain: str, mode: str, mx: str, expected: str, reason: str | None, **kw: object
    ) -> None:
        scenario = add(domain, expected, reason, signed=False, **kw)
        scenario.sts_ip = f"127.0.0.{100 + len(out)}"
        scenario.sts_policy = f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"
        scenario.records += [f'_mta-sts TXT "v=STSv1; id={STS_ID}"', f"mta-sts A {scenario.sts_ip}"]

    sts(
        "sts-good.test",
        "enforce",
        "mx.sts-good.test",
        "deliver",
        None,
        cert=leaf(ca, "sts-good.test"),
        verified=True,
    )
    sts(
        "sts-mx-mismatch.test",
        "enforce",
        "mx.elsewhere.test",
        "defer",
        "validation-failure",
        cert=leaf(ca, "sts-mx-mismatch.test"),
    )
    sts(
        "sts-untrusted.test",
        "enforce",
        "*.sts-untrusted.test",
        "defer",
        "certificate-not-trusted",
        cert=leaf(rogue, "sts-untrusted.test"),
    )
    sts(
        "sts-testing.test",
        "testing",
        "mx.sts-testing.test",
        "deliver",
        None,
        cert=leaf(rogue, "sts-testing.test"),
        verified=False,
    )
    sts(
        "sts-nostarttls.test",
        "enforce",
        "mx.sts-nostarttls.test",
        "defer",
        "starttls-not-supported",
        tls="none",
    )
    sts(
        "sts-cached.test",
        "enforce",
        "mx.sts-cached.test",
        "deliver",
        None,
        cert=leaf(ca, "sts-cached.test"),
        verified=True,
    )
    # Shares sts-untrusted.test's MX (whose certificate fails PKIX) but has no policy of
    # its own: that neighbour's MTA-STS policy must not change how its mail goes.
    add("sts-neighbour.test", "deliver", None, signed=False, shares="sts-untrusted.test")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("policy-world")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hosts = [f"127.0.0.{60 + i}" for i in range(20)] + [f"127.0.0.{100 + i}" for i in range(20)]
    smtp_port = common_port(hosts)
    https_port = common_port(hosts)
    scenarios = build_scenarios(ca, smtp_port)

    lab = DnsLab(work / "dns")
    for s in scenarios:
        lab.add_zone(s.domain, s.records, signed=s.signed, bogus=s.bogus)
    resolver_host, resolver_port = lab.start()

    receivers: dict[str, Receiver] = {}
    sts_servers: dict[str, StsServer] = {}
    relay = RelayProcess(
        work,
        f'[dns]\nresolvers = ["{resolver_host}:{resolver_port}"]\ndnssec_probe = "{PROBE}"\n'
        f'[tls]\nca_file = "{ca_file}"\n'
        f'[outbound]\nport = {smtp_port}\nretry_min = "1h"\nretry_max = "2h"\n'
        f"[mta_sts]\nport = {https_port}\n",
    )
    try:
        for s in scenarios:
            if s.shares:
                receivers[s.domain] = receivers[s.shares]
                continue
            receivers[s.domain] = Receiver(
                s.mx_ip, smtp_port, tls=s.tls, ca=ca, cert=s.cert
            ).start()
            if s.sts_policy is not None:
                assert s.sts_ip is not None
                server = StsServer(s.sts_ip, https_port, cert=ca.issue_cert(f"mta-sts.{s.domain}"))
                server.set_policy(s.sts_policy)
                sts_servers[s.domain] = server.start()
        relay.start()
        for s in scenarios:
            relay.send(SENDER, [f"user@{s.domain}"], f"Subject: to {s.domain}\r\n\r\nhello\r\n")
        yield World({s.domain: s for s in scenarios}, receivers, sts_servers, relay)
    finally:
        relay.stop()
        for receiver in set(receivers.values()):
            receiver.stop()
        for server in sts_servers.values():
            server.stop()
        lab.stop()


def deferred_reason(world: World, domain: str) -> str | None:
    for entry in world.relay.queue():
        if entry["domains"] == [domain] and entry["last_error"]:
            error: str = entry["last_error"]
            return error.rsplit("(", 1)[-1].rstrip(")") if error.endswith(")") else error
    return None


def arrived(world: World, domain: str) -> list[ReceivedMessage]:
    """The messages for ``domain`` its MX host received (some hosts serve two domains)."""
    return [
        m
        for m in world.receivers[domain].messages
        if any(r.endswith(f"@{domain}") for r in m.rcpt_tos)
    ]


def observe(world: World, domain: str) -> tuple[str, str | None]:
    """What the relay did with the message to ``domain``: delivered, or deferred and why."""
    outcome: list[tuple[str, str | None]] = []

    def settled() -> bool:
        if arrived(world, domain):
            outcome.append(("deliver", None))
            return True
        reason = deferred_reason(world, domain)
        if reason is not None:
            outcome.append(("defer", reason))
            return True
        return False

    wait_until(settled, 30, f"the relay to deliver or defer mail for {domain}")
    return outcome[0]


def check(world: World, domain: str) -> dict[str, object]:
    result = world.relay.mta("check", domain, "--connect", "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


SCENARIOS = [
    "dane-ee.test",
    "dane-malformed.test",
    "dane-ta.test",
    "dane-mismatch.test",
    "dane-unusable.test",
    "dane-nostarttls.test",
    "insecure.test",
    "bogus.test",
    "sts-good.test",
    "sts-mx-mismatch.test",
    "sts-untrusted.test",
    "sts-testing.test",
    "sts-nostarttls.test",
    "sts-cached.test",
    "sts-neighbour.test",
]


@pytest.mark.parametrize("domain", SCENARIOS)
def test_relay_and_check_agree_with_the_expected_outcome(world: World, domain: str) -> None:
    scenario = world.scenarios[domain]
    observed = observe(world, domain)
    assert observed == (scenario.expected, scenario.reason)
    if scenario.expected == "deliver":
        (got,) = arrived(world, domain)[:1]
        assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    else:
        assert arrived(world, domain) == []
    predicted = check(world, domain)
    assert (predicted["verdict"], predicted["reason"]) == observed


EXPECTED_SOURCES = {
    "dane-ee.test": ("dane", "dane"),
    "dane-ta.test": ("dane", "dane"),
    "dane-unusable.test": ("dane", "encrypt"),
    "insecure.test": ("default", "encrypt"),
    "sts-good.test": ("mta-sts", "verify"),
    "sts-testing.test": ("mta-sts-testing", "encrypt"),
}


@pytest.mark.parametrize(("domain", "expected"), EXPECTED_SOURCES.items())
def test_check_explains_the_policy_source(
    world: World, domain: str, expected: tuple[str, str]
) -> None:
    doc = check(world, domain)
    policy = doc["policy"]
    assert isinstance(policy, dict)
    assert (policy["source"], policy["level"]) == expected
    assert doc["domain"] == domain
    mx = doc["mx"]
    assert isinstance(mx, list)
    assert mx[0]["host"] == f"mx.{domain}"


def test_dane_ee_check_reports_the_matching_record_and_the_peer(world: World) -> None:
    doc = check(world, "dane-ee.test")
    assert doc["dnssec"]["mx"] == "secure"  # type: ignore[index]
    assert doc["dnssec"]["validation"] == "validating"  # type: ignore[index]
    (host,) = doc["mx"]  # type: ignore[misc]
    assert host["tlsa"]["status"] == "usable"
    assert host["tlsa"]["records"][0].startswith("3 1 1 ")
    (probe,) = host["connect"]
    assert probe["forward_secret"] is True
    assert probe["verification"]["ok"] is True
    assert probe["certificate"]["dns_names"] == ["mx.dane-ee.test"]


def test_a_malformed_tlsa_record_does_not_hide_the_good_one(world: World) -> None:
    """Issue 8 §3: delivered, DANE-verified through the good record; and the TLSA owner
    named is the one for ``outbound.port`` (issue 8 §5), not ``_25._tcp``."""
    assert observe(world, "dane-malformed.test") == ("deliver", None)
    doc = check(world, "dane-malformed.test")
    (host,) = doc["mx"]  # type: ignore[misc]
    assert host["tlsa"]["status"] == "usable"
    assert len(host["tlsa"]["records"]) == 1  # the good one; the short one is ignored
    (probe,) = host["connect"]
    assert probe["verification"]["ok"] is True
    assert "DANE-EE" in probe["verification"]["detail"]
    text = world.relay.mta("check", "dane-malformed.test").stdout
    assert "_25._tcp" not in text
    assert f"_{doc['port']}._tcp.mx.dane-malformed.test" in host["requirement"]["why"]


def test_mta_sts_check_shows_the_policy(world: World) -> None:
    doc = check(world, "sts-good.test")
    sts = doc["mta_sts"]
    assert isinstance(sts, dict)
    assert sts["id"] == STS_ID
    assert sts["mode"] == "enforce"
    assert sts["mx"] == ["mx.sts-good.test"]
    assert sts["max_age"] == 86400
    assert sts["state"] in ("fresh", "cached")


def test_testing_mode_failure_is_recorded(world: World) -> None:
    assert observe(world, "sts-testing.test") == ("deliver", None)
    assert "deliver.tls.report_only" in world.relay.log
    assert "mx=mx.sts-testing.test" in world.relay.log


def test_cached_policy_is_used_while_the_policy_server_is_down(world: World) -> None:
    assert observe(world, "sts-cached.test") == ("deliver", None)
    server = world.sts_servers["sts-cached.test"]
    asked = server.request_count
    server.stop()
    world.relay.send(SENDER, ["again@sts-cached.test"], "Subject: again\r\n\r\nhello again\r\n")
    world.receivers["sts-cached.test"].wait_for(2, timeout=30)
    doc = check(world, "sts-cached.test")
    assert doc["mta_sts"]["state"] == "cached"  # type: ignore[index]
    assert doc["mta_sts"]["mode"] == "enforce"  # type: ignore[index]
    assert doc["verdict"] == "deliver"
    assert server.request_count == asked  # nothing was fetched while it was down


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        # issue 8 §4: the requirement enforced on the host, not the domain's default
        ("dane-ee.test", "policy=dane/dane verified=dane-ee"),
        ("dane-ta.test", "policy=dane/dane verified=dane-ta"),
        ("dane-unusable.test", "policy=dane/encrypt verified=none"),
        ("insecure.test", "policy=default/encrypt verified=none"),
        ("sts-good.test", "policy=mta-sts/verify verified=pkix"),
    ],
)
def test_the_relay_logs_the_policy_with_each_result(
    world: World, domain: str, expected: str
) -> None:
    observe(world, domain)
    lines = [line for line in world.relay.log.splitlines() if "deliver.result" in line]
    line = next(line for line in lines if f"domain={domain}" in line)
    policy, verified = expected.split()
    assert policy in line.split()
    assert verified in line.split()
    assert "tls=TLSv1.3" in line
    assert f"mx=mx.{domain}" in line
    assert f"address={world.scenarios[domain].mx_ip}" in line
