"""The certificate chain a TLS peer presented (DER, leaf first): our one reach into ``ssl``.

DANE, pinning and our PKIX check (``mta.policy.verify``) judge the chain themselves,
so they need every certificate the server sent, not just the leaf
(``getpeercert(binary_form=True)``). How we get it on each Python we support:

- 3.13 and later: ``SSLObject.get_unverified_chain()`` / ``SSLSocket.get_unverified_chain()``,
  public API, DER ``bytes`` leaf first.
- 3.11 and 3.12: the same method exists only on the private ``_ssl._SSLSocket`` behind
  ``SSLObject._sslobj`` (added in 3.10 with the private ``_ssl.Certificate`` type); it
  returns certificate objects whose ``public_bytes(_ssl.ENCODING_DER)`` is the DER.
  This module is the only code that touches that private surface; if it is missing we
  return ``[]``, which every check treats as a failure (never as success).

A resumed session carries no chain (OpenSSL keeps only the leaf in the session, and
the server sends no certificates), so on ``session_reused`` we return ``[]`` and the
check fails closed. The delivery client therefore never offers a session for a
connection whose peer must be authenticated.
"""

from __future__ import annotations

import ssl
from typing import Final

_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER (OpenSSL's FORMAT_ASN1 in _ssl.c)


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The presented certificates, DER, leaf first; ``[]`` when none or after resumption."""
    if ssl_object.session_reused:
        return []
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python >= 3.13
    if public is not None:
        return _as_der(public())
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if private is None:
        return []
    return _as_der(private())


def _as_der(chain: object) -> list[bytes]:
    """Normalise either form (``bytes`` or ``_ssl.Certificate``) to DER ``bytes``."""
    if not isinstance(chain, list | tuple):
        return []  # None: the peer sent no certificate
    out: list[bytes] = []
    for cert in chain:
        if isinstance(cert, bytes | bytearray):
            out.append(bytes(cert))
            continue
        public_bytes = getattr(cert, "public_bytes", None)
        if public_bytes is None:
            return []
        der = public_bytes(_ENCODING_DER)
        if not isinstance(der, bytes):
            return []
        out.append(der)
    return out
