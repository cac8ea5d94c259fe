"""Outbound connection reuse (Postfix's connection cache), and its one safety rule:
a cached connection carries mail only for deliveries that demand exactly the same proof
from the same peer. One domain's policy never changes how another domain's mail goes."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mta.app import build_destinations
from mta.clock import SystemClock
from mta.config import Config, validate
from mta.deliver.agent import DeliveryAgent
from mta.model import Envelope, Outcome, QueueId
from tests.integration.receivers import Receiver

SENDER = "alice@sender.test"
CONTENT = b"Subject: reuse\r\n\r\nhello\r\n"


def fingerprint(leaf: trustme.LeafCert) -> str:
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def make_config(receiver: Receiver, ca_file: Path, extra: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {
        "dns": {"resolvers": ["127.0.0.1:9"], "timeout": "2s"},
        "tls": {"ca_file": str(ca_file)},
        "route": [{"domain": "*", "nexthop": f"[{receiver.host}]:{receiver.port}"}],
        "mta_sts": {"enabled": False},
        **(extra or {}),
    }
    return validate(raw, "test.toml", Path("/nonexistent"))


def deliver_all(cfg: Config, domains: list[str], *, pause: float = 0.0) -> list[set[Outcome]]:
    """Deliver one message per domain, one after the other, with one agent (one cache)."""

    async def run() -> list[set[Outcome]]:
        agent = DeliveryAgent(cfg, build_destinations(cfg, SystemClock()).resolver)
        outcomes = []
        try:
            for n, domain in enumerate(domains):
                rcpt = (f"user{n}@{domain}",)
                envelope = Envelope(SENDER, rcpt, received_at=0.0)
                result = await agent.deliver(QueueId(f"q{n}"), envelope, domain, rcpt, CONTENT)
                outcomes.append({r.outcome for r in result.results})
                await asyncio.sleep(pause)
        finally:
            await agent.close()
        return outcomes

    return asyncio.run(run())


def test_consecutive_deliveries_share_one_connection(tls_ca: trustme.CA, ca_file: Path) -> None:
    with Receiver("127.0.0.41", tls="fs", ca=tls_ca) as receiver:
        outcomes = deliver_all(make_config(receiver, ca_file), ["a.test", "a.test", "a.test"])
        assert outcomes == [{Outcome.SENT}] * 3
        assert len(receiver.messages) == 3
        assert receiver.connections == 1
        assert all(m.tls_version for m in receiver.messages)


def test_a_different_requirement_never_shares_a_connection(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    # Same peer address; b.test pins the peer's certificate, a.test only wants encryption.
    cert = tls_ca.issue_cert("mx.test")
    with Receiver("127.0.0.42", tls="fs", ca=tls_ca, cert=cert) as receiver:
        pin = [fingerprint(cert)]
        extra = {"domain": [{"name": "b.test", "level": "fingerprint", "fingerprints": pin}]}
        cfg = make_config(receiver, ca_file, extra)
        outcomes = deliver_all(cfg, ["a.test", "b.test", "a.test", "b.test"])
        assert outcomes == [{Outcome.SENT}] * 4
        assert receiver.connections == 2  # one per requirement, each reused once


def test_an_untrusted_peer_is_not_reached_through_a_reused_connection(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    # The peer is not the one b.test pins: a.test (encrypt) is delivered, b.test must
    # not ride on a.test's connection and is deferred.
    with Receiver("127.0.0.43", tls="fs", ca=tls_ca) as receiver:
        pin = [fingerprint(tls_ca.issue_cert("someone-else.test"))]
        extra = {"domain": [{"name": "b.test", "level": "fingerprint", "fingerprints": pin}]}
        outcomes = deliver_all(make_config(receiver, ca_file, extra), ["a.test", "b.test"])
        assert outcomes == [{Outcome.SENT}, {Outcome.DEFERRED}]
        assert [m.rcpt_tos for m in receiver.messages] == [["user0@a.test"]]


def test_a_connection_closed_by_the_peer_is_replaced(tls_ca: trustme.CA, ca_file: Path) -> None:
    first = Receiver("127.0.0.44", tls="fs", ca=tls_ca).start()
    port = first.port
    cfg = make_config(first, ca_file)

    async def run() -> list[set[Outcome]]:
        agent = DeliveryAgent(cfg, build_destinations(cfg, SystemClock()).resolver)
        outcomes = []
        try:
            for n in range(2):
                if n == 1:  # the peer restarts: the cached connection is dead
                    await asyncio.to_thread(first.stop)
                    await asyncio.to_thread(second.start)
                rcpt = (f"user{n}@a.test",)
                envelope = Envelope(SENDER, rcpt, received_at=0.0)
                result = await agent.deliver(QueueId(f"q{n}"), envelope, "a.test", rcpt, CONTENT)
                outcomes.append({r.outcome for r in result.results})
        finally:
            await agent.close()
        return outcomes

    second = Receiver("127.0.0.44", port, tls="fs", ca=tls_ca)
    try:
        assert asyncio.run(run()) == [{Outcome.SENT}, {Outcome.SENT}]
        assert len(first.messages) == 1
        assert len(second.messages) == 1
    finally:
        second.stop()


def test_a_transaction_without_accepted_recipients_is_not_reused(
    tls_ca: trustme.CA, ca_file: Path
) -> None:
    """The peer refused every RCPT, so its transaction is still open: a reused connection
    would send MAIL into it ("503 nested MAIL") and bounce the next message."""
    refused = {"user0@a.test": "450 4.2.1 Try later"}
    with Receiver("127.0.0.45", tls="fs", ca=tls_ca, rcpt_reply=refused) as receiver:
        outcomes = deliver_all(make_config(receiver, ca_file), ["a.test", "a.test"])
        assert outcomes == [{Outcome.DEFERRED}, {Outcome.SENT}]
        assert len(receiver.messages) == 1
