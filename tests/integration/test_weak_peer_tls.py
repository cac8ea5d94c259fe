"""Receiving servers with weak TLS (issue 8 §1 and §5): a 1024-bit RSA certificate, and
suites without forward secrecy behind a handshake that ends in a reset, not an alert.

The far end is ``hostile.HostileServer`` (raw asyncio streams, so a failed handshake
drops the connection without an alert, as some MTAs do). Above ``may`` the relay defers
with the right RFC 8460-style reason and sends no command over that TLS; at ``may`` it
delivers over the weaker TLS, never in plaintext, and logs a WARNING.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mta.app import build_destinations
from mta.check import check_domain
from mta.clock import SystemClock
from mta.config import Config, validate
from mta.model import DeliveryResult, Outcome
from mta.tlsbase import is_forward_secret
from tests.integration import outbound
from tests.integration.hostile import HostileServer
from tests.integration.receivers import NON_FS_CIPHERS

WEAK_IP = "127.0.0.171"
CONTENT = b"Subject: weak\r\n\r\nbody\r\n"


def self_signed(tmp: Path, bits: int) -> tuple[Path, Path]:
    """A certificate for mx.test with an RSA key of ``bits`` (trustme issues only 2048+)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / f"rsa{bits}.pem", tmp / f"rsa{bits}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def server_context(tmp: Path, bits: int, *, forward_secret: bool) -> ssl.SSLContext:
    """TLS >= 1.2 at security level 0 (so the weak key loads); without ``forward_secret``
    only TLS 1.2 with RSA key exchange, as an old MTA would."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if forward_secret:
        context.set_ciphers("ECDHE+AESGCM:@SECLEVEL=0")
    else:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(f"{NON_FS_CIPHERS}:@SECLEVEL=0")
    context.load_cert_chain(*self_signed(tmp, bits))
    return context


def config(port: int, level: str) -> Config:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "outbound": {
            "port": port,
            "default_level": level,
            "connect_timeout": "5s",
            "command_timeout": "5s",
        },
        "route": [{"domain": "dest.test", "nexthop": f"[{WEAK_IP}]:{port}"}],
    }
    return validate(raw, "test.toml", Path("/nonexistent"))


def deliver(cfg: Config) -> DeliveryResult:
    return outbound.deliver(cfg, "dest.test", ["bob@dest.test"], CONTENT)


def summary(result: DeliveryResult) -> set[tuple[Outcome, int, str, str | None]]:
    return {(r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in result.results}


def tls_commands(server: HostileServer) -> list[bytes]:
    return [seen.line.split()[0] for seen in server.commands if seen.tls]


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_a_weak_peer_key_defers_before_any_command(tmp_path: Path, level: str) -> None:
    """At ``verify`` the certificate is not trusted either: the key rule comes first."""
    context = server_context(tmp_path, 1024, forward_secret=True)
    with HostileServer(WEAK_IP, context=context) as mx:
        result = deliver(config(mx.port, level))
        commands, messages = tls_commands(mx), list(mx.messages)
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "weak-key")}
    assert "RSA key of 1024 bits is too weak" in result.results[0].reply.text
    assert commands == []  # not even EHLO over that TLS
    assert messages == []
    assert result.tls is not None
    assert result.tls.peer_key == "RSA-1024"


def test_check_connect_says_weak_key(tmp_path: Path) -> None:
    context = server_context(tmp_path, 1024, forward_secret=True)

    async def run(cfg: Config) -> dict[str, Any]:
        destinations = build_destinations(cfg, SystemClock()).resolver
        report = await check_domain(cfg, destinations, "dest.test", connect=True)
        return report.doc

    with HostileServer(WEAK_IP, context=context) as mx:
        doc = asyncio.run(run(config(mx.port, "encrypt")))
    assert (doc["verdict"], doc["reason"]) == ("defer", "weak-key")


def test_may_delivers_over_tls_with_a_weak_key_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mta")
    context = server_context(tmp_path, 1024, forward_secret=True)
    with HostileServer(WEAK_IP, context=context) as mx:
        result = deliver(config(mx.port, "may"))
        messages = list(mx.messages)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert messages == [(True, CONTENT)]  # over TLS
    (warning,) = [r for r in caplog.records if r.getMessage() == "deliver.tls.weak_key"]
    assert warning.levelname == "WARNING"
    assert "1024" in vars(warning)["problem"]


def test_no_forward_secrecy_is_named_when_the_peer_resets(tmp_path: Path) -> None:
    """The peer ends the failed handshake without an alert; the reason is still right."""
    context = server_context(tmp_path, 2048, forward_secret=False)
    with HostileServer(WEAK_IP, context=context) as mx:
        result = deliver(config(mx.port, "encrypt"))
        commands, messages = tls_commands(mx), list(mx.messages)
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "no-forward-secrecy")}
    assert commands == []  # the second connection only asked why: nothing sent over it
    assert messages == []


def test_may_prefers_tls_without_forward_secrecy_to_plaintext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = server_context(tmp_path, 2048, forward_secret=False)
    with HostileServer(WEAK_IP, context=context) as mx:
        result = deliver(config(mx.port, "may"))
        messages = list(mx.messages)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert messages == [(True, CONTENT)]
    assert result.tls is not None
    assert result.tls.version == "TLSv1.2"
    assert not is_forward_secret(result.tls.version, result.tls.cipher)
    assert any(r.getMessage() == "deliver.tls.weaker" for r in caplog.records)
