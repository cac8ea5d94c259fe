"""Client contexts per level, and handshake failures -> RFC 8460 result types.

Handshakes run over ``ssl.MemoryBIO`` pairs: real OpenSSL errors, no sockets.
"""

from __future__ import annotations

import datetime
import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from mta.deliver.tlsclient import classify_tls_error, client_context, secure_host_ok
from mta.errors import ConfigError, TlsPolicyFailure
from mta.model import TlsLevel
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


@pytest.mark.parametrize("level", [TlsLevel.MAY, TlsLevel.ENCRYPT])
def test_unverified_levels_check_nothing_but_keep_the_floor(level: TlsLevel) -> None:
    context = client_context(level, None)
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    for cipher in context.get_ciphers():
        assert cipher["protocol"] == "TLSv1.3" or cipher["name"].startswith(("ECDHE-", "DHE-"))


@pytest.mark.parametrize("level", [TlsLevel.VERIFY, TlsLevel.SECURE])
def test_pkix_levels_require_a_valid_certificate_and_name(
    level: TlsLevel, ca_file: Path, tls_ca: trustme.CA
) -> None:
    context = client_context(level, ca_file)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    ours = tls_ca.cert_pem.bytes()
    loaded = [ssl.DER_cert_to_PEM_cert(der).encode() for der in context.get_ca_certs(True)]
    assert any(pem.strip() == ours.strip() for pem in loaded)


@pytest.mark.parametrize(
    "level", [TlsLevel.DANE, TlsLevel.DANE_ONLY, TlsLevel.FINGERPRINT], ids=lambda lv: lv.label
)
def test_levels_not_implemented_defer(level: TlsLevel) -> None:
    with pytest.raises(TlsPolicyFailure, match="not implemented") as caught:
        client_context(level, None)
    assert caught.value.reason == "validation-failure"
    assert caught.value.reply.code == 451
    assert caught.value.reply.enhanced == "4.7.5"


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"tls\.ca_file: cannot load"):
        client_context(TlsLevel.VERIFY, missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"garbage\.pem"):
        client_context(TlsLevel.VERIFY, garbage)


@pytest.mark.parametrize(
    ("mx", "nexthop", "ok"),
    [
        ("example.test", "example.test", True),
        ("mx.example.test", "example.test", True),
        ("a.b.example.test", "Example.Test.", True),
        ("MX.EXAMPLE.TEST.", "example.test", True),
        ("mx.example.net", "example.test", False),
        ("badexample.test", "example.test", False),  # a suffix, not a subdomain
        ("example.test", "mx.example.test", False),
    ],
)
def test_secure_host_ok(mx: str, nexthop: str, ok: bool) -> None:
    assert secure_host_ok(mx, nexthop) is ok


# --- real handshakes ---


def test_encrypt_accepts_any_certificate_with_forward_secrecy() -> None:
    stranger = trustme.CA().issue_cert("mx.test")
    tls = handshake(client_context(TlsLevel.ENCRYPT, None), server_context(stranger), "other")
    cipher = tls.cipher()
    assert cipher is not None
    assert is_forward_secret(tls.version(), cipher[0])


def test_verify_with_the_ca_succeeds(tls_ca: trustme.CA, ca_file: Path) -> None:
    server = server_context(tls_ca.issue_cert("mx.test"))
    tls = handshake(client_context(TlsLevel.VERIFY, ca_file), server, "mx.test")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")


def classify_handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> str:
    with pytest.raises(ssl.SSLError) as caught:
        handshake(client, server, name)
    return classify_tls_error(caught.value)


def test_unknown_ca_is_not_trusted(tls_ca: trustme.CA) -> None:
    server = server_context(tls_ca.issue_cert("mx.test"))
    client = client_context(TlsLevel.VERIFY, None)
    assert classify_handshake(client, server, "mx.test") == "certificate-not-trusted"


def test_wrong_name_is_a_host_mismatch(tls_ca: trustme.CA, ca_file: Path) -> None:
    server = server_context(tls_ca.issue_cert("mx.test"))
    client = client_context(TlsLevel.VERIFY, ca_file)
    assert classify_handshake(client, server, "mx.other.test") == "certificate-host-mismatch"


def test_expired_certificate(tls_ca: trustme.CA, ca_file: Path) -> None:
    old = tls_ca.issue_cert(
        "mx.test",
        not_before=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC),
    )
    client = client_context(TlsLevel.VERIFY, ca_file)
    assert classify_handshake(client, server_context(old), "mx.test") == "certificate-expired"


def test_server_without_forward_secrecy(tls_ca: trustme.CA) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    server.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")
    tls_ca.issue_cert("mx.test", key_type=trustme.KeyType.RSA).configure_cert(server)
    client = client_context(TlsLevel.ENCRYPT, None)
    assert classify_handshake(client, server, "mx.test") == "no-forward-secrecy"


def test_server_with_only_old_protocols(tls_ca: trustme.CA) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point here
        server.minimum_version = ssl.TLSVersion.TLSv1
        server.maximum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    tls_ca.issue_cert("mx.test").configure_cert(server)
    client = client_context(TlsLevel.ENCRYPT, None)
    assert classify_handshake(client, server, "mx.test") == "protocol-too-old"


# --- classification of errors built by hand (codes that are hard to provoke) ---


def verification_error(code: int) -> ssl.SSLCertVerificationError:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_code = code
    return err


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (9, "certificate-expired"),
        (10, "certificate-expired"),
        (18, "certificate-not-trusted"),
        (19, "certificate-not-trusted"),
        (20, "certificate-not-trusted"),
        (21, "certificate-not-trusted"),
        (62, "certificate-host-mismatch"),
        (64, "certificate-host-mismatch"),
        (66, "weak-key"),
        (67, "weak-key"),
        (4242, "validation-failure"),
    ],
)
def test_verify_codes(code: int, reason: str) -> None:
    assert classify_tls_error(verification_error(code)) == reason


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
