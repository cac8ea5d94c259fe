"""The TLS floor shared by every listener and every outbound connection.

TLS >= 1.2; in TLS 1.2 only ECDHE/DHE suites with AEAD ciphers (forward secrecy);
TLS 1.3 suites are all forward secret. ``@SECLEVEL=2`` makes OpenSSL refuse DH groups
under 2048 bits; it does not look at a peer's certificate key when nothing is verified
in the handshake (our client's case: ``deliver.tlsclient``), so ``weak_public_key`` is
the one rule for keys, ours and peers': RSA/DSA under 2048 bits, EC under 256 (issue 8).

``FALLBACK_CIPHERS`` is the one exception, for level ``may`` only (opportunistic TLS,
where the alternative is plaintext): still TLS >= 1.2, but suites without forward
secrecy and weaker keys are accepted after a forward-secret handshake failed.
"""

from __future__ import annotations

import ssl
from typing import Final

from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!DSS:!PSK:!SRP"
FORWARD_SECRET_CIPHERS: Final = _CIPHERS + ":@SECLEVEL=2"  # a cipher list, not a password
_FS_KEY_EXCHANGES: Final = ("ECDHE-", "DHE-")
MIN_RSA_BITS: Final = 2048  # RSA and DSA keys, ours and peers' (DESIGN.md)
MIN_EC_BITS: Final = 256  # P-256 and up, ours and peers'
# Level ``may`` only: forward-secret suites first, then the rest of HIGH (RSA key exchange), no
# security level (any key or DH group beats plaintext); never anonymous or NULL.
FALLBACK_CIPHERS: Final = _CIPHERS + ":HIGH:!aNULL:!eNULL:!PSK:!SRP:@SECLEVEL=0"


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
    """Why ``key`` is too weak, or ``None``: the one rule for peers' keys (the leaf at
    every level above ``may``; the chains DANE, PKIX and pins accept) and ours."""
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey) and key.key_size < MIN_RSA_BITS:
        kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"
        return f"{kind} key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size < min_ec_bits:
        bits = key.curve.key_size
        return f"EC key of {bits} bits is too weak (minimum {min_ec_bits})"
    return None
