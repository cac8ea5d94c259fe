"""Outbound TLS: the client context, and why a handshake failed.

Every context carries the shared floor (``mta.tlsbase.harden``: TLS >= 1.2, forward
secret suites only), so a peer that cannot do forward secrecy fails the handshake
rather than getting mail over a weaker channel. The one exception is the ``fallback``
context, for level ``may`` (where the alternative is plaintext) and for finding out why
a forward-secret handshake failed: TLS >= 1.2 still, but any HIGH suite and no security
level (``tlsbase.FALLBACK_CIPHERS``); mail goes over it only at ``may``. Neither context
looks at the peer's key (nothing is verified in the handshake): the session applies
``tlsbase.weak_public_key`` to the leaf after the handshake. The context itself verifies
nothing: the presented chain is checked after the handshake and before anything is sent
(``policy.verify``: DANE, PKIX or fingerprints, per the host's requirement), so every
level goes through one code path and DANE gets the chain it needs. Sessions are never
resumed (each context is used for fresh handshakes only), so a chain is always there.

``classify_tls_error`` turns an ``ssl`` exception into the RFC 8460 result type (or one
of DESIGN.md's own: ``no-forward-secrecy``, ``weak-key``, ``protocol-too-old``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mta.errors import ConfigError
from mta.tlsbase import FALLBACK_CIPHERS, harden

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


@dataclass(frozen=True, slots=True)
class ClientContexts:
    """The two contexts of one client identity: ``strict`` for every delivery, and
    ``fallback`` (module docstring) after a failed forward-secret handshake."""

    strict: ssl.SSLContext
    fallback: ssl.SSLContext


def client_contexts(
    client_cert: Path | None = None, client_key: Path | None = None
) -> ClientContexts:
    """Both contexts for one client identity (``ConfigError`` as ``client_context``)."""
    return ClientContexts(
        client_context(client_cert, client_key),
        client_context(client_cert, client_key, fallback=True),
    )


def client_context(
    client_cert: Path | None = None, client_key: Path | None = None, *, fallback: bool = False
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
    harden(context)
    if fallback:
        context.set_ciphers(FALLBACK_CIPHERS)
    return context


def classify_tls_error(err: BaseException) -> str:
    """The RFC 8460 result type for a failed handshake (``validation-failure`` if unknown)."""
    if isinstance(err, ssl.SSLError):
        reason = getattr(err, "reason", None)
        if isinstance(reason, str):
            return _REASONS.get(reason, "validation-failure")
    return "validation-failure"
