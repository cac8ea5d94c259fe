"""Outbound TLS: the client context for each security level, and why a handshake failed.

Every context carries the shared floor (``mta.tlsbase.harden``: TLS >= 1.2, forward
secret suites only, no weak keys), so a peer that cannot do forward secrecy fails the
handshake rather than getting mail over a weaker channel. Levels:

- ``may`` / ``encrypt``: no certificate check (RFC 7435 opportunistic security).
- ``verify`` / ``secure``: PKIX against the system store plus ``tls.ca_file``, the peer
  must name the host we asked for (``server_hostname``). ``secure`` additionally
  requires the MX host to be the next-hop domain or inside it (``secure_host_ok``),
  since MX answers are not authenticated.
- ``dane``, ``dane-only``, ``fingerprint``: not implemented yet (issue 3). Asking for
  them raises ``TlsPolicyFailure`` (defer, reason ``validation-failure``); treating them
  as ``encrypt`` would silently lower the level the operator asked for.

``classify_tls_error`` turns an ``ssl`` exception into the RFC 8460 result type (or one
of DESIGN.md's own: ``no-forward-secrecy``, ``weak-key``, ``protocol-too-old``). It is
pure; ``client_context`` reads the CA file and the system store.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

from mta.errors import ConfigError, TlsPolicyFailure
from mta.model import TlsLevel
from mta.tlsbase import harden

UNVERIFIED_LEVELS: Final = frozenset({TlsLevel.MAY, TlsLevel.ENCRYPT})
PKIX_LEVELS: Final = frozenset({TlsLevel.VERIFY, TlsLevel.SECURE})

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) -> result type.
_VERIFY_CODES: Final = {
    9: "certificate-expired",  # CERT_NOT_YET_VALID: outside its validity period
    10: "certificate-expired",  # CERT_HAS_EXPIRED
    2: "certificate-not-trusted",  # UNABLE_TO_GET_ISSUER_CERT
    18: "certificate-not-trusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "certificate-not-trusted",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "certificate-not-trusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "certificate-not-trusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    24: "certificate-not-trusted",  # INVALID_CA
    27: "certificate-not-trusted",  # CERT_UNTRUSTED
    28: "certificate-not-trusted",  # CERT_REJECTED
    62: "certificate-host-mismatch",  # HOSTNAME_MISMATCH
    64: "certificate-host-mismatch",  # IP_ADDRESS_MISMATCH
    66: "weak-key",  # EE_KEY_TOO_SMALL
    67: "weak-key",  # CA_KEY_TOO_SMALL
    68: "weak-key",  # CA_MD_TOO_WEAK
}

# OpenSSL reason strings (ssl.SSLError.reason) -> result type.
_REASONS: Final = {
    "UNSUPPORTED_PROTOCOL": "protocol-too-old",
    "NO_PROTOCOLS_AVAILABLE": "protocol-too-old",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol-too-old",
    # We offer only forward-secret suites (tlsbase.FORWARD_SECRET_CIPHERS), so a peer
    # that finds nothing in common is, in practice, one without (EC)DHE.
    "NO_SHARED_CIPHER": "no-forward-secrecy",
    "NO_CIPHERS_AVAILABLE": "no-forward-secrecy",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no-forward-secrecy",
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": "no-forward-secrecy",
    "DH_KEY_TOO_SMALL": "weak-key",
    "EE_KEY_TOO_SMALL": "weak-key",
    "CA_KEY_TOO_SMALL": "weak-key",
    "CA_MD_TOO_WEAK": "weak-key",
    "BAD_DH_VALUE": "weak-key",
}


def client_context(level: TlsLevel, ca_file: Path | None) -> ssl.SSLContext:
    """A hardened client context for ``level``.

    Parameters:
        level: the destination's TLS security level.
        ca_file: extra PEM trust anchors for ``verify``/``secure`` (``tls.ca_file``).

    Raises:
        TlsPolicyFailure: a level this version cannot enforce (DANE, fingerprint).
        ConfigError: ``ca_file`` cannot be read or holds no certificate.
    """
    if level in UNVERIFIED_LEVELS:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif level in PKIX_LEVELS:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(ca_file))
            except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
                raise ConfigError(ca_file, "tls.ca_file", f"cannot load: {err}") from None
    else:
        raise TlsPolicyFailure(
            f"TLS level {level.label} is not implemented yet (issue 3)",
            reason="validation-failure",
        )
    return harden(context)


def secure_host_ok(mx_host: str, nexthop: str) -> bool:
    """Whether ``mx_host`` may serve ``nexthop`` at level ``secure``: equal or a subdomain."""
    mx_host = mx_host.lower().rstrip(".")
    nexthop = nexthop.lower().rstrip(".")
    return mx_host == nexthop or mx_host.endswith("." + nexthop)


def classify_tls_error(err: BaseException) -> str:
    """The RFC 8460 result type for a failed handshake (``validation-failure`` if unknown)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        code = getattr(err, "verify_code", None)
        if isinstance(code, int) and code in _VERIFY_CODES:
            return _VERIFY_CODES[code]
        return "validation-failure"
    if isinstance(err, ssl.SSLError):
        reason = getattr(err, "reason", None)
        if isinstance(reason, str):
            return _REASONS.get(reason, "validation-failure")
    return "validation-failure"
