"""The client context, and handshake failures -> RFC 8460 result types.

Handshakes run over ``ssl.MemoryBIO`` pairs: real OpenSSL errors, no sockets.
"""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from mta.deliver.tlsclient import classify_tls_error, client_context
from mta.errors import ConfigError
from mta.tlsbase import harden, is_forward_secret


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    cert.configure_cert(context)
    return context


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> ssl.SSLObject:
    """Run a handshake in memory; returns the client's SSLObject or raises its error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=name)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    client_error: ssl.SSLError | None = None
    for _ in range(20):
        if not client_done and client_error is None:
            try:
                tls_client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                client_error = err
        if not server_done:
            try:
                tls_server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                server_done = True  # its alert is in s_out for the client to read
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client_error is not None:
            raise client_error
        if client_done and server_done:
            return tls_client
    raise AssertionError("handshake did not finish")


# --- contexts ---


def test_the_context_keeps_the_floor_and_leaves_verification_to_policy_verify() -> None:
    context = client_context()
    assert context.verify_mode == ssl.CERT_NONE  # checked after the handshake, per host
    assert context.check_hostname is False
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_TICKET  # no resumption: DANE needs the whole chain
    for cipher in context.get_ciphers():
        assert cipher["protocol"] == "TLSv1.3" or cipher["name"].startswith(("ECDHE-", "DHE-"))


def test_client_certificate_is_presented(tls_ca: trustme.CA, tmp_path: Path) -> None:
    client_cert = tls_ca.issue_cert("relay.dc1.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.cert_chain_pems[0].write_to_path(str(cert))
    client_cert.private_key_pem.write_to_path(str(key))
    server = server_context(tls_ca.issue_cert("mx.test"))
    server.verify_mode = ssl.CERT_REQUIRED
    server.maximum_version = ssl.TLSVersion.TLSv1_2  # so the refusal lands inside the handshake
    tls_ca.configure_trust(server)
    with pytest.raises(ssl.SSLError):
        handshake(client_context(), server, "mx.test")  # no certificate: refused
    tls = handshake(client_context(cert, key), server, "mx.test")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_unreadable_client_certificate_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"domain\.client_cert: cannot load"):
        client_context(missing, missing)


# --- real handshakes ---


def test_encrypt_accepts_any_certificate_with_forward_secrecy() -> None:
    stranger = trustme.CA().issue_cert("mx.test")
    tls = handshake(client_context(), server_context(stranger), "other")
    cipher = tls.cipher()
    assert cipher is not None
    assert is_forward_secret(tls.version(), cipher[0])


def classify_handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> str:
    with pytest.raises(ssl.SSLError) as caught:
        handshake(client, server, name)
    return classify_tls_error(caught.value)


def test_server_without_forward_secrecy(tls_ca: trustme.CA) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    server.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")
    tls_ca.issue_cert("mx.test", key_type=trustme.KeyType.RSA).configure_cert(server)
    client = client_context()
    assert classify_handshake(client, server, "mx.test") == "no-forward-secrecy"


def test_server_with_only_old_protocols(tls_ca: trustme.CA) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point here
        server.minimum_version = ssl.TLSVersion.TLSv1
        server.maximum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    tls_ca.issue_cert("mx.test").configure_cert(server)
    client = client_context()
    assert classify_handshake(client, server, "mx.test") == "protocol-too-old"


# --- classification of errors built by hand (codes that are hard to provoke) ---


@pytest.mark.parametrize(
    ("openssl_reason", "reason"),
    [
        ("NO_SHARED_CIPHER", "no-forward-secrecy"),
        ("UNSUPPORTED_PROTOCOL", "protocol-too-old"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", "protocol-too-old"),
        ("DH_KEY_TOO_SMALL", "weak-key"),
        ("WRONG_VERSION_NUMBER", "validation-failure"),
    ],
)
def test_openssl_reasons(openssl_reason: str, reason: str) -> None:
    err = ssl.SSLError(1, openssl_reason)
    err.reason = openssl_reason
    assert classify_tls_error(err) == reason


def test_anything_else_is_a_validation_failure() -> None:
    assert classify_tls_error(ConnectionResetError()) == "validation-failure"
    assert classify_tls_error(ssl.SSLError(1, "no reason attribute")) == "validation-failure"
