"""A listener with an RSA and an ECDSA certificate together (issue 8 §6): a TLS 1.2
client that speaks only ECDHE-RSA suites gets TLS instead of being left with plaintext,
and a client that asks for ECDSA still gets the ECDSA certificate. Real handshakes over
STARTTLS on loopback, against ``start_listeners``."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mta.app import _tls_contexts
from mta.receive.tls import server_context
from tests.integration.inbound import RawSmtp, Recorder, Relay, make_config

RSA_ONLY = "ECDHE-RSA-AES128-GCM-SHA256"
ECDSA_ONLY = "ECDHE-ECDSA-AES128-GCM-SHA256"


def _pair(ca: trustme.CA, directory: Path, key_type: trustme.KeyType) -> tuple[Path, Path]:
    issued = ca.issue_cert("127.0.0.1", "mx.test", key_type=key_type)
    cert, key = directory / f"{key_type.name}.pem", directory / f"{key_type.name}.key"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    return cert, key


def _tls12_client(ciphers: str, ca_file: Path | None) -> ssl.SSLContext:
    """A TLS 1.2 client offering only ``ciphers`` (an old client's whole list)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    if ca_file is None:  # the self-signed default: encryption, not authentication
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def _starttls(relay: Relay, client: ssl.SSLContext) -> tuple[str, object]:
    """EHLO, STARTTLS, handshake: (cipher, the server's public key)."""
    with RawSmtp(relay.port) as smtp:
        smtp.reply()
        smtp.command("EHLO client.test")
        assert smtp.command("STARTTLS").startswith("220")
        smtp.starttls(client, server_hostname="mx.test")
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.command("EHLO client.test").startswith("250")
        der = smtp.sock.getpeercert(binary_form=True)
        cipher = smtp.sock.cipher()
    assert der is not None
    assert cipher is not None
    return cipher[0], x509.load_der_x509_certificate(der).public_key()


@pytest.fixture
def dual(tls_ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    return server_context(
        [
            _pair(tls_ca, tmp_path, trustme.KeyType.RSA),
            _pair(tls_ca, tmp_path, trustme.KeyType.ECDSA),
        ]
    )


def test_rsa_only_client_gets_tls_from_a_dual_listener(
    tmp_path: Path, dual: ssl.SSLContext, ca_file: Path
) -> None:
    with Relay(make_config(tmp_path, auth=False), Recorder(), dual, None) as relay:
        cipher, key = _starttls(relay, _tls12_client(RSA_ONLY, ca_file))
    assert cipher == RSA_ONLY
    assert isinstance(key, rsa.RSAPublicKey)


def test_ecdsa_client_gets_the_ecdsa_certificate(
    tmp_path: Path, dual: ssl.SSLContext, ca_file: Path
) -> None:
    with Relay(make_config(tmp_path, auth=False), Recorder(), dual, None) as relay:
        cipher, key = _starttls(relay, _tls12_client(ECDSA_ONLY, ca_file))
    assert cipher == ECDSA_ONLY
    assert isinstance(key, ec.EllipticCurvePublicKey)


def test_rsa_only_client_fails_against_an_ecdsa_only_listener(
    tmp_path: Path, tls_ca: trustme.CA, ca_file: Path
) -> None:
    """What the dual certificate fixes: no shared suite, no TLS."""
    ecdsa_only = server_context([_pair(tls_ca, tmp_path, trustme.KeyType.ECDSA)])
    config = make_config(tmp_path, auth=False)
    with Relay(config, Recorder(), ecdsa_only, None) as relay, pytest.raises(ssl.SSLError):
        _starttls(relay, _tls12_client(RSA_ONLY, ca_file))


@pytest.mark.parametrize(
    ("ciphers", "kind"), [(RSA_ONLY, rsa.RSAPublicKey), (ECDSA_ONLY, ec.EllipticCurvePublicKey)]
)
def test_the_self_signed_default_serves_both(tmp_path: Path, ciphers: str, kind: type) -> None:
    """A relay given no certificate makes an ECDSA and an RSA one (``mta run``'s path)."""
    config = make_config(tmp_path, auth=False)
    tls_for, created = _tls_contexts(config, "mx.test")
    assert created is not None
    with Relay(config, Recorder(), tls_for(config.listeners[0]), None) as relay:
        cipher, key = _starttls(relay, _tls12_client(ciphers, None))
    assert cipher == ciphers
    assert isinstance(key, kind)
