"""DANE for SMTP: which TLSA records count, and whether a presented chain matches them.

Pure: no I/O, no clock (``now`` is a parameter). RFC 7672 §3 (SMTP) and RFC 7671
(DANE operational updates) decide every rule here:

- Usable records (RFC 7672 §3.1.3): usage DANE-TA(2) or DANE-EE(3), selector Cert(0)
  or SPKI(1), matching type Full(0), SHA2-256(1) or SHA2-512(2) with a digest of the
  right length. PKIX-TA(0), PKIX-EE(1) and anything unknown are unusable; a secure
  RRset with nothing usable means "TLS, unauthenticated" (``decide`` handles that), and
  ``verify_dane`` given only unusable records fails with ``tlsa-invalid``.
- DANE-EE(3) (RFC 7672 §3.1.1): the leaf alone must match; no name check, no expiry
  check, no chain. Only the leaf (depth 0) is ever compared with a DANE-EE record.
- DANE-TA(2) (RFC 7672 §3.1.2): a certificate the server presents above the leaf
  (depth >= 1, as OpenSSL's DANE code does) matches the record and becomes the only
  trust anchor; the chain from the leaf up to it must then be valid at ``now``
  (signatures, validity periods, CA basicConstraints and path length) and the leaf
  must carry one of ``names`` as a DNS subjectAltName (RFC 7672 §3.2.3: a ``*``
  wildcard only as the whole left-most label, covering one label). A ``2 1 0`` record
  publishes the full public key, so the trust anchor need not be presented (RFC 7671
  §5.2.2): the certificate it signed is then the anchor, once its signature checks.
- Any one matching record suffices (RFC 6698 §4.1). Failure reasons are RFC 8460
  result types: ``tlsa-invalid``, ``validation-failure``, ``certificate-expired``,
  ``certificate-host-mismatch``; plus DESIGN.md's ``weak-key`` for an RSA/DSA key under
  2048 bits or an EC key under 224 bits anywhere on the accepted path.

Path validation is cryptography's (``cryptography.x509.verification``), with an
extension profile for mail rather than the CA/B Forum web profile: mail servers' and
private CAs' certificates rarely follow the web's criticality and AKI rules, and
those rules add no authentication. ``validate_chain`` is shared with PKIX
(``mta.policy.verify``), so DANE-TA and PKIX check a chain the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from mta.policy.mx import normalise_host
from mta.tlsbase import weak_public_key

log = logging.getLogger(__name__)

# RFC 7218 mnemonics for the TLSA parameters that SMTP may use.
DANE_TA: Final = 2
DANE_EE: Final = 3
SELECTOR_CERT: Final = 0
SELECTOR_SPKI: Final = 1
MATCH_FULL: Final = 0
MATCH_SHA256: Final = 1
MATCH_SHA512: Final = 2
_DIGEST_SIZES: Final = {MATCH_SHA256: 32, MATCH_SHA512: 64}

MAX_CHAIN: Final = 16  # certificates we look at; a longer chain fails (everything has a limit)


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA RR (RFC 6698 §2.1): usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        """Presentation form as ``dig`` shows it, hex in lower case: ``"3 1 1 ab12..."``."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def parse_tlsa_rdata(rdata: bytes) -> TlsaRecord | None:
    """A TLSA rdata as published (RFC 6698 §2.1): usage, selector, matching type octets,
    then the association data, whatever its length (``is_usable`` judges that).

    ``None`` when even the three parameter octets are missing.
    """
    if len(rdata) < 3:
        return None
    return TlsaRecord(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def _label(record: TlsaRecord) -> str:
    """The record for a log line: parameters and the first bytes of its data."""
    text = str(record)
    return text if len(text) <= 30 else text[:30] + "..."


def is_usable(record: TlsaRecord) -> bool:
    """Whether SMTP may use ``record`` (RFC 7672 §3.1.3); unusable records are ignored."""
    if record.usage not in (DANE_TA, DANE_EE) or record.selector not in (
        SELECTOR_CERT,
        SELECTOR_SPKI,
    ):
        return False
    if record.mtype == MATCH_FULL:
        return len(record.data) > 0
    size = _DIGEST_SIZES.get(record.mtype)
    return size is not None and len(record.data) == size


@dataclass(frozen=True, slots=True)
class DaneResult:
    """The outcome of DANE authentication; ``reason`` is an RFC 8460 result type."""

    ok: bool
    reason: str | None
    detail: str
    matched: TlsaRecord | None = None


def selected_data(cert: x509.Certificate, selector: int) -> bytes:
    """What a record with ``selector`` covers: the certificate DER (0) or its SPKI DER (1)."""
    if selector == SELECTOR_CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    if selector == SELECTOR_SPKI:
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise ValueError(f"unknown TLSA selector {selector}")


def association(data: bytes, mtype: int) -> bytes:
    """``data`` as a record with matching type ``mtype`` carries it (full, SHA-256, SHA-512)."""
    if mtype == MATCH_FULL:
        return data
    if mtype == MATCH_SHA256:
        return hashlib.sha256(data).digest()
    if mtype == MATCH_SHA512:
        return hashlib.sha512(data).digest()
    raise ValueError(f"unknown TLSA matching type {mtype}")


def record_matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    """Whether ``cert`` is the certificate or key that ``record`` names (usage not considered)."""
    try:
        wanted = association(selected_data(cert, record.selector), record.mtype)
    except Exception:  # an unknown parameter, a key type we cannot encode: no match
        return False
    return hmac.compare_digest(wanted, record.data)


def parse_chain(chain: Sequence[bytes]) -> list[x509.Certificate] | str:
    """DER certificates -> certificates, or the reason they cannot be used (fail closed)."""
    if not chain:
        return "the server presented no certificate (a resumed session has none)"
    if len(chain) > MAX_CHAIN:
        return f"chain of {len(chain)} certificates is longer than {MAX_CHAIN}"
    certs: list[x509.Certificate] = []
    for depth, der in enumerate(chain):
        try:
            certs.append(x509.load_der_x509_certificate(bytes(der)))
        except Exception:  # malformed DER in any form: never trusted, never raised
            return f"certificate at depth {depth} is not valid DER"
    return certs


def weak_key(cert: x509.Certificate) -> str | None:
    """Why ``cert``'s public key is too weak (``tlsbase.weak_public_key``), or ``None``."""
    return weak_public_key(cert.public_key())


# --- path validation (shared with PKIX) ---


def _server_eku(
    _policy: Policy, _cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None
) -> None:
    """An EE certificate that restricts its use must allow TLS servers (OpenSSL's purpose)."""
    if ext is None:
        return
    if ExtendedKeyUsageOID.SERVER_AUTH not in ext and (
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in ext
    ):
        raise ValueError("extendedKeyUsage does not allow serverAuth")


def _cert_sign(_policy: Policy, _cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    """A CA certificate that restricts its key's use must allow certificate signing."""
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("keyUsage does not allow keyCertSign")


def _mail_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """(CA, EE) extension policies: RFC 5280 essentials without the web's profile."""
    ca = (
        ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _cert_sign)
    )
    ee = (
        ExtensionPolicy.permit_all()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_eku)
    )
    return ca, ee


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def reference_names(names: Sequence[str]) -> list[str]:
    """Names as certificates carry them: lower-case, no final dot, no empties or repeats."""
    out: list[str] = []
    for name in names:
        norm = normalise_host(name)
        if norm and norm not in out:
            out.append(norm)
    return out


def _classify(err: VerificationError, untrusted: str) -> str:
    """A path-validation error -> RFC 8460 result type (cryptography reports text only)."""
    text = str(err)
    if "not valid at validation time" in text:
        return "certificate-expired"
    if "no matching subjectAltName" in text:
        return "certificate-host-mismatch"
    return untrusted


# When several reference names or anchors fail differently, report the most telling.
_PRIORITY: Final = ("weak-key", "certificate-expired", "certificate-host-mismatch")


def _worst(reasons: Sequence[str], fallback: str) -> str:
    for reason in _PRIORITY:
        if reason in reasons:
            return reason
    return reasons[0] if reasons else fallback


def validate_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    store: Store,
    names: Sequence[str],
    now: datetime,
    *,
    untrusted: str,
) -> tuple[str | None, str]:
    """RFC 5280 path validation of ``leaf`` to an anchor in ``store``, for any of ``names``.

    Parameters:
        leaf: the server certificate.
        intermediates: the other presented certificates, any order; unused ones ignored.
        store: the trust anchors (DANE-TA: just the matched one; PKIX: the trust store).
        names: acceptable DNS names; the leaf must carry one as a subjectAltName.
        now: the validation time (naive means UTC).
        untrusted: the result type for a path that does not validate for another reason
            (``certificate-not-trusted`` for PKIX, ``validation-failure`` for DANE).

    Returns:
        ``(None, detail)`` when valid, else ``(reason, detail)``; never raises.
    """
    wanted = reference_names(names)
    if not wanted:
        return "certificate-host-mismatch", "no reference name to check the certificate against"
    ca_policy, ee_policy = _mail_policies()
    builder = (
        PolicyBuilder()
        .store(store)
        .time(_utc(now))
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
    )
    reasons: list[str] = []
    details: list[str] = []
    for name in wanted:
        try:
            verifier = builder.build_server_verifier(x509.DNSName(name))
        except ValueError:  # not a DNS name in A-label form: it can match nothing
            reasons.append("certificate-host-mismatch")
            details.append(f"{name!r} is not a DNS name")
            continue
        try:
            path = verifier.verify(leaf, list(intermediates))
        except VerificationError as err:
            reasons.append(_classify(err, untrusted))
            details.append(f"{name}: {err}")
            continue
        except Exception as err:  # anything else from a hostile certificate: fail closed
            reasons.append(untrusted)
            details.append(f"{name}: {type(err).__name__}: {err}")
            continue
        weak = next(filter(None, (weak_key(cert) for cert in path)), None)
        if weak is not None:
            return "weak-key", f"valid for {name} but on the path: {weak}"
        return None, f"valid for {name}, path of {len(path)}"
    return _worst(reasons, untrusted), "; ".join(details)


# --- DANE ---


def _verify_signed_by(cert: x509.Certificate, key: object) -> bool:
    """Whether ``key`` (a full public key from a ``2 1 0`` record) signed ``cert``."""
    try:
        tbs, signature = cert.tbs_certificate_bytes, cert.signature
        params = cert.signature_algorithm_parameters
        if isinstance(key, rsa.RSAPublicKey):
            hash_alg = cert.signature_hash_algorithm
            if hash_alg is None or not isinstance(params, padding.PKCS1v15 | padding.PSS):
                return False
            key.verify(signature, tbs, params, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                return False
            key.verify(signature, tbs, params)
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, tbs)
        else:
            return False
    except Exception:  # InvalidSignature, unsupported algorithm, malformed signature
        return False
    return True


def _ta_anchors(
    record: TlsaRecord, certs: Sequence[x509.Certificate]
) -> Iterator[tuple[x509.Certificate, str]]:
    """Certificates that may serve as trust anchor for a DANE-TA ``record``, and how."""
    matched = False
    for depth, cert in enumerate(certs[1:], start=1):
        if record_matches(record, cert):
            matched = True
            yield cert, f"depth {depth} matches"
    if matched or (record.selector, record.mtype) != (SELECTOR_SPKI, MATCH_FULL):
        return
    # "2 1 0": the record is the anchor's whole key; the anchor itself may be absent.
    try:
        key = serialization.load_der_public_key(record.data)
    except Exception:  # not a key: the record matches nothing
        return
    if weak_public_key(key) is not None:
        return
    for depth in range(len(certs) - 1, -1, -1):
        if _verify_signed_by(certs[depth], key):
            yield certs[depth], f"depth {depth} is signed by the published key"


def verify_dane(
    records: Sequence[TlsaRecord], chain: Sequence[bytes], names: Sequence[str], now: datetime
) -> DaneResult:
    """Authenticate a server's chain with its TLSA records (RFC 7672 §3). Never raises.

    Parameters:
        records: the TLSA RRset (DNSSEC-secure); unusable records are ignored.
        chain: DER certificates as presented, leaf first.
        names: reference identifiers for DANE-TA: the TLSA base domain, the MX host
            name, the next-hop domain (RFC 7672 §3.2.2). DANE-EE ignores them.
        now: validation time for DANE-TA chains (DANE-EE ignores expiry).
    """
    try:
        return _verify_dane(records, chain, names, now)
    except Exception as err:  # a bug or a hostile input we did not foresee: fail closed
        log.exception("dane.check_crashed")  # and say so: TLS-RPT will blame the peer
        return DaneResult(False, "validation-failure", f"DANE check failed: {err!r}")


def _verify_dane(
    records: Sequence[TlsaRecord], chain: Sequence[bytes], names: Sequence[str], now: datetime
) -> DaneResult:
    usable = [record for record in records if is_usable(record)]
    if not usable:
        return DaneResult(False, "tlsa-invalid", f"none of {len(records)} TLSA records is usable")
    certs = parse_chain(chain)
    if isinstance(certs, str):
        return DaneResult(False, "validation-failure", certs)
    leaf = certs[0]
    for record in usable:
        if record.usage == DANE_EE and record_matches(record, leaf):
            weak = weak_key(leaf)
            if weak is not None:
                return DaneResult(
                    False, "weak-key", f"DANE-EE {_label(record)} matches, but: {weak}"
                )
            return DaneResult(True, None, f"DANE-EE {_label(record)} matches the leaf", record)
    reasons: list[str] = []
    details: list[str] = []
    for record in usable:
        if record.usage != DANE_TA:
            continue
        for anchor, how in _ta_anchors(record, certs):
            reason, detail = validate_chain(
                leaf, certs[1:], Store([anchor]), names, now, untrusted="validation-failure"
            )
            if reason is None:
                return DaneResult(True, None, f"DANE-TA {_label(record)}: {how}; {detail}", record)
            reasons.append(reason)
            details.append(f"DANE-TA {_label(record)}: {how} but {detail}")
    if not reasons:
        return DaneResult(
            False,
            "validation-failure",
            f"no usable TLSA record ({len(usable)}) matches the chain of {len(certs)}",
        )
    return DaneResult(False, _worst(reasons, "validation-failure"), "; ".join(details))
