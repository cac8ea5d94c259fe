"""``mta policy-server`` answering Postfix's own socketmap client (``postmap -q``, from
Debian's postfix: the code smtp(8) uses for ``smtp_tls_policy_maps``) for domains of the
DNSSEC lab and MTA-STS servers, each answer compared with ``mta check``'s decision for
the same domain: both ask the same ``DestinationResolver``."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.postfix.tlspolicy import FLOORS
from tests.integration import postfix
from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.relayproc import common_port, free_port, run_mta
from tests.integration.stsserver import StsServer

POSTMAP = "/usr/sbin/postmap"
FLOOR = " ".join(FLOORS)
STS_ID = "20261203T1"


@dataclass
class Lab:
    policy_file: Path
    home: Path
    table: str  # socketmap:inet:127.0.0.1:PORT:mta
    postfix_dir: Path
    log_file: Path


def spki_sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("policy-server")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sts_hosts = ["127.0.0.140", "127.0.0.141"]
    https_port = common_port(sts_hosts)
    dane_leaf = trustme.CA().issue_cert("mx.dane.test")

    dns = DnsLab(work / "dns")
    dns.add_zone(
        "dane.test",
        ["@ MX 10 mx", "mx A 127.0.0.130", f"_25._tcp.mx TLSA 3 1 1 {spki_sha256(dane_leaf)}"],
    )
    dns.add_zone("plain.test", ["@ MX 10 mx", "mx A 127.0.0.131"])
    dns.add_zone("bogus.test", ["@ MX 10 mx", "mx A 127.0.0.132"], bogus=True)
    servers: list[StsServer] = []
    sts_domains = [("sts.test", "enforce"), ("testing.test", "testing")]
    for ip, (name, mode) in zip(sts_hosts, sts_domains, strict=True):
        dns.add_zone(
            name,
            [
                "@ MX 10 mx",
                "mx A 127.0.0.133",
                f'_mta-sts TXT "v=STSv1; id={STS_ID}"',
                f"mta-sts A {ip}",
            ],
            signed=False,
        )
        server = StsServer(ip, https_port, cert=ca.issue_cert(f"mta-sts.{name}"))
        server.set_policy(f"version: STSv1\nmode: {mode}\nmx: *.{name}\nmax_age: 86400\n")
        servers.append(server.start())
    host, port = dns.start()
    listen = free_port()
    policy_file = work / "relay.toml"
    policy_file.write_text(
        f'[dns]\nresolvers = ["{host}:{port}"]\ndnssec_probe = "{PROBE}"\n'
        f'[tls]\nca_file = "{ca_file}"\n[mta_sts]\nport = {https_port}\n'
        f'[policy_server]\nlisten = "127.0.0.1:{listen}"\n'
    )
    postfix_dir = work / "postfix"
    postfix_dir.mkdir()
    (postfix_dir / "main.cf").write_text("")  # postmap reads a main.cf; ours is empty
    home = work / "var"
    log_file = work / "policy-server.log"
    try:
        with postfix.policy_server(policy_file, home, log_file):
            yield Lab(
                policy_file, home, f"socketmap:inet:127.0.0.1:{listen}:mta", postfix_dir, log_file
            )
    finally:
        for server in servers:
            server.stop()
        dns.stop()


def postmap(lab: Lab, key: str, table: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTMAP, "-c", str(lab.postfix_dir), "-q", key, table or lab.table],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check(lab: Lab, domain: str) -> dict[str, object]:
    result = run_mta("check", domain, "--json", "--config", str(lab.policy_file), home=lab.home)
    assert result.returncode == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


@pytest.mark.parametrize(
    ("domain", "source", "answer"),
    [
        ("dane.test", "dane", f"dane-only {FLOOR}"),
        ("sts.test", "mta-sts", f"secure match=.sts.test servername=hostname {FLOOR}"),
        ("testing.test", "mta-sts-testing", f"encrypt servername=hostname {FLOOR}"),
        ("plain.test", "default", f"encrypt servername=hostname {FLOOR}"),
    ],
)
def test_postfix_gets_the_policy_mta_check_decides(
    lab: Lab, domain: str, source: str, answer: str
) -> None:
    found = postmap(lab, domain)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == answer
    policy = check(lab, domain)["policy"]
    assert isinstance(policy, dict)
    assert policy["source"] == source
    level = answer.split()[0]
    assert policy["level"] == {"dane-only": "dane", "secure": "verify"}.get(level, level)


def test_a_domain_whose_dns_fails_is_a_temporary_error(lab: Lab) -> None:
    found = postmap(lab, "bogus.test")
    assert found.returncode != 0
    assert "temporary error: bogus.test: 451 4.4.3" in found.stderr
    terminal = check(lab, "bogus.test")["terminal"]
    assert isinstance(terminal, dict)
    assert terminal["outcome"] == "deferred"


def test_keys_left_to_postfix_and_unknown_maps(lab: Lab) -> None:
    for key in ("[mx.dane.test]:25", ".dane.test", "127.0.0.1"):
        found = postmap(lab, key)
        assert (found.returncode, found.stdout, found.stderr) == (1, "", ""), key
    other = postmap(lab, "dane.test", lab.table.rsplit(":", 1)[0] + ":other")
    assert other.returncode != 0
    assert "unknown map name 'other'" in other.stderr
