"""The TLS floor shared by every listener and every outbound connection.

TLS >= 1.2; in TLS 1.2 only ECDHE/DHE suites with AEAD ciphers (forward secrecy);
TLS 1.3 suites are all forward secret. ``@SECLEVEL=2`` makes OpenSSL refuse RSA and
DH keys under 2048 bits and EC keys under 224 bits, ours and peers'.
"""

from __future__ import annotations

import ssl
from typing import Final

from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS:!PSK:!SRP"
FORWARD_SECRET_CIPHERS: Final = _CIPHERS + ":@SECLEVEL=2"  # a cipher list, not a password
_FS_KEY_EXCHANGES: Final = ("ECDHE-", "DHE-")
MIN_RSA_BITS: Final = 2048  # RSA and DSA keys, ours and peers' (DESIGN.md)
MIN_EC_BITS: Final = 224  # @SECLEVEL=2: what the handshake enforces anyway


def harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the floor to a context (in place) and return it."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(FORWARD_SECRET_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def is_forward_secret(version: str | None, cipher: str | None) -> bool:
    """Whether a negotiated (protocol, cipher) pair has forward secrecy.

    Every TLS 1.3 suite does; in TLS 1.2 only (EC)DHE key exchange does.
    """
    if version == "TLSv1.3":
        return True
    if version == "TLSv1.2" and cipher:
        return cipher.startswith(_FS_KEY_EXCHANGES)
    return False


def weak_public_key(key: object, *, min_ec_bits: int = MIN_EC_BITS) -> str | None:
    """Why ``key`` is too weak, or ``None``: the one rule for the chains we check (DANE,
    PKIX, pins) and our own certificates (which ask for more: ``min_ec_bits=256``)."""
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey) and key.key_size < MIN_RSA_BITS:
        kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"
        return f"{kind} key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < min_ec_bits:
        bits = key.curve.key_size
        return f"EC key of {bits} bits is too weak (minimum {min_ec_bits})"
    return None
