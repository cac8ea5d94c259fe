"""A world for TLS reports between real servers: the DNSSEC lab (knot + unbound)
publishes an MTA-STS domain whose reports go to an HTTPS collector and a
plaintext-only domain whose reports go by mail, with their receiving MX hosts, the
policy server and the report receivers on loopback. Used by the Redis fleet tests and
the relay group's (a report sent before a change of worker count)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, common_port, wait_until
from tests.integration.stsserver import Route, StsServer
from tests.report.tlsrpt_checks import check_report_json

SENDER = "alice@sender.test"
STS = "sts-fleet.test"
PLAIN = "plain-fleet.test"
MX_IP = {STS: "127.0.0.201", PLAIN: "127.0.0.202"}
POLICY_IP = "127.0.0.211"
REPORTS_IP = "127.0.0.209"
COLLECTOR_IP = "127.0.0.219"
REPORT_PATH = "/v1/tlsrpt"
POLICY = f"version: STSv1\nmode: enforce\nmx: mx.{STS}\nmax_age: 86400\n"
WAIT = 60.0


@dataclass
class Lab:
    """DNS, the receiving MX hosts, the policy server, the report receivers."""

    resolver: str
    ca_file: Path
    smtp_port: int
    https_port: int
    mx: dict[str, Receiver]
    policy: StsServer
    reports: Receiver
    collector: StsServer

    def relay_policy(self) -> str:
        """A relay's policy file (after [server] and the listener) in this world."""
        return (
            f'[dns]\nresolvers = ["{self.resolver}"]\ndnssec_probe = "{PROBE}"\n'
            f'[tls]\nca_file = "{self.ca_file}"\n'
            f'[outbound]\nport = {self.smtp_port}\nretry_min = "1h"\nretry_max = "2h"\n'
            f"[mta_sts]\nport = {self.https_port}\n"
            f'[tlsrpt]\norganization = "Fleet Test"\nfrom = "tlsrpt@relay.test"\n'
        )


@contextmanager
def report_lab(work: Path) -> Iterator[Lab]:
    """The servers of the module docstring, started under ``work``, stopped after."""
    work.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_file = work / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hosts = [*MX_IP.values(), POLICY_IP, REPORTS_IP, COLLECTOR_IP]
    smtp_port, https_port = common_port(hosts), common_port(hosts)
    dns = DnsLab(work / "dns")
    dns.add_zone(
        STS,
        [
            "@ MX 10 mx",
            f"mx A {MX_IP[STS]}",
            '_mta-sts TXT "v=STSv1; id=fleet1"',
            f"mta-sts A {POLICY_IP}",
            f'_smtp._tls TXT "v=TLSRPTv1; rua=https://collector.test:{https_port}{REPORT_PATH}"',
        ],
        signed=False,
    )
    dns.add_zone(
        PLAIN,
        [
            "@ MX 10 mx",
            f"mx A {MX_IP[PLAIN]}",
            '_smtp._tls TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"',
        ],
        signed=False,
    )
    dns.add_zone("reports.test", ["@ MX 10 mx", f"mx A {REPORTS_IP}"], signed=False)
    dns.add_zone("collector.test", [f"@ A {COLLECTOR_IP}"], signed=False)
    host, port = dns.start()
    started: list[Receiver | StsServer] = []
    try:
        mx = {
            STS: Receiver(MX_IP[STS], smtp_port, ca=ca, cert=ca.issue_cert(f"mx.{STS}")),
            PLAIN: Receiver(MX_IP[PLAIN], smtp_port, tls="none"),
        }
        policy = StsServer(POLICY_IP, https_port, cert=ca.issue_cert(f"mta-sts.{STS}"))
        policy.set_policy(POLICY)
        reports = Receiver(REPORTS_IP, smtp_port, ca=ca, cert=ca.issue_cert("mx.reports.test"))
        collector = StsServer(
            COLLECTOR_IP,
            https_port,
            cert=ca.issue_cert("collector.test"),
            routes={REPORT_PATH: Route(200, "text/plain", "thanks")},
        )
        for server in (*mx.values(), policy, reports, collector):
            started.append(server.start())
        yield Lab(f"{host}:{port}", ca_file, smtp_port, https_port, mx, policy, reports, collector)
    finally:
        for server in started:
            server.stop()
        dns.stop()


def send(relay: RelayProcess, domain: str, count: int) -> None:
    for n in range(count):
        relay.send(SENDER, [f"user{n}@{domain}"], f"Subject: {n}\r\n\r\nhello\r\n")


def counts(relay: RelayProcess) -> dict[str, tuple[int, int]]:
    """``mta tlsrpt show --json``: policy domain -> (successful, failed) sessions."""
    return {domain: figures for domain, (figures, _) in shown(relay).items()}


def shown(relay: RelayProcess) -> dict[str, tuple[tuple[int, int], str]]:
    """``mta tlsrpt show --json``: policy domain -> ((successful, failed), status)."""
    result = relay.mta("tlsrpt", "show", "--json")
    assert result.returncode == 0, result.stderr
    found = {}
    for entry in json.loads(result.stdout):
        summary = entry["report"]["policies"][0]["summary"]
        figures = (
            summary["total-successful-session-count"],
            summary["total-failure-session-count"],
        )
        found[entry["policy-domain"]] = (figures, entry["status"])
    return found


def wait_counts(relay: RelayProcess, want: dict[str, tuple[int, int]]) -> None:
    wait_until(lambda: counts(relay) == want, WAIT, f"counts {want} (got {counts(relay)})")


def posted(lab: Lab, since: int) -> list[dict[str, Any]]:
    reports = [json.loads(gzip.decompress(body)) for _, _, body in lab.collector.posts[since:]]
    for report in reports:
        check_report_json(report)
    return reports
