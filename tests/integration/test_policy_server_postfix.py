"""README "Postfix policy service", word for word: a private Postfix delivering on its own,
asking ``mta policy-server`` for each destination's TLS policy, to the DNSSEC lab and the
MTA-STS servers, and reaching the same verdict as ``mta check --connect``.

Postfix's ``main.cf`` is the README block plus only what a site has already and this
machine needs instead of the internet, each named here: the instance's own directories
(``postfix.instance_main_cf``), ``mynetworks`` and a loopback smtpd for the user's client,
``relayhost`` empty, ``smtp_tls_CAfile`` (the lab's CA stands for the public CAs),
``dnssec_probe`` (the lab refuses the root, so the probe asks for ``test.``) and
``smtp_tls_loglevel = 1`` (the log names each TLS connection).
Postfix reads its nameserver from /etc/resolv.conf only; the README asks for the
validating unbound there, so the instance runs in a mount namespace whose
/etc/resolv.conf names the lab's unbound on port 53 (``postfix.running``). The policy
server runs on its default listener, the one the README's ``main.cf`` names.

Each domain's MX is a sink on port 25 of its own loopback address:
- ``sts.test``: MTA-STS ``enforce``, a certificate for ``mx.sts.test`` -> delivered;
- ``wrongname.test``: MTA-STS ``enforce``, a certificate from the trusted CA for another
  name -> Postfix defers (``secure match=``), the sink gets nothing;
- ``dane.test``: DANE-EE TLSA (DNSSEC), a certificate no CA vouches for -> delivered;
- ``wrongkey.test``: DANE-EE TLSA for another key -> Postfix defers (``dane-only``).
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.integration import postfix
from tests.integration.dnslab import PROBE, DnsLab
from tests.integration.receivers import Receiver
from tests.integration.relayproc import common_port, free_port, run_mta
from tests.integration.stsserver import StsServer
from tests.integration.test_policy_scenarios import STS_ID, spki_sha256

POSTQUEUE = "/usr/sbin/postqueue"
RESOLVER = "127.0.0.210"  # the lab's validating unbound, on port 53 for resolv.conf
SUBMISSION = "127.0.0.214"  # Postfix's smtpd for the user's client
WAIT = 60.0  # seconds for Postfix to deliver or defer one message
# domain -> (MX address, MTA-STS host or None for DANE)
DOMAINS = {
    "sts.test": ("127.0.0.211", "127.0.0.215"),
    "wrongname.test": ("127.0.0.212", "127.0.0.216"),
    "dane.test": ("127.0.0.213", None),
    "wrongkey.test": ("127.0.0.217", None),
}


@dataclass
class Site:
    dirs: postfix.PostfixDirs
    port: int  # Postfix's smtpd on SUBMISSION
    sinks: dict[str, Receiver]  # domain -> its MX
    policy_file: Path
    home: Path


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="mta-policy-postfix-"))
    base.chmod(0o755)  # the postfix user reads its data directory below
    ca = trustme.CA()
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    stranger = trustme.CA()  # DANE-EE needs no CA: the sinks' CA is not Postfix's
    certs = {
        "sts.test": ca.issue_cert("mx.sts.test"),
        "wrongname.test": ca.issue_cert("mx.elsewhere.test"),
        "dane.test": stranger.issue_cert("mx.dane.test"),
        "wrongkey.test": stranger.issue_cert("mx.wrongkey.test"),
    }
    sts_hosts = [sts for _, sts in DOMAINS.values() if sts is not None]
    https_port = common_port(sts_hosts)
    dns = DnsLab(base / "dns", unbound_host=RESOLVER, unbound_port=53)
    servers: list[StsServer] = []
    sinks: dict[str, Receiver] = {}
    try:
        for domain, (mx, sts) in DOMAINS.items():
            records = ["@ MX 10 mx", f"mx A {mx}"]
            if sts is None:
                pinned = certs["dane.test"]  # wrongkey.test pins a key its MX does not have
                records.append(f"_25._tcp.mx TLSA 3 1 1 {spki_sha256(pinned)}")
                dns.add_zone(domain, records)
            else:
                records += [f'_mta-sts TXT "v=STSv1; id={STS_ID}"', f"mta-sts A {sts}"]
                dns.add_zone(domain, records, signed=False)
                server = StsServer(sts, https_port, cert=ca.issue_cert(f"mta-sts.{domain}"))
                server.set_policy(
                    f"version: STSv1\nmode: enforce\nmx: *.{domain}\nmax_age: 86400\n"
                )
                servers.append(server.start())
            sinks[domain] = Receiver(mx, 25, cert=certs[domain]).start()
        dns.start()
        resolv_conf = base / "resolv.conf"
        resolv_conf.write_text(f"nameserver {RESOLVER}\n")  # the site's resolv.conf

        policy_file = base / "relay.toml"  # [policy_server] listen: the default
        policy_file.write_text(
            f'[dns]\nresolvers = ["{RESOLVER}:53"]\ndnssec_probe = "{PROBE}"\n'
            f'[tls]\nca_file = "{ca_file}"\n[mta_sts]\nport = {https_port}\n'
        )
        home = base / "var"

        dirs = postfix.PostfixDirs(base / "postfix")
        port = free_port(SUBMISSION)
        own = f"""\
relayhost =
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtp_tls_CAfile = {ca_file}
smtp_tls_loglevel = 1
dnssec_probe = ns:test.
"""
        main_cf = (
            postfix.instance_main_cf(dirs.base, "postfix.example")
            + own
            + postfix.readme_block("policy-server", "main.cf")
        )
        postfix.write_config(
            dirs, main_cf, postfix.master_cf(f"{SUBMISSION}:{port} inet n - n - - smtpd\n")
        )
        with (
            postfix.policy_server(policy_file, home, base / "policy-server.log"),
            postfix.running(dirs, resolv_conf=resolv_conf),
        ):
            yield Site(dirs, port, sinks, policy_file, home)
    finally:
        for sink in sinks.values():
            sink.stop()
        for server in servers:
            server.stop()
        dns.stop()
        shutil.rmtree(base)


def submit(site: Site, recipient: str) -> None:
    with smtplib.SMTP(SUBMISSION, site.port, local_hostname="client.test") as smtp:
        smtp.sendmail(
            "alice@example.com",
            [recipient],
            f"From: alice@example.com\r\nTo: {recipient}\r\nSubject: policy\r\n\r\nhello\r\n",
        )


def deferral(site: Site, recipient: str) -> str:
    """The reason Postfix gives for holding ``recipient``'s message, once it has one."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        shown = subprocess.run(
            [POSTQUEUE, "-c", str(site.dirs.config), "-j"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        for line in shown.stdout.splitlines():
            for held in json.loads(line)["recipients"]:
                if held["address"] == recipient and held.get("delay_reason"):
                    reason: str = held["delay_reason"]
                    return reason
        time.sleep(0.2)
    raise AssertionError(f"Postfix did not defer {recipient}: {maillog(site)}")


def maillog(site: Site) -> str:
    return site.dirs.maillog.read_text() if site.dirs.maillog.exists() else ""


def logged(site: Site, recipient: str, status: str) -> str:
    """The mail log line of ``recipient``'s delivery with ``status``, once written."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in maillog(site).splitlines():
            if f"to=<{recipient}>" in line and f"status={status}" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no status={status} for {recipient}: {maillog(site)}")


def check_verdict(site: Site, domain: str) -> str:
    """What ``mta check --connect`` says our own delivery would do."""
    result = run_mta(
        "check", domain, "--connect", "--json", "--config", str(site.policy_file), home=site.home
    )
    assert result.returncode in (0, 1), result.stderr
    verdict: str = json.loads(result.stdout)["verdict"]
    return verdict


@pytest.mark.parametrize(
    ("domain", "verified"),
    [
        ("sts.test", "Verified TLS connection established to mx.sts.test[127.0.0.211]:25"),
        ("dane.test", "Verified TLS connection established to mx.dane.test[127.0.0.213]:25"),
    ],
)
def test_postfix_delivers_where_the_policy_is_met(site: Site, domain: str, verified: str) -> None:
    recipient = f"carol@{domain}"
    submit(site, recipient)
    (got,) = site.sinks[domain].wait_for(1, timeout=WAIT)
    assert got.rcpt_tos == [recipient]
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert b"\r\n\r\nhello\r\n" in got.content
    logged(site, recipient, "sent")
    assert verified in maillog(site)
    assert check_verdict(site, domain) == "deliver"


@pytest.mark.parametrize("domain", ["wrongname.test", "wrongkey.test"])
def test_postfix_defers_where_the_certificate_fails_the_policy(site: Site, domain: str) -> None:
    recipient = f"dave@{domain}"
    submit(site, recipient)
    reason = deferral(site, recipient)
    assert "Server certificate not verified" in reason, reason
    assert "Server certificate not verified" in logged(site, recipient, "deferred")
    assert site.sinks[domain].messages == []
    assert check_verdict(site, domain) == "defer"
