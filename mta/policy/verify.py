"""Did the peer prove what its destination's policy demands? One check for every level.

Pure, except ``load_trust_store`` (reads the system bundle and PEM files). The delivery
client shakes hands without letting ``ssl`` judge the certificate (Python's ``ssl`` has
no DANE and no pinning), takes the presented chain (``mta.deliver.tlschain``) and asks
``verify_peer`` once, whatever the level; ``mta check`` asks the same function, so the
relay and the operator's tool cannot disagree.

- ``none``: nothing to prove (``encrypt``; the handshake already enforced the floor).
- ``pkix`` (``verify``, ``secure``, MTA-STS): RFC 5280 path validation to a
  ``TrustStore`` anchor, the leaf naming one of ``names`` as a DNS subjectAltName
  (RFC 6125; MTA-STS: RFC 8461 §4.2), with ``mta.policy.dane.validate_chain``.
- ``dane``: ``mta.policy.dane.verify_dane`` (RFC 7672).
- ``fingerprint`` (Postfix's level of that name): the SHA-256 of the leaf certificate
  DER or of its SubjectPublicKeyInfo DER equals a pinned digest; like Postfix, names
  and expiry are not checked, the pin is the authentication.

Every kind fails closed: an empty chain (a resumed session presents none), garbage
DER, an unknown kind or a missing trust store gives ``ok=False`` with an RFC 8460
result type, never an exception.
"""

from __future__ import annotations

import logging
import re
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.verification import Store

from mta.errors import ConfigError
from mta.model import PeerAuth
from mta.policy.dane import (
    DANE_EE,
    MATCH_SHA256,
    SELECTOR_CERT,
    SELECTOR_SPKI,
    TlsaRecord,
    parse_chain,
    record_matches,
    validate_chain,
    verify_dane,
    weak_key,
)
from mta.policy.local import normalise_fingerprint

log = logging.getLogger(__name__)
_SELECTORS: Final = (SELECTOR_CERT, SELECTOR_SPKI)
_SHA256: Final = hashes.SHA256()
_PEM_CERT: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TrustStore:
    """PKIX trust anchors: an immutable set of CA certificates and their verifier store.

    ``store`` is ``None`` when there are no anchors (cryptography refuses an empty
    ``Store``); a PKIX check against it fails with ``certificate-not-trusted``.
    """

    __slots__ = ("_certs", "_store")

    _certs: tuple[x509.Certificate, ...]
    _store: Store | None

    def __init__(self, certs: Iterable[x509.Certificate] = ()) -> None:
        unique: dict[bytes, x509.Certificate] = {}
        for cert in certs:
            unique.setdefault(cert.fingerprint(_SHA256), cert)
        self._certs = tuple(unique.values())
        self._store = Store(list(self._certs)) if self._certs else None

    @classmethod
    def from_pem(cls, data: bytes) -> TrustStore:
        """Anchors from PEM text (pure). Raises ``ValueError`` if a block does not parse."""
        return cls(_load_pem(data, skip_bad=False))

    @property
    def store(self) -> Store | None:
        return self._store

    def __len__(self) -> int:
        return len(self._certs)

    def __repr__(self) -> str:
        return f"TrustStore({len(self._certs)} anchors)"


def _load_pem(data: bytes, *, skip_bad: bool) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for block in _PEM_CERT.finditer(data):
        try:
            with warnings.catch_warnings():
                # Some system roots predate RFC 5280's positive serials; cryptography warns.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certs.append(x509.load_pem_x509_certificate(block.group(0)))
        except ValueError:
            if not skip_bad:
                raise
    return certs


def load_trust_store(extra_ca_files: Sequence[Path], *, system: bool = True) -> TrustStore:
    """Read the trust anchors for PKIX: the system bundle and the operator's PEM files.

    Parameters:
        extra_ca_files: PEM files (``tls.ca_file``, a domain's ``ca_file``); each must
            hold at least one certificate and every block must parse.
        system: include the system bundle (``ssl.get_default_verify_paths``: its
            ``cafile``, else the certificates in ``capath``). Unparsable system
            certificates are skipped.

    Raises:
        ConfigError: an extra file cannot be read, holds no certificate or a bad one.
    """
    certs: list[x509.Certificate] = []
    if system:
        certs.extend(_system_anchors())
    for path in extra_ca_files:
        try:
            found = _load_pem(path.read_bytes(), skip_bad=False)
        except (OSError, ValueError) as err:
            raise ConfigError(path, "ca_file", f"cannot load: {err}") from None
        if not found:
            raise ConfigError(path, "ca_file", "holds no PEM certificate")
        certs.extend(found)
    return TrustStore(certs)


def _system_anchors() -> list[x509.Certificate]:
    paths = ssl.get_default_verify_paths()
    if paths.cafile:
        try:
            return _load_pem(Path(paths.cafile).read_bytes(), skip_bad=True)
        except OSError:
            pass
    certs: list[x509.Certificate] = []
    if paths.capath:
        try:
            entries = sorted(Path(paths.capath).iterdir())
        except OSError:
            return certs
        for entry in entries:
            try:
                if entry.is_file():
                    certs.extend(_load_pem(entry.read_bytes(), skip_bad=True))
            except OSError:
                continue
    return certs


@dataclass(frozen=True, slots=True)
class PeerCheck:
    """What the peer must prove. ``decide.decide_host`` builds it from the policy."""

    kind: Literal["none", "pkix", "dane", "fingerprint"]
    names: tuple[str, ...] = ()  # acceptable names (pkix, dane-ta)
    tlsa: tuple[TlsaRecord, ...] = ()  # usable records (dane)
    fingerprints: tuple[str, ...] = ()  # "sha256:<hex>" of the leaf cert DER or its SPKI DER
    trust: TrustStore | None = None  # pkix anchors


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The verdict; ``reason`` is an RFC 8460 result type (or DESIGN.md's ``weak-key``);
    ``auth`` says how a peer that passed was authenticated (``NONE``: nothing asked)."""

    ok: bool
    reason: str | None
    detail: str
    auth: PeerAuth = PeerAuth.NONE


def verify_peer(check: PeerCheck, chain: Sequence[bytes], now: datetime) -> VerifyResult:
    """Whether the presented ``chain`` (DER, leaf first) satisfies ``check`` at ``now``.

    Never raises: any unexpected error is a failed check (``validation-failure``).
    """
    try:
        return _verify_peer(check, chain, now)
    except Exception as err:  # fail closed, whatever the input
        log.exception("deliver.verify_crashed")  # and say so: TLS-RPT will blame the peer
        return VerifyResult(False, "validation-failure", f"verification failed: {err!r}")


def _verify_peer(check: PeerCheck, chain: Sequence[bytes], now: datetime) -> VerifyResult:
    if check.kind == "none":
        return VerifyResult(True, None, "no authentication required")
    if check.kind == "dane":
        dane = verify_dane(check.tlsa, chain, check.names, now)
        auth = PeerAuth.NONE
        if dane.ok and dane.matched is not None:
            auth = PeerAuth.DANE_EE if dane.matched.usage == DANE_EE else PeerAuth.DANE_TA
        return VerifyResult(dane.ok, dane.reason, dane.detail, auth)
    if check.kind == "pkix":
        return _verify_pkix(check, chain, now)
    if check.kind == "fingerprint":
        return _verify_fingerprint(check, chain)
    return VerifyResult(False, "validation-failure", f"unknown check kind {check.kind!r}")


def _verify_pkix(check: PeerCheck, chain: Sequence[bytes], now: datetime) -> VerifyResult:
    if check.trust is None or check.trust.store is None:
        return VerifyResult(False, "certificate-not-trusted", "no trust anchors configured")
    certs = parse_chain(chain)
    if isinstance(certs, str):
        return VerifyResult(False, "certificate-not-trusted", certs)
    reason, detail = validate_chain(
        certs[0],
        certs[1:],
        check.trust.store,
        check.names,
        now,
        untrusted="certificate-not-trusted",
    )
    auth = PeerAuth.PKIX if reason is None else PeerAuth.NONE
    return VerifyResult(reason is None, reason, f"PKIX: {detail}", auth)


def _verify_fingerprint(check: PeerCheck, chain: Sequence[bytes]) -> VerifyResult:
    certs = parse_chain(chain[:1])
    if isinstance(certs, str):
        return VerifyResult(False, "certificate-not-trusted", certs)
    leaf = certs[0]
    matched = False
    for pin in check.fingerprints:
        try:
            wanted = bytes.fromhex(normalise_fingerprint(pin).removeprefix("sha256:"))
        except ValueError:
            continue  # config validation rejects these; here a bad pin matches nothing
        # A pin is a DANE-EE record in all but name: SHA-256 of the certificate or its key.
        pins = (TlsaRecord(DANE_EE, selector, MATCH_SHA256, wanted) for selector in _SELECTORS)
        matched |= any(record_matches(record, leaf) for record in pins)
    if not matched:
        return VerifyResult(
            False,
            "certificate-not-trusted",
            f"certificate matches none of {len(check.fingerprints)} pinned fingerprints",
        )
    weak = weak_key(leaf)
    if weak is not None:
        return VerifyResult(False, "weak-key", f"pinned certificate: {weak}")
    return VerifyResult(
        True, None, "certificate matches a pinned fingerprint", PeerAuth.FINGERPRINT
    )


@dataclass(frozen=True, slots=True)
class LeafKey:
    """The public key of a presented leaf certificate: ``kind`` for the record
    (``RSA-2048``, ``EC-256``, ``Ed25519``) and why it is too weak (``weak``, from the one
    rule ``tlsbase.weak_public_key``), or None."""

    kind: str
    weak: str | None


def leaf_key(der: bytes) -> LeafKey | None:
    """The key of the leaf certificate ``der``; None when it cannot be parsed. Applies
    whatever the check: at ``encrypt`` nothing else looks at the peer's key."""
    certs = parse_chain([der])
    if isinstance(certs, str):
        return None
    key = certs[0].public_key()
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA-{key.key_size}"
    elif isinstance(key, dsa.DSAPublicKey):
        kind = f"DSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"EC-{key.curve.key_size}"
    else:  # Ed25519PublicKey -> Ed25519
        kind = type(key).__name__.removesuffix("PublicKey")
    return LeafKey(kind, weak_key(certs[0]))
