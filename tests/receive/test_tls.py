"""Listener TLS contexts: weak keys refused, the floor applied, self-signed fallback."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mta.errors import ConfigError
from mta.receive.tls import ensure_self_signed, server_context

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _write_pair(directory: Path, key: PrivateKey) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_rsa_1024_refused_naming_the_file(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, rsa.generate_private_key(65537, 1024))
    with pytest.raises(ConfigError) as caught:
        server_context(cert, key)
    assert caught.value.source == str(cert)
    assert caught.value.key == "tls_cert"
    assert caught.value.problem == "RSA key of 1024 bits is too weak (minimum 2048)"


def test_ec_224_refused(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, ec.generate_private_key(ec.SECP224R1()))
    with pytest.raises(ConfigError, match="EC key of 224 bits is too weak"):
        server_context(cert, key)


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
)
def test_strong_keys_accepted_with_floor(
    tmp_path: Path, make_key: Callable[[], PrivateKey]
) -> None:
    cert, key = _write_pair(tmp_path, make_key())
    context = server_context(cert, key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.options & ssl.OP_NO_TICKET
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)


def test_trustme_chain_accepted(tmp_path: Path, tls_ca: trustme.CA) -> None:
    issued = tls_ca.issue_cert("mx.test")
    cert, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    assert isinstance(server_context(cert, key), ssl.SSLContext)


def test_unreadable_and_garbage_certificates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        server_context(tmp_path / "absent.pem", tmp_path / "key.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        server_context(garbage, tmp_path / "key.pem")


def test_mismatched_key_refused(tmp_path: Path) -> None:
    cert, _key = _write_pair(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    other = tmp_path / "other"
    other.mkdir()
    _cert, wrong_key = _write_pair(other, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(cert, wrong_key)


def test_ensure_self_signed_creates_then_reuses(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    cert, key, created = ensure_self_signed(directory, "mx.example.test")
    assert created
    assert directory.stat().st_mode & 0o777 == 0o700
    assert key.stat().st_mode & 0o777 == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    public = parsed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.test"]
    assert parsed.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert isinstance(server_context(cert, key), ssl.SSLContext)

    before = cert.read_bytes(), key.read_bytes()
    again = ensure_self_signed(directory, "mx.example.test")
    assert again == (cert, key, False)
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_ensure_self_signed_replaces_a_half_pair(tmp_path: Path) -> None:
    cert, key, _ = ensure_self_signed(tmp_path, "mx.test")
    cert.unlink()
    old_key = key.read_bytes()
    cert2, key2, created = ensure_self_signed(tmp_path, "mx.test")
    assert created
    assert key2.read_bytes() != old_key
    assert isinstance(server_context(cert2, key2), ssl.SSLContext)


def test_ensure_self_signed_ip_hostname(tmp_path: Path) -> None:
    cert, _key, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
