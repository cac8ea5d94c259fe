"""Throw-away TLS material for the benchmark: one self-signed ECDSA P-256 certificate.

The relays under test and the sink all present the same kind of certificate (ECDSA
P-256, like ``mta``'s own self-signed default), so that neither relay pays for a more
expensive handshake than the other. Made here with ``cryptography`` rather than with
``mta``'s helpers, so that the harness does not depend on the code it measures.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# TLS 1.2 suites with forward secrecy only; TLS 1.3 suites all have it.
FORWARD_SECRET_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"


def make_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (mode 0600) for ``hostname``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the same floor as the relays: TLS >= 1.2, forward secrecy."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(FORWARD_SECRET_TLS12)
    context.load_cert_chain(cert, key)
    return context


def client_context() -> ssl.SSLContext:
    """An unauthenticated client context (the relays' certificates are self-signed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(FORWARD_SECRET_TLS12)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
