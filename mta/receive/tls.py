"""Listener TLS: the server context every listener uses, and a self-signed fallback.

``server_context`` applies the shared floor (``tlsbase.harden``: TLS >= 1.2, forward
secret suites only), prefers the server's suite order, and turns off session tickets
(a ticket key that lives as long as the process would undo forward secrecy for every
session it protects). A certificate whose key is weak (RSA < 2048 bits, EC < 256 bits)
is refused at start-up with a ``ConfigError`` naming the file, before OpenSSL sees it.

A listener may carry one certificate per key type (RSA and ECDSA, like Postfix's
``smtpd_tls_chain_files``): OpenSSL then picks, per handshake, the one the client's
suites and signature algorithms can use, so a TLS 1.2 client that speaks only
ECDHE-RSA suites still gets TLS from a listener whose other certificate is ECDSA.

``ensure_self_signed`` makes that pair (ECDSA P-256 and RSA 2048, self-signed) for a
relay that was given none, so STARTTLS is always offered to every client:
encryption without authentication beats plaintext.

``certificate_problems`` (pure) says what an operator should fix before a client
notices: a certificate expired or expiring within ``EXPIRY_WARNING``, signed with
SHA-1, or not naming our host name; ``warn_certificates`` logs one line per problem
(at start, and again whenever it is called on reload).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID

from mta import durable
from mta.errors import ConfigError
from mta.policy.mta_sts import mx_matches
from mta.tlsbase import harden, weak_public_key

log = logging.getLogger(__name__)

OWN_MIN_EC_BITS: Final = 256  # our certificates: P-256 at least (peers' may be P-224)
SELF_SIGNED_DAYS: Final = 3650
SELF_SIGNED_RSA_BITS: Final = 2048
EXPIRY_WARNING: Final = datetime.timedelta(days=30)
CERT_NAME: Final = "cert.pem"  # the self-signed ECDSA pair...
KEY_NAME: Final = "key.pem"
RSA_CERT_NAME: Final = "rsa-cert.pem"  # ...and the RSA one beside it
RSA_KEY_NAME: Final = "rsa-key.pem"

CertKey = tuple[Path, Path]
"""A certificate chain file (PEM, leaf first) and its private key file."""


def load_chain(cert: Path) -> list[x509.Certificate]:
    """The certificates of a PEM chain file, leaf first; ``ConfigError`` names the file."""
    try:
        chain = x509.load_pem_x509_certificates(cert.read_bytes())
    except OSError as err:
        raise ConfigError(cert, "tls_cert", f"cannot read: {err.strerror}") from None
    except ValueError:
        raise ConfigError(cert, "tls_cert", "not a PEM certificate") from None
    return chain


def key_type(leaf: x509.Certificate) -> str:
    """``RSA``, ``ECDSA`` or another name: a listener carries one certificate of each."""
    key = leaf.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA"
    return type(key).__name__


def check_certificate_key(cert: Path) -> x509.Certificate:
    """Refuse a certificate (the first in a PEM chain) whose public key is too weak;
    return it."""
    leaf = load_chain(cert)[0]
    key = leaf.public_key()
    if isinstance(key, dsa.DSAPublicKey):  # TLS 1.3 has no DSA signatures
        raise ConfigError(cert, "tls_cert", "DSA keys are not accepted")
    problem = weak_public_key(key, min_ec_bits=OWN_MIN_EC_BITS)
    if problem is not None:
        raise ConfigError(cert, "tls_cert", problem)
    return leaf


def server_context(
    chains: Sequence[CertKey], client_ca: Path | None = None, *, require_client: bool = False
) -> ssl.SSLContext:
    """A hardened server context for one or more (certificate chain, key) pairs.

    Several pairs must hold different key types (one RSA, one ECDSA): OpenSSL keeps one
    certificate per type, so a second of the same type would silently replace the first.
    With ``client_ca``, clients are asked for a certificate and a presented one must chain
    to that CA (mutual TLS between relays); ``require_client`` refuses the handshake
    without one. Raises ``ConfigError`` naming the file for a weak, unreadable or
    mismatched pair, a second certificate of one key type, or an unreadable CA file.
    """
    if not chains:
        raise ValueError("a server context needs a certificate")
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
    context.num_tickets = 0
    seen: dict[str, Path] = {}
    for cert, key in chains:
        kind = key_type(check_certificate_key(cert))
        if kind in seen:
            problem = f"a second {kind} certificate (after {seen[kind]}): one per key type"
            raise ConfigError(cert, "tls_cert", problem)
        seen[kind] = cert
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


def certificate_problems(
    chain: Sequence[x509.Certificate], hostname: str, now: datetime.datetime
) -> list[str]:
    """What is wrong with our own certificate chain (leaf first), one sentence each.

    The leaf: expired, or expiring within ``EXPIRY_WARNING``; not naming ``hostname``
    (DNS SAN, ``*.`` for one label, or an IP SAN; the common name only when there is no
    SAN). Every certificate but a self-signed root: expired, or signed with SHA-1.
    Pure: ``now`` is a parameter.
    """
    problems: list[str] = []
    for index, cert in enumerate(chain):
        which = "certificate" if index == 0 else f"chain certificate {index} ({_subject(cert)})"
        expires = cert.not_valid_after_utc
        if expires <= now:
            problems.append(f"{which} expired on {expires:%Y-%m-%d}")
        elif index == 0 and expires - now <= EXPIRY_WARNING:
            days = (expires - now).days
            problems.append(f"{which} expires on {expires:%Y-%m-%d} (in {days} days)")
        self_signed = cert.issuer == cert.subject
        algorithm = cert.signature_hash_algorithm
        if isinstance(algorithm, hashes.SHA1) and (index == 0 or not self_signed):
            problems.append(f"{which} is signed with SHA-1")
    if chain and hostname and not names_host(chain[0], hostname):
        problems.append(f"certificate does not name {hostname}")
    return problems


def _subject(cert: x509.Certificate) -> str:
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else cert.subject.rfc4514_string()


def names_host(cert: x509.Certificate, hostname: str) -> bool:
    """Whether ``cert`` names ``hostname`` (RFC 6125: SANs, else the common name)."""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        address = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        ips = []
    else:
        names, ips = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)
    if address is not None:
        return address in ips or str(address) in names
    return any(mx_matches(name, hostname) for name in names)


def warn_certificates(
    chains: Sequence[CertKey], hostname: str, *, now: datetime.datetime | None = None
) -> list[str]:
    """Log one WARNING per problem of each listener certificate; return the problems.

    Callable at start and again on reload. A file that cannot be read is left to
    ``server_context``, which refuses it.
    """
    when = now or datetime.datetime.now(datetime.UTC)
    found: list[str] = []
    for cert, _key in chains:
        try:
            chain = load_chain(cert)
        except ConfigError:
            continue
        for problem in certificate_problems(chain, hostname, when):
            log.warning("receive.tls.certificate", extra={"file": str(cert), "problem": problem})
            found.append(f"{cert}: {problem}")
    return found


def ensure_self_signed(
    directory: Path, hostname: str, *, now: datetime.datetime | None = None
) -> tuple[list[CertKey], bool]:
    """Return ``([(ecdsa cert, key), (rsa cert, key)], created)`` in ``directory``.

    A pair whose two files are present is reused; otherwise a new key (ECDSA P-256 in
    ``cert.pem``/``key.pem``, RSA 2048 in ``rsa-cert.pem``/``rsa-key.pem``; mode 0600)
    and a self-signed certificate naming ``hostname`` replace whatever is there (a
    half-written pair from an interrupted start; a relay from before the RSA pair gets
    it added). ``created`` says whether anything was made. The directory is made 0700.
    """
    pairs: list[CertKey] = []
    created = False
    for cert_name, key_name in ((CERT_NAME, KEY_NAME), (RSA_CERT_NAME, RSA_KEY_NAME)):
        cert_path, key_path = directory / cert_name, directory / key_name
        pairs.append((cert_path, key_path))
        if cert_path.is_file() and key_path.is_file():
            continue
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if cert_name == CERT_NAME:
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = rsa.generate_private_key(65537, SELF_SIGNED_RSA_BITS)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _replace(key_path, key_pem)
        _replace(cert_path, _self_signed(key, hostname, now))  # 0600 too: only we read it
        created = True
    return pairs, created


def _self_signed(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    hostname: str,
    now: datetime.datetime | None,
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
