"""TLS-RPT end to end, through real servers: the DNSSEC lab (knot + unbound) publishes
DANE, MTA-STS and plain domains, each with an ``_smtp._tls`` record; one relay process
delivers (or fails to deliver) a message to each; then ``mta tlsrpt show --json`` holds
the counts and failure details per policy domain, and ``mta tlsrpt send`` delivers the
reports: by mail through the relay's own queue to a receiving SMTP server (parsed back:
MIME, gzip, the §4 schema, a DKIM signature dkimpy verifies) and by HTTPS POST to a
collector. The report mail's own delivery is never counted.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.receivers import Receiver, TlsMode
from tests.integration.relayproc import RelayProcess, common_port, wait_until
from tests.integration.stsserver import Route, StsServer
from tests.report.tlsrpt_checks import check_report_json, parse_report_mail

SENDER = "alice@sender.test"
RUA_MAIL = '_smtp._tls TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"'
COLLECTOR_IP = "127.0.0.189"
REPORT_PATH = "/v1/tlsrpt"


@dataclass
class Domain:
    name: str
    ip: str
    tls: TlsMode = "fs"
    cert: trustme.LeafCert | None = None
    records: tuple[str, ...] = ()
    signed: bool = True
    sts: str | None = None  # MTA-STS policy text
    rua: str = RUA_MAIL


@dataclass
class World:
    relay: RelayProcess
    reports: Receiver
    collector: StsServer
    domains: dict[str, Domain]
    dkim_public: bytes


def spki_sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _domains(ca: trustme.CA, smtp_port: int, https_port: int) -> list[Domain]:
    rogue = trustme.CA()
    tlsa = f"_{smtp_port}._tcp.mx"
    ee = rogue.issue_cert("mx.dane-ee.test")

    def sts(mode: str, name: str) -> str:
        return f"version: STSv1\nmode: {mode}\nmx: mx.{name}\nmax_age: 86400\n"

    return [
        Domain(
            "dane-ee.test",
            "127.0.0.170",
            cert=ee,
            records=(f"{tlsa} TLSA 3 1 1 {spki_sha256(ee)}",),
        ),
        Domain(
            "dane-mismatch.test",
            "127.0.0.171",
            cert=ca.issue_cert("mx.dane-mismatch.test"),
            records=(f"{tlsa} TLSA 3 1 1 {'00' * 32}",),
        ),
        Domain(
            "sts-good.test",
            "127.0.0.172",
            cert=ca.issue_cert("mx.sts-good.test"),
            signed=False,
            sts=sts("enforce", "sts-good.test"),
            rua=f'_smtp._tls TXT "v=TLSRPTv1; rua=https://collector.test:{https_port}{REPORT_PATH}"',
        ),
        Domain(
            "sts-testing.test",
            "127.0.0.173",
            cert=rogue.issue_cert("mx.sts-testing.test"),
            signed=False,
            sts=sts("testing", "sts-testing.test"),
        ),
        Domain("plain.test", "127.0.0.174", tls="none", signed=False),
    ]


def _dkim_key(work: Any) -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = work / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


@pytest.fixture(scope="module", params=[1, 2], ids=["relay", "group"])
def world(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[World]:
    """The world, once with a single relay and once with a 2-worker group: the group's
    sessions are spread over both shards' receipt logs, and worker 0 reports them all."""
    work = tmp_path_factory.mktemp("tlsrpt-world")
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hosts = [f"127.0.0.{170 + i}" for i in range(20)]
    smtp_port = common_port(hosts)
    https_port = common_port(hosts)
    domains = _domains(ca, smtp_port, https_port)
    dkim_path, dkim_public = _dkim_key(work)

    lab = DnsLab(work / "dns")
    for d in domains:
        records = ["@ MX 10 mx", f"mx A {d.ip}", d.rua, *d.records]
        if d.sts is not None:
            sts_ip = d.ip.replace("127.0.0.17", "127.0.0.18")
            records += ['_mta-sts TXT "v=STSv1; id=1"', f"mta-sts A {sts_ip}"]
        lab.add_zone(d.name, records, signed=d.signed)
    lab.add_zone("reports.test", ["@ MX 10 mx", "mx A 127.0.0.179"], signed=False)
    lab.add_zone("collector.test", [f"@ A {COLLECTOR_IP}"], signed=False)
    resolver_host, resolver_port = lab.start()

    started: list[Receiver | StsServer] = []
    relay = RelayProcess(
        work,
        f'[dns]\nresolvers = ["{resolver_host}:{resolver_port}"]\ndnssec_probe = "{PROBE}"\n'
        f'[tls]\nca_file = "{ca_file}"\n'
        f'[outbound]\nport = {smtp_port}\nretry_min = "1h"\nretry_max = "2h"\n'
        f"[mta_sts]\nport = {https_port}\n"
        f'[tlsrpt]\norganization = "Relay Test"\nfrom = "tlsrpt@relay.test"\n'
        f'dkim_domain = "relay.test"\ndkim_selector = "rpt"\ndkim_key = "{dkim_path}"\n',
        workers=request.param,
    )
    try:
        for d in domains:
            started.append(Receiver(d.ip, smtp_port, tls=d.tls, ca=ca, cert=d.cert).start())
            if d.sts is not None:
                sts_ip = d.ip.replace("127.0.0.17", "127.0.0.18")
                server = StsServer(sts_ip, https_port, cert=ca.issue_cert(f"mta-sts.{d.name}"))
                server.set_policy(d.sts)
                started.append(server.start())
        reports = Receiver("127.0.0.179", smtp_port, ca=ca, cert=ca.issue_cert("mx.reports.test"))
        started.append(reports.start())
        collector = StsServer(
            COLLECTOR_IP,
            https_port,
            cert=ca.issue_cert("collector.test"),
            routes={REPORT_PATH: Route(200, "text/plain", "thanks")},
        )
        started.append(collector.start())
        relay.start()
        for d in domains:
            relay.send(SENDER, [f"user@{d.name}"], f"Subject: to {d.name}\r\n\r\nhello\r\n")
        yield World(relay, reports, collector, {d.name: d for d in domains}, dkim_public)
    finally:
        relay.stop()
        for server in started:
            server.stop()
        lab.stop()


def show(world: World) -> dict[str, dict[str, Any]]:
    result = world.relay.mta("tlsrpt", "show", "--json")
    assert result.returncode == 0, result.stderr
    return {entry["policy-domain"]: entry for entry in json.loads(result.stdout)}


def settled(world: World) -> dict[str, dict[str, Any]]:
    """``show`` once every domain's attempt has been counted."""
    found: dict[str, dict[str, Any]] = {}

    def complete() -> bool:
        found.clear()
        found.update(show(world))
        return set(world.domains) <= set(found)

    wait_until(complete, 60, "every domain's attempt to be counted")
    return found


def _only_policy(entry: dict[str, Any]) -> dict[str, Any]:
    check_report_json(entry["report"])
    (policy,) = entry["report"]["policies"]
    return dict(policy)


def test_show_holds_the_counts_and_failure_details_per_policy_domain(world: World) -> None:
    reports = settled(world)
    summaries = {
        name: (
            _only_policy(entry)["policy"]["policy-type"],
            _only_policy(entry)["summary"]["total-successful-session-count"],
            _only_policy(entry)["summary"]["total-failure-session-count"],
        )
        for name, entry in reports.items()
    }
    assert summaries == {
        "dane-ee.test": ("tlsa", 1, 0),
        "dane-mismatch.test": ("tlsa", 0, 1),
        "sts-good.test": ("sts", 1, 0),
        "sts-testing.test": ("sts", 0, 1),  # delivered, but a failure all the same
        "plain.test": ("no-policy-found", 0, 1),
    }
    dane = _only_policy(reports["dane-ee.test"])["policy"]
    assert dane["mx-host"] == ["mx.dane-ee.test"]
    assert dane["policy-string"][0].startswith("3 1 1 ")
    sts = _only_policy(reports["sts-good.test"])["policy"]
    assert sts["mx-host"] == ["mx.sts-good.test"]
    assert "mode: enforce" in sts["policy-string"]
    details = {
        name: _only_policy(reports[name])["failure-details"]
        for name in ("dane-mismatch.test", "sts-testing.test", "plain.test")
    }
    for name, (detail,) in details.items():
        assert detail["receiving-mx-hostname"] == f"mx.{name}"
        assert detail["receiving-ip"] == world.domains[name].ip
        assert detail["sending-mta-ip"].startswith("127.")
        assert detail["failed-session-count"] == 1
    assert details["dane-mismatch.test"][0]["result-type"] == "validation-failure"
    assert details["sts-testing.test"][0]["result-type"] == "certificate-not-trusted"
    assert details["plain.test"][0]["result-type"] == "starttls-not-supported"
    assert reports["sts-good.test"]["destinations"] == [
        f"https://collector.test:{world.collector.port}{REPORT_PATH}"
    ]
    assert reports["plain.test"]["destinations"] == ["mailto:tlsrpt@reports.test"]
    assert {entry["status"] for entry in reports.values()} == {"due"}
    text = world.relay.mta("tlsrpt", "show").stdout
    assert "plain.test  [due] -> mailto:tlsrpt@reports.test" in text


def test_the_counts_survive_a_restart(world: World) -> None:
    """The counts are read from the sealed receipt log, not kept in memory."""
    before = settled(world)
    assert world.relay.terminate() == 0
    world.relay.start()
    assert {name: entry["report"]["policies"] for name, entry in show(world).items()} == {
        name: entry["report"]["policies"] for name, entry in before.items()
    }


def test_send_delivers_signed_mail_and_an_https_post_once(world: World) -> None:
    settled(world)
    sent = world.relay.mta("tlsrpt", "send")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "tlsrpt: sent=5 failed=0 already=0 no_record=0"

    (post,) = world.collector.posts
    path, content_type, body = post
    assert (path, content_type) == (REPORT_PATH, "application/tlsrpt+gzip")
    posted = json.loads(gzip.decompress(body))
    check_report_json(posted)
    assert posted["policies"][0]["policy"]["policy-domain"] == "sts-good.test"
    assert posted["organization-name"] == "Relay Test"

    mails = world.reports.wait_for(4, timeout=60)
    record = f"v=DKIM1; k=rsa; s=tlsrpt; p={base64.b64encode(world.dkim_public).decode()}"

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name == b"rpt._domainkey.relay.test." else None

    got = {}
    for mail in mails:
        assert mail.mail_from in ("", "<>")  # the null sender: a report bounces to no one
        assert mail.rcpt_tos == ["tlsrpt@reports.test"]
        assert mail.tls_version in ("TLSv1.2", "TLSv1.3")  # our own policy applies
        message, report = parse_report_mail(mail.content, dnsfunc=dnsfunc)
        assert message["TLS-Report-Submitter"] == "relay.test"
        got[message["TLS-Report-Domain"]] = report
    assert set(got) == {"dane-ee.test", "dane-mismatch.test", "sts-testing.test", "plain.test"}
    failure = got["plain.test"]["policies"][0]["failure-details"][0]
    assert failure["result-type"] == "starttls-not-supported"

    again = world.relay.mta("tlsrpt", "send")
    assert again.stdout.strip() == "tlsrpt: sent=0 failed=0 already=5 no_record=0"
    assert len(world.collector.posts) == 1
    after = show(world)
    assert "reports.test" not in after  # the report mail's delivery is never counted
    assert {entry["status"] for entry in after.values()} == {"sent"}


def test_without_a_running_relay_the_commands_say_so(tmp_path: Any) -> None:
    idle = RelayProcess(tmp_path, "")
    for args in (("show",), ("send", "--date", "2026-12-02")):
        result = idle.mta("tlsrpt", *args)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "mta: relay not running (TLS reports are built and sent by it)"
        )
