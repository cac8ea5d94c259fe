"""Outbound TLS: the client context, and why a handshake failed.

Every context carries the shared floor (``mta.tlsbase.harden``: TLS >= 1.2, forward
secret suites only, no weak keys), so a peer that cannot do forward secrecy fails the
handshake rather than getting mail over a weaker channel. The context itself verifies
nothing: the presented chain is checked after the handshake and before anything is sent
(``policy.verify``: DANE, PKIX or fingerprints, per the host's requirement), so every
level goes through one code path and DANE gets the chain it needs. Sessions are never
resumed (each context is used for fresh handshakes only), so a chain is always there.

``classify_tls_error`` turns an ``ssl`` exception into the RFC 8460 result type (or one
of DESIGN.md's own: ``no-forward-secrecy``, ``weak-key``, ``protocol-too-old``).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Final

from mta.errors import ConfigError
from mta.tlsbase import harden

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


def client_context(
    client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """A hardened client context, presenting a client certificate for mutual TLS if given.

    Raises:
        ConfigError: the client certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified after the handshake: policy.verify
    context.options |= ssl.OP_NO_TICKET
    if client_cert is not None:
        try:
            context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            raise ConfigError(client_cert, "domain.client_cert", f"cannot load: {err}") from None
    return harden(context)


def classify_tls_error(err: BaseException) -> str:
    """The RFC 8460 result type for a failed handshake (``validation-failure`` if unknown)."""
    if isinstance(err, ssl.SSLError):
        reason = getattr(err, "reason", None)
        if isinstance(reason, str):
            return _REASONS.get(reason, "validation-failure")
    return "validation-failure"
