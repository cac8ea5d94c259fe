"""Inbound TLS quality as an outside scanner sees it: testssl.sh against our listener.

``testssl --starttls smtp`` (Debian's testssl.sh) checks protocols, forward secrecy,
cipher categories and the server's defaults. We require: nothing under TLS 1.2, no suite
without forward secrecy in any category, no weak key or group. Findings about the
certificate's trust (a throw-away test CA) are not about our TLS set-up and are skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import trustme

from tests.integration.relayproc import RelayProcess

NOT_OFFERED = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
OFFERED = ("TLS1_2", "TLS1_3")
# Not about our TLS set-up: the test certificate's trust, and DNS records of 127.0.0.1.
NOT_OURS = (
    "cert_trust",
    "cert_chain_of_trust",
    "cert_revocation",
    "cert_validityPeriod",
    "DNS_CAArecord",
)


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    assert testssl, "testssl.sh is a test dependency (scripts/system-deps.sh installs it)"
    work = tmp_path_factory.mktemp("testssl")
    leaf = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "mx.test", key_type=trustme.KeyType.RSA
    )
    cert, key = work / "cert.pem", work / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    relay = RelayProcess(work, "", listener=f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    report = work / "testssl.json"
    try:
        relay.start()
        done = subprocess.run(
            [testssl, "--quiet", "--color", "0", "--warnings", "batch", "--starttls", "smtp",
             "-p", "-s", "-f", "-E", "-S", "--jsonfile", str(report), f"127.0.0.1:{relay.port}"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        relay.stop()
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return {f["id"]: f for f in json.loads(report.read_text())}


@pytest.mark.parametrize("protocol", NOT_OFFERED)
def test_no_protocol_below_tls_1_2(findings: dict[str, dict[str, str]], protocol: str) -> None:
    assert findings[protocol]["finding"].startswith("not offered")


@pytest.mark.parametrize("protocol", OFFERED)
def test_tls_1_2_and_1_3_offered(findings: dict[str, dict[str, str]], protocol: str) -> None:
    assert findings[protocol]["finding"].startswith("offered")


def test_only_strong_categories_are_offered(findings: dict[str, dict[str, str]]) -> None:
    categories = {k: v for k, v in findings.items() if k.startswith("cipherlist_")}
    assert categories, "testssl reported no cipher categories"
    offered = {k for k, v in categories.items() if not v["finding"].startswith("not offered")}
    assert offered == {"cipherlist_STRONG"}  # AEAD only: no NULL, export, RC4, 3DES or CBC
    forward_secrecy = findings.get("FS") or findings["PFS"]  # named PFS before testssl 3.1
    assert forward_secrecy["severity"] == "OK"
    assert forward_secrecy["finding"] == "offered"


def test_every_suite_is_forward_secret(findings: dict[str, dict[str, str]]) -> None:
    suites = [v["finding"] for k, v in findings.items() if k.startswith("cipher-")]
    assert suites, "testssl listed no suites"
    for suite in suites:  # "TLS 1.2   xc030   ECDHE-RSA-AES256-GCM-SHA384   ECDH 253 ..."
        _tls, version, _code, name, kx = suite.split()[:5]
        assert version in ("1.2", "1.3"), suite
        assert kx in ("ECDH", "DH"), suite
        assert version == "1.3" or name.startswith(("ECDHE-", "DHE-")), suite


def test_no_weak_key_or_group(findings: dict[str, dict[str, str]]) -> None:
    assert findings["cert_keySize"]["severity"] in ("OK", "INFO")
    for key in ("FS_ECDHE_curves", "PFS_ECDHE_curves", "DH_groups"):
        if key in findings:
            assert findings[key]["severity"] in ("OK", "INFO"), findings[key]


def test_nothing_else_is_flagged(findings: dict[str, dict[str, str]]) -> None:
    flagged = {
        k: v["finding"]
        for k, v in findings.items()
        if v["severity"] in ("LOW", "MEDIUM", "HIGH", "CRITICAL") and k not in NOT_OURS
    }
    assert flagged == {}
