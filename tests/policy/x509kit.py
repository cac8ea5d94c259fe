"""Certificates for the DANE and peer-verification tests: trustme chains plus hand-built oddities.

trustme gives realistic chains (root -> intermediate -> leaf, RSA or ECDSA); the cases
trustme cannot make (a CA-less "intermediate", a self-signed leaf, an RSA-1024 key)
are built with cryptography directly. Everything is DER, leaf first, as
``mta.deliver.tlschain.peer_chain`` returns it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mta.policy.dane import TlsaRecord

NOW: Final = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOST: Final = "mx.example.net"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)


def spki(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tlsa(usage: int, selector: int, mtype: int, cert_der: bytes) -> TlsaRecord:
    """The TLSA record a zone would publish for ``cert_der``."""
    data = cert_der if selector == 0 else spki(cert_der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data)


@dataclass(frozen=True)
class Pki:
    """A trustme root and intermediate, and a leaf they issued."""

    root: trustme.CA
    intermediate: trustme.CA
    leaf: trustme.LeafCert

    @property
    def chain(self) -> list[bytes]:
        """What a server presents: leaf, intermediate (no root)."""
        return [_pem_to_der(blob.bytes()) for blob in self.leaf.cert_chain_pems]

    @property
    def root_der(self) -> bytes:
        return _pem_to_der(self.root.cert_pem.bytes())

    @property
    def intermediate_der(self) -> bytes:
        return _pem_to_der(self.intermediate.cert_pem.bytes())

    @property
    def root_cert(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.root_der)

    def issue(self, *names: str, not_before: datetime, not_after: datetime) -> list[bytes]:
        """Another leaf from the same intermediate, with its own validity period."""
        leaf = self.intermediate.issue_cert(*names, not_before=not_before, not_after=not_after)
        return [_pem_to_der(blob.bytes()) for blob in leaf.cert_chain_pems]


def make_pki(key_type: trustme.KeyType = trustme.KeyType.ECDSA, *names: str) -> Pki:
    root = trustme.CA(key_type=key_type)
    intermediate = root.create_child_ca(key_type=key_type)
    leaf = intermediate.issue_cert(*(names or (HOST,)), key_type=key_type)
    return Pki(root, intermediate, leaf)


def _pem_to_der(pem: bytes) -> bytes:
    return der(x509.load_pem_x509_certificate(pem))


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build(
    subject: str,
    key: PrivateKey,
    *,
    issuer: tuple[str, PrivateKey] | None = None,
    names: tuple[str, ...] = (),
    ca: bool | None = None,
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=60),
    extra: tuple[x509.ExtensionType, ...] = (),
) -> bytes:
    """A certificate for ``key``; self-signed unless ``issuer`` = (name, key) is given.

    ``ca``: ``True``/``False`` adds basicConstraints with that cA flag; ``None`` leaves
    the extension out (an end entity, as most leaves are). ``extra``: more extensions,
    non-critical.
    """
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), False
        )
    for extension in extra:
        builder = builder.add_extension(extension, False)
    return der(builder.sign(issuer_key, hashes.SHA256()))
