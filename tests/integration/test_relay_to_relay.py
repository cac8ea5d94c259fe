"""Data centre to data centre: two relay processes joined by mutual TLS.

DC1 sends mail for ``dc2.test`` to DC2's relay under a local policy that pins DC2's
certificate (``fingerprint``) and presents DC1's client certificate. DC2 lets only a
client with a certificate from the internal CA relay through it (its ``relay.networks``
matches nothing here), and delivers onward to a receiving server.
"""

from __future__ import annotations

import hashlib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, client_tls, wait_until

SENDER = "alice@dc1.test"


def write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return cert, key


def fingerprint(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return "sha256:" + hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class Link:
    """DC1 and DC2 relays and the final receiver behind DC2."""

    def __init__(
        self, tmp_path: Path, tls_ca: trustme.CA, *, pin_right: bool, with_client_cert: bool
    ) -> None:
        internal = trustme.CA()
        certs = tmp_path / "certs"
        certs.mkdir()
        dc2_leaf = internal.issue_cert("relay.dc2.test")
        pin = fingerprint(dc2_leaf) if pin_right else fingerprint(internal.issue_cert("x.test"))
        dc2_cert, dc2_key = write_leaf(dc2_leaf, certs, "dc2")
        dc1_cert, dc1_key = write_leaf(internal.issue_cert("relay.dc1.test"), certs, "dc1-client")
        internal_ca = certs / "internal-ca.pem"
        internal.cert_pem.write_to_path(str(internal_ca))

        self.receiver = Receiver("127.0.0.40", tls="fs", ca=tls_ca).start()
        (tmp_path / "dc2").mkdir()
        self.dc2 = RelayProcess(
            tmp_path / "dc2",
            '[relay]\nnetworks = ["127.0.0.254/32"]\n'
            f'[[route]]\ndomain = "*"\nnexthop = "[127.0.0.40]:{self.receiver.port}"\n',
            listener=f'tls_cert = "{dc2_cert}"\ntls_key = "{dc2_key}"\n'
            f'tls_client_ca = "{internal_ca}"\nrequire_client_cert = true\n',
        )
        identity = (
            f'client_cert = "{dc1_cert}"\nclient_key = "{dc1_key}"\n' if with_client_cert else ""
        )
        (tmp_path / "dc1").mkdir()
        self.dc1 = RelayProcess(
            tmp_path / "dc1",
            '[outbound]\nretry_min = "1h"\nretry_max = "2h"\n'
            f'[[domain]]\nname = "dc2.test"\nlevel = "fingerprint"\nfingerprints = ["{pin}"]\n'
            f'nexthop = "[127.0.0.1]:{self.dc2.port}"\n{identity}',
        )
        self.dc2.start()
        self.dc1.start()

    def stop(self) -> None:
        self.dc1.stop()
        self.dc2.stop()
        self.receiver.stop()

    def dc1_last_error(self) -> str:
        entries = self.dc1.queue()
        return str(entries[0]["last_error"]) if entries else ""


@pytest.fixture
def links() -> Iterator[list[Link]]:
    made: list[Link] = []
    yield made
    for link in made:
        link.stop()


def test_mail_crosses_data_centres_over_mutual_tls(
    tmp_path: Path, tls_ca: trustme.CA, links: list[Link]
) -> None:
    link = Link(tmp_path, tls_ca, pin_right=True, with_client_cert=True)
    links.append(link)
    link.dc1.send(SENDER, ["bob@dc2.test"], "Subject: across\r\n\r\nbetween our relays\r\n")
    (got,) = link.receiver.wait_for(1, timeout=30)
    assert b"between our relays" in got.content
    headers = got.content.split(b"\r\n\r\n", 1)[0]
    assert b"(client certificate relay.dc1.test verified)" in headers  # DC2's Received line
    result = next(line for line in link.dc1.log.splitlines() if "deliver.result" in line)
    assert "policy=local/fingerprint" in result
    assert "verified=fingerprint" in result


def test_a_wrong_pin_defers_and_sends_nothing(
    tmp_path: Path, tls_ca: trustme.CA, links: list[Link]
) -> None:
    link = Link(tmp_path, tls_ca, pin_right=False, with_client_cert=True)
    links.append(link)
    link.dc1.send(SENDER, ["bob@dc2.test"], "Subject: pinned\r\n\r\nnot for an impostor\r\n")
    wait_until(lambda: bool(link.dc1_last_error()), 30, "DC1 to defer")
    assert "4.7.5" in link.dc1_last_error()
    assert link.receiver.messages == []


def test_without_a_client_certificate_dc2_refuses(
    tmp_path: Path, tls_ca: trustme.CA, links: list[Link]
) -> None:
    link = Link(tmp_path, tls_ca, pin_right=True, with_client_cert=False)
    links.append(link)
    link.dc1.send(SENDER, ["bob@dc2.test"], "Subject: no cert\r\n\r\nrefused\r\n")
    wait_until(lambda: bool(link.dc1_last_error()), 30, "DC1 to defer")
    assert link.receiver.messages == []
    # Nor may anyone relay through DC2 without a certificate (its networks match nothing).
    with pytest.raises((smtplib.SMTPException, OSError)):
        relay_through(link.dc2.port)


def relay_through(port: int) -> None:
    """Try to relay through a relay over STARTTLS, presenting no client certificate."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.starttls(context=client_tls())
        smtp.sendmail(SENDER, ["bob@dc2.test"], "Subject: x\r\n\r\nx\r\n")
