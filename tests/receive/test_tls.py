"""Listener TLS contexts: weak keys refused, the floor applied, self-signed fallback."""

from __future__ import annotations

import datetime
import logging
import re
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mta.config import parse_text
from mta.errors import ConfigError
from mta.receive.tls import (
    certificate_problems,
    ensure_self_signed,
    server_context,
    warn_certificates,
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _write_pair(directory: Path, key: PrivateKey) -> tuple[Path, Path]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_rsa_1024_refused_naming_the_file(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, rsa.generate_private_key(65537, 1024))
    with pytest.raises(ConfigError) as caught:
        server_context([(cert, key)])
    assert caught.value.source == str(cert)
    assert caught.value.key == "tls_cert"
    assert caught.value.problem == "RSA key of 1024 bits is too weak (minimum 2048)"


def test_ec_224_refused(tmp_path: Path) -> None:
    cert, key = _write_pair(tmp_path, ec.generate_private_key(ec.SECP224R1()))
    with pytest.raises(ConfigError, match="EC key of 224 bits is too weak"):
        server_context([(cert, key)])


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
    ],
)
def test_strong_keys_accepted_with_floor(
    tmp_path: Path, make_key: Callable[[], PrivateKey]
) -> None:
    cert, key = _write_pair(tmp_path, make_key())
    context = server_context([(cert, key)])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.options & ssl.OP_NO_TICKET
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12)


def test_trustme_chain_accepted(tmp_path: Path, tls_ca: trustme.CA) -> None:
    issued = tls_ca.issue_cert("mx.test")
    cert, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    assert isinstance(server_context([(cert, key)]), ssl.SSLContext)


def test_unreadable_and_garbage_certificates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        server_context([(tmp_path / "absent.pem", tmp_path / "key.pem")])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        server_context([(garbage, tmp_path / "key.pem")])


def test_mismatched_key_refused(tmp_path: Path) -> None:
    cert, _key = _write_pair(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    other = tmp_path / "other"
    other.mkdir()
    _cert, wrong_key = _write_pair(other, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="cannot load"):
        server_context([(cert, wrong_key)])


def test_ensure_self_signed_creates_then_reuses(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    pairs, created = ensure_self_signed(directory, "mx.example.test")
    assert created
    assert directory.stat().st_mode & 0o777 == 0o700
    (cert, key), (rsa_cert, rsa_key) = pairs
    assert key.stat().st_mode & 0o777 == 0o600
    assert rsa_key.stat().st_mode & 0o777 == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    public = parsed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    rsa_public = x509.load_pem_x509_certificate(rsa_cert.read_bytes()).public_key()
    assert isinstance(rsa_public, rsa.RSAPublicKey)
    assert rsa_public.key_size == 2048
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.test"]
    assert parsed.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
    assert isinstance(server_context(pairs), ssl.SSLContext)

    before = [path.read_bytes() for pair in pairs for path in pair]
    again = ensure_self_signed(directory, "mx.example.test")
    assert again == (pairs, False)
    assert [path.read_bytes() for pair in pairs for path in pair] == before


def test_ensure_self_signed_replaces_a_half_pair(tmp_path: Path) -> None:
    pairs, _ = ensure_self_signed(tmp_path, "mx.test")
    (cert, key), rsa_pair = pairs
    cert.unlink()
    old_key, old_rsa = key.read_bytes(), rsa_pair[1].read_bytes()
    pairs2, created = ensure_self_signed(tmp_path, "mx.test")
    assert created
    assert pairs2 == pairs
    assert key.read_bytes() != old_key
    assert rsa_pair[1].read_bytes() == old_rsa  # the whole pair is kept
    assert isinstance(server_context(pairs2), ssl.SSLContext)


def test_ensure_self_signed_adds_rsa_to_an_older_relay(tmp_path: Path) -> None:
    """A data directory from before the RSA pair keeps its ECDSA pair and gains one."""
    (cert, _key), (rsa_cert, rsa_key) = ensure_self_signed(tmp_path, "mx.test")[0]
    rsa_cert.unlink()
    rsa_key.unlink()
    before = cert.read_bytes()
    _pairs, created = ensure_self_signed(tmp_path, "mx.test")
    assert created
    assert cert.read_bytes() == before
    assert rsa_cert.is_file()


def test_ensure_self_signed_ip_hostname(tmp_path: Path) -> None:
    pairs, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    for cert, _key in pairs:
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


# --- our own certificate: what an operator is warned about (issue 8 §6) ---

NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC)


def _chain(
    ca: trustme.CA, *names: str, days: float = 365, **kwargs: object
) -> list[x509.Certificate]:
    issued = ca.issue_cert(
        *names,
        not_before=NOW - datetime.timedelta(days=10),
        not_after=NOW + datetime.timedelta(days=days),
        **kwargs,  # type: ignore[arg-type]
    )
    return x509.load_pem_x509_certificates(b"".join(b.bytes() for b in issued.cert_chain_pems))


@pytest.mark.parametrize(
    ("names", "days", "hostname", "problems"),
    [
        (("mx.test",), 365, "mx.test", []),
        (("mx.test",), 365, "MX.Test.", []),
        (("*.test",), 365, "mx.test", []),
        (("127.0.0.1",), 365, "127.0.0.1", []),
        (("mx.test",), 365, "", []),  # no name to check
        (("mx.test",), 29, "mx.test", ["certificate expires on 2030-06-30 (in 29 days)"]),
        (("mx.test",), -1, "mx.test", ["certificate expired on 2030-05-31"]),
        (("other.test",), 365, "mx.test", ["certificate does not name mx.test"]),
        (("*.mx.test",), 365, "a.b.mx.test", ["certificate does not name a.b.mx.test"]),
        (("mx.test",), 365, "127.0.0.1", ["certificate does not name 127.0.0.1"]),
        (
            ("other.test",),
            -2,
            "mx.test",
            ["certificate expired on 2030-05-30", "certificate does not name mx.test"],
        ),
    ],
)
def test_certificate_problems(
    tls_ca: trustme.CA, names: tuple[str, ...], days: float, hostname: str, problems: list[str]
) -> None:
    assert certificate_problems(_chain(tls_ca, *names, days=days), hostname, NOW) == problems


def test_an_expired_intermediate_is_named() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = _chain(intermediate, "mx.test")
    assert certificate_problems(leaf, "mx.test", NOW) == []
    later = datetime.datetime(3001, 1, 1, tzinfo=datetime.UTC)  # trustme's CAs end in 3000
    problems = certificate_problems(leaf, "mx.test", later)
    assert problems[0].startswith("certificate expired on")
    assert any(p.startswith("chain certificate 1 (") and "expired" in p for p in problems)


def test_a_sha1_signature_is_named(tmp_path: Path) -> None:
    """cryptography will not sign with SHA-1; OpenSSL's command line still does."""
    cert = tmp_path / "sha1.pem"
    subprocess.run(
        [
            "/usr/bin/openssl",
            *("req", "-x509", "-sha1", "-nodes", "-days", "400", "-subj", "/CN=mx.test"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-keyout", str(tmp_path / "key.pem"), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    chain = x509.load_pem_x509_certificates(cert.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    assert certificate_problems(chain, "mx.test", now) == ["certificate is signed with SHA-1"]


def test_warn_certificates_logs_one_line_per_problem(
    tmp_path: Path, tls_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    issued = tls_ca.issue_cert(
        "other.test", not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    issued.cert_chain_pems[0].write_to_path(str(cert))
    caplog.set_level(logging.WARNING, logger="mta")
    found = warn_certificates([(cert, key)], "mx.test")
    records = [r for r in caplog.records if r.getMessage() == "receive.tls.certificate"]
    assert [getattr(r, "problem", "") for r in records] == [
        p.removeprefix(f"{cert}: ") for p in found
    ]
    assert len(found) == 2
    assert "expires on" in found[0]
    assert found[1] == f"{cert}: certificate does not name mx.test"
    assert all(getattr(r, "file", "") == str(cert) for r in records)
    # a file it cannot read is server_context's business: no warning, no crash
    assert warn_certificates([(tmp_path / "absent.pem", key)], "mx.test") == []


# --- one certificate per key type ---


def _issued_pair(ca: trustme.CA, directory: Path, key_type: trustme.KeyType) -> tuple[Path, Path]:
    issued = ca.issue_cert("mx.test", key_type=key_type)
    cert, key = directory / f"{key_type.name}.pem", directory / f"{key_type.name}.key"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    return cert, key


def test_an_rsa_and_an_ecdsa_certificate_together(tmp_path: Path, tls_ca: trustme.CA) -> None:
    pairs = [
        _issued_pair(tls_ca, tmp_path, trustme.KeyType.RSA),
        _issued_pair(tls_ca, tmp_path, trustme.KeyType.ECDSA),
    ]
    assert isinstance(server_context(pairs), ssl.SSLContext)


def test_two_certificates_of_one_key_type_refused(tmp_path: Path, tls_ca: trustme.CA) -> None:
    first = _issued_pair(tls_ca, tmp_path, trustme.KeyType.ECDSA)
    other = tmp_path / "other"
    other.mkdir()
    second = _issued_pair(tls_ca, other, trustme.KeyType.ECDSA)
    with pytest.raises(ConfigError) as caught:
        server_context([first, second])
    assert caught.value.source == str(second[0])
    assert caught.value.problem.startswith("a second ECDSA certificate")


@pytest.mark.parametrize(
    ("text", "chains"),
    [
        ("", ()),
        ('tls_cert = "c.pem"\ntls_key = "k.pem"', (("c.pem", "k.pem"),)),
        (
            'tls_cert = ["rsa.pem", "ec.pem"]\ntls_key = ["rsa.key", "/etc/ec.key"]',
            (("rsa.pem", "rsa.key"), ("ec.pem", "/etc/ec.key")),
        ),
    ],
)
def test_listener_certificate_keys(tmp_path: Path, text: str, chains: object) -> None:
    config = parse_text(f"[[listener]]\n{text}\n", "test.toml", tmp_path)
    assert config.listeners[0].tls_chains == tuple(
        (tmp_path / cert, tmp_path / key)
        for cert, key in chains  # type: ignore[attr-defined]
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('tls_cert = ["a.pem", "b.pem"]\ntls_key = "a.key"', "listener[0].tls_key: tls_cert and"),
        ('tls_cert = "a.pem"\ntls_key = ["a.key", "b.key"]', "listener[0].tls_cert: tls_cert and"),
        ('tls_cert = ["a.pem", ""]\ntls_key = ["a", "b"]', "listener[0].tls_cert: expected paths"),
        ('tls_cert = ["a.pem", 1]\ntls_key = ["a", "b"]', "listener[0].tls_cert: expected a list"),
    ],
)
def test_listener_certificate_key_errors(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"test.toml: {error}")):
        parse_text(f"[[listener]]\n{text}\n", "test.toml", tmp_path)
