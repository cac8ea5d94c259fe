"""The DNSSEC probe against real resolvers (issue 8 §2): a validating unbound passes it,
the same unbound with validation off fails it, and then DANE is never silently off.

One DNSSEC lab (knot + unbound) with a second unbound that does not validate. Each test
builds the relay's policy side (``app.build_destinations``) on one of the two resolvers
and asks ``mta check`` (in process and as the CLI) what mail for each domain would do.
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta import app, check, config
from mta.clock import SystemClock
from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.relayproc import run_mta

EE = "3 1 1 " + "ab" * 32
PORT = 2525  # outbound.port: the TLSA owner is _2525._tcp (issue 8 §5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with DnsLab(tmp_path_factory.mktemp("dns-probe")) as dns_lab:
        for name in ("dane-only.test", "dane.test"):  # both publish TLSA for their MX
            dns_lab.add_zone(name, ["@ MX 10 mx", "mx A 127.0.0.1", f"_{PORT}._tcp.mx TLSA {EE}"])
        dns_lab.add_zone("notlsa.test", ["@ MX 10 mx", "mx A 127.0.0.1"])
        dns_lab.start()
        yield dns_lab


@pytest.fixture(scope="module")
def plain(lab: DnsLab) -> tuple[str, int]:
    """The non-validating resolver: the same answers, never the AD bit."""
    return lab.start_plain_resolver()


def policy_text(resolver: tuple[str, int]) -> str:
    host, port = resolver
    return (
        f'[dns]\nresolvers = ["{host}:{port}"]\ntimeout = "3s"\ndnssec_probe = "{PROBE}"\n'
        f"[outbound]\nport = {PORT}\n"
        "[mta_sts]\nenabled = false\n"
        '[[domain]]\nname = "dane-only.test"\nlevel = "dane-only"\n'
    )


def check_doc(tmp_path: Path, resolver: tuple[str, int], domain: str) -> tuple[dict[str, Any], str]:
    cfg = config.validate(tomllib.loads(policy_text(resolver)), tmp_path / "t.toml", tmp_path)

    async def run() -> check.Report:
        destinations = app.build_destinations(cfg, SystemClock())
        return await check.check_domain(cfg, destinations.resolver, domain, connect=False)

    report = asyncio.run(run())
    return report.doc, check.render_text(report)


def test_a_non_validating_resolver_fails_the_probe_and_says_so(
    tmp_path: Path, plain: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mta.policy.dnssec_probe"):
        doc, text = check_doc(tmp_path, plain, "dane-only.test")
    (warning,) = [r for r in caplog.records if r.getMessage() == "dns.dnssec_probe.failed"]
    assert warning.levelno == logging.WARNING
    assert warning.__dict__["resolver"] == f"{plain[0]}:{plain[1]}"
    assert "without the AD bit" in warning.__dict__["detail"]
    assert doc["dnssec"]["validation"] == "unverifiable"
    assert doc["dnssec"]["mx"] == "unverifiable"  # not "insecure"
    assert doc["dnssec"]["failures"] == 1
    assert "DNSSEC unverifiable" in text
    assert f"resolver {plain[0]}:{plain[1]} fails the probe {PROBE}" in text
    (host,) = doc["mx"]
    assert host["refused"]["reason"] == "dnssec-invalid"  # dane-only: deferred


def test_a_dane_looking_host_is_deferred_while_dnssec_is_unverifiable(
    tmp_path: Path, plain: tuple[str, int]
) -> None:
    doc, _text = check_doc(tmp_path, plain, "dane.test")
    (host,) = doc["mx"]
    assert host["tlsa"]["status"] == "failed"
    assert f"_{PORT}._tcp.mx.dane.test publishes usable TLSA records" in host["tlsa"]["detail"]
    assert host["refused"]["reason"] == "dnssec-invalid"


def test_a_host_without_tlsa_gets_the_default_and_the_record_says_why(
    tmp_path: Path, plain: tuple[str, int]
) -> None:
    doc, _text = check_doc(tmp_path, plain, "notlsa.test")
    (host,) = doc["mx"]
    assert host["tlsa"]["status"] == "unverifiable"
    assert host["refused"] is None
    assert host["requirement"]["level"] == "encrypt"
    assert "DNSSEC unverifiable, DANE not checked" in host["requirement"]["why"]


def test_a_validating_resolver_passes_the_probe(tmp_path: Path, lab: DnsLab) -> None:
    doc, text = check_doc(tmp_path, lab.address, "dane-only.test")
    assert doc["dnssec"]["validation"] == "validating"
    assert doc["dnssec"]["mx"] == "secure"
    assert doc["dnssec"]["failures"] == 0
    (host,) = doc["mx"]
    assert host["refused"] is None
    assert host["requirement"]["level"] == "dane-only"
    assert "DNSSEC unverifiable" not in text
    # issue 8 §5: the TLSA owner for outbound.port 2525, looked up and named
    assert host["tlsa"]["records"] == [EE]
    assert f"_{PORT}._tcp.mx.dane-only.test" in host["requirement"]["why"]
    assert "_25._tcp" not in text


def test_mta_check_on_the_command_line(tmp_path: Path, plain: tuple[str, int]) -> None:
    policy_file = tmp_path / "relay.toml"
    policy_file.write_text(policy_text(plain))
    done = run_mta("check", "dane-only.test", "--config", str(policy_file), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DNSSEC unverifiable" in done.stdout
    assert "dnssec-invalid" in done.stdout
    assert "dns.dnssec_probe.failed" in done.stderr  # the WARNING, one line
    assert f"{plain[0]}:{plain[1]}" in done.stderr
