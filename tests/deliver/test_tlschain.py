"""peer_chain on real OpenSSL objects: in-memory handshakes over ssl.MemoryBIO, no sockets.

Also the reason for the rule "no session resumption where the peer must be
authenticated": a resumed session presents no chain (OpenSSL's peer chain is NULL,
though ``getpeercert`` still returns the leaf from the session), so DANE, pinning and
PKIX must fail closed on it.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import cast

import pytest
import trustme

from mta.deliver.tlschain import peer_chain
from mta.policy.verify import PeerCheck, TrustStore, verify_peer
from mta.tlsbase import harden
from tests.policy.x509kit import HOST, NOW, Pki, make_pki, tlsa

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture(scope="module", params=[trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def pki(request: pytest.FixtureRequest) -> Pki:
    key_type: trustme.KeyType = request.param
    return make_pki(key_type)


def server_context(pki: Pki) -> ssl.SSLContext:
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    pki.leaf.configure_cert(context)  # leaf and intermediate, as a well-run server sends
    return context


def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    """Like the delivery client under DANE: ssl checks nothing, verify_peer decides."""
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = version
    return context


def handshake(
    client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A full handshake in memory, then one record each way (TLS 1.3 tickets arrive late)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=HOST, session=session)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(20):
        if not client_done:
            try:
                tls_client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        if not server_done:
            try:
                tls_server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client_done and server_done:
            break
    else:
        raise AssertionError("handshake did not finish")
    tls_server.write(b"220 ready\r\n")
    c_in.write(s_out.read())
    assert tls_client.read(64) == b"220 ready\r\n"  # the client has read the session tickets
    return tls_client


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
def test_peer_chain_is_the_presented_chain_leaf_first(pki: Pki, version: ssl.TLSVersion) -> None:
    tls = handshake(client_context(version), server_context(pki))
    chain = peer_chain(tls)
    assert chain == pki.chain  # leaf, then intermediate, as DER
    assert chain[0] == tls.getpeercert(binary_form=True)
    assert tls.version() == ("TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3")


def test_a_server_sending_only_its_leaf(pki: Pki, tmp_path: Path) -> None:
    cert = tmp_path / "leaf.pem"
    key = tmp_path / "leaf.key"
    pki.leaf.cert_chain_pems[0].write_to_path(str(cert))
    pki.leaf.private_key_pem.write_to_path(str(key))
    server = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    server.load_cert_chain(str(cert), str(key))
    tls = handshake(client_context(ssl.TLSVersion.TLSv1_3), server)
    assert peer_chain(tls) == pki.chain[:1]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
def test_resumed_session_has_no_chain_and_fails_closed(pki: Pki, version: ssl.TLSVersion) -> None:
    client, server = client_context(version), server_context(pki)
    first = handshake(client, server)
    assert first.session is not None
    resumed = handshake(client, server, session=first.session)
    assert resumed.session_reused
    assert resumed.getpeercert(binary_form=True) == pki.chain[0]  # the trap: leaf still there
    assert peer_chain(resumed) == []

    trust = TrustStore.from_pem(pki.root.cert_pem.bytes())
    checks = [
        PeerCheck("dane", names=(HOST,), tlsa=(tlsa(3, 1, 1, pki.chain[0]),)),
        PeerCheck("dane", names=(HOST,), tlsa=(tlsa(2, 0, 1, pki.intermediate_der),)),
        PeerCheck("pkix", names=(HOST,), trust=trust),
    ]
    for check in checks:
        assert verify_peer(check, peer_chain(first), NOW).ok  # the full handshake passes
        result = verify_peer(check, peer_chain(resumed), NOW)
        assert not result.ok
        assert result.reason is not None


# --- how each Python's API is reached (fakes stand in for the version we are not on) ---


class _Public:
    """Python >= 3.13: ``get_unverified_chain()`` on the object itself, DER bytes."""

    session_reused = False

    def __init__(self, chain: list[bytes] | None) -> None:
        self._chain = chain

    def get_unverified_chain(self) -> list[bytes] | None:
        return self._chain


class _Cert:
    def __init__(self, der: bytes) -> None:
        self._der = der

    def public_bytes(self, encoding: int) -> bytes:
        assert encoding == 2  # _ssl.ENCODING_DER
        return self._der


class _Private:
    """Python 3.11/3.12: only the private ``_sslobj`` has it, with certificate objects."""

    def __init__(self, chain: list[_Cert] | None, reused: bool = False) -> None:
        self.session_reused = reused
        self._sslobj = _Public(cast("list[bytes] | None", chain))


def _call(fake: object) -> list[bytes]:
    return peer_chain(cast("ssl.SSLObject", fake))


def test_public_api_form() -> None:
    assert _call(_Public([b"leaf", b"ca"])) == [b"leaf", b"ca"]
    assert _call(_Public(None)) == []


def test_private_api_form() -> None:
    assert _call(_Private([_Cert(b"leaf"), _Cert(b"ca")])) == [b"leaf", b"ca"]
    assert _call(_Private(None)) == []
    assert _call(_Private([_Cert(b"leaf")], reused=True)) == []


def test_no_api_at_all_gives_no_chain() -> None:
    class Bare:
        session_reused = False

    assert _call(Bare()) == []
