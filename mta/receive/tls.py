"""Listener TLS: the server context every listener uses, and a self-signed fallback.

``server_context`` applies the shared floor (``tlsbase.harden``: TLS >= 1.2, forward
secret suites only), prefers the server's suite order, and turns off session tickets
(a ticket key that lives as long as the process would undo forward secrecy for every
session it protects). A certificate whose key is weak (RSA < 2048 bits, EC < 256 bits)
is refused at start-up with a ``ConfigError`` naming the file, before OpenSSL sees it.

``ensure_self_signed`` makes an ECDSA P-256 certificate for a relay that was given
none, so STARTTLS is always offered: encryption without authentication beats plaintext.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID

from mta import durable
from mta.errors import ConfigError
from mta.tlsbase import harden, weak_public_key

OWN_MIN_EC_BITS: Final = 256  # our certificates: P-256 at least (peers' may be P-224)
SELF_SIGNED_DAYS: Final = 3650
CERT_NAME: Final = "cert.pem"
KEY_NAME: Final = "key.pem"


def check_certificate_key(cert: Path) -> None:
    """Refuse a certificate (the first in a PEM chain) whose public key is too weak."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as err:
        raise ConfigError(cert, "tls_cert", f"cannot read: {err.strerror}") from None
    except ValueError:
        raise ConfigError(cert, "tls_cert", "not a PEM certificate") from None
    key = leaf.public_key()
    if isinstance(key, dsa.DSAPublicKey):  # TLS 1.3 has no DSA signatures
        raise ConfigError(cert, "tls_cert", "DSA keys are not accepted")
    problem = weak_public_key(key, min_ec_bits=OWN_MIN_EC_BITS)
    if problem is not None:
        raise ConfigError(cert, "tls_cert", problem)


def server_context(
    cert: Path, key: Path, client_ca: Path | None = None, *, require_client: bool = False
) -> ssl.SSLContext:
    """A hardened server context for ``cert`` (PEM chain, leaf first) and ``key``.

    With ``client_ca``, clients are asked for a certificate and a presented one must chain
    to that CA (mutual TLS between relays); ``require_client`` refuses the handshake
    without one. Raises ``ConfigError`` naming the file for a weak, unreadable or
    mismatched pair or an unreadable CA file.
    """
    check_certificate_key(cert)
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        problem = f"cannot load with {key}: {err.strerror or err}"
        raise ConfigError(cert, "tls_cert", problem) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(client_ca, "tls_client_ca", f"cannot load: {err}") from None
        context.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return context


def ensure_self_signed(
    directory: Path, hostname: str, *, now: datetime.datetime | None = None
) -> tuple[Path, Path, bool]:
    """Return ``(cert, key, created)`` for ``directory/cert.pem`` and ``directory/key.pem``.

    Both present: they are reused (``created`` False). Otherwise a new ECDSA P-256 key
    (mode 0600) and a self-signed certificate naming ``hostname`` replace whatever is
    there (a half-written pair from an interrupted start). The directory is made 0700.
    """
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path, False
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _replace(key_path, key_pem)
    _replace(cert_path, _self_signed(key, hostname, now))  # 0600 too: only we read it
    return cert_path, key_path, True


def _self_signed(
    key: ec.EllipticCurvePrivateKey, hostname: str, now: datetime.datetime | None
) -> bytes:
    name = hostname or "localhost"
    start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(days=1)
    san: x509.GeneralName
    try:
        san = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        san = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
    durable.replace_durably(tmp, path, data)
