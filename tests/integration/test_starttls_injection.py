"""STARTTLS command and response injection (CVE-2011-0411 class; aiosmtpd CVE-2024-34083;
"Why TLS is better without STARTTLS", USENIX Security 2021), both directions.

Inbound: a client (or a man in the middle) pipelines commands after STARTTLS in the same
packet. They must be dropped with the plaintext when TLS starts: no reply to them may
come inside TLS, and the session after the handshake starts from nothing (no HELO, no
transaction). Checked on the in-process listeners and on a relay process (uvloop).

Outbound: a receiving server (or a man in the middle) sends extra reply lines right
after ``220 Ready to start TLS``. Our client (aiosmtplib, which clears its buffer at
STARTTLS) must never take them for replies after the handshake: the mail is delivered
with the real replies, or deferred; never bounced or acknowledged by an injected line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from mta.config import Config, validate
from mta.model import DeliveryResult, Outcome
from mta.tlsbase import harden
from tests.integration import outbound
from tests.integration.hostile import HostileServer
from tests.integration.inbound import (
    RawSmtp,
    Relay,
    wait_for_record,
)
from tests.integration.relayproc import RelayProcess, client_tls

HOSTILE_IP = "127.0.0.160"
INJECTED = (
    b"250-injected.test\r\n250 AUTH PLAIN\r\n"  # an EHLO reply without 8BITMIME or SIZE
    b"554 5.7.1 injected: sender refused\r\n"
    b"554 5.7.1 injected: recipient refused\r\n"
    b"250 2.0.0 injected: queued\r\n"
)
CONTENT = b"Subject: injection\r\n\r\nbody\r\n"


# --- inbound: commands pipelined after STARTTLS ---


def inject_after_starttls(client: RawSmtp, context: ssl.SSLContext) -> None:
    """EHLO; then STARTTLS with commands behind it in one write; then the handshake.

    Checks that the 220 is the only reply in plaintext and that nothing arrives in TLS
    before we speak: the injected commands got no reply.
    """
    assert client.reply().startswith("220")
    assert client.command("EHLO client.test").endswith("250 HELP")
    client.send(
        b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@example.test>\r\n"
        b"RCPT TO:<victim@local.test>\r\nHELP\r\n"
    )
    assert client.reply().startswith("220")
    client.starttls(context)  # asserts that nothing else came in plaintext
    assert client.pending(0.5) == b""


def assert_fresh_session(client: RawSmtp) -> None:
    """After the handshake: no HELO is known, no transaction was started."""
    assert client.command("MAIL FROM:<a@example.test>").startswith("503")  # send HELO first
    assert client.command("EHLO client.test").endswith("250 HELP")
    assert client.command("RCPT TO:<b@local.test>").startswith("503 5.5.1")  # need MAIL
    assert client.command("NOOP") == "250 2.0.0 OK"
    assert client.command("QUIT").startswith("221")


def test_commands_pipelined_after_starttls_are_discarded(
    relay: Relay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mta")
    with RawSmtp(relay.port) as client:
        inject_after_starttls(client, client_context)
        assert_fresh_session(client)
    assert relay.accept.attempts == 0
    record = wait_for_record(caplog, "receive.starttls.pipelined")
    assert vars(record)["bytes"] > 0


def test_injected_data_transaction_is_not_accepted(
    relay: Relay, client_context: ssl.SSLContext
) -> None:
    """A whole transaction injected after STARTTLS stores nothing."""
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        client.send(
            b"STARTTLS\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@local.test>\r\n"
            b"DATA\r\nSubject: injected\r\n\r\nboo\r\n.\r\n"
        )
        assert client.reply().startswith("220")
        client.starttls(context=client_context)
        assert client.pending(0.5) == b""
        assert client.command("EHLO client.test").endswith("250 HELP")
        assert client.command("DATA").startswith("503")  # no recipients: nothing carried over
    assert relay.accept.attempts == 0


def test_commands_pipelined_after_starttls_are_discarded_by_the_relay_process(
    tmp_path: Path,
) -> None:
    """The same through ``mta run``, which uses uvloop's transports."""
    relay = RelayProcess(tmp_path, "").start()
    try:
        with RawSmtp(relay.port) as client:
            inject_after_starttls(client, client_tls())
            assert_fresh_session(client)
        assert "receive.starttls.pipelined" in relay.log
        assert relay.queue() == []
    finally:
        relay.stop()


# --- outbound: replies injected after 220 to STARTTLS ---


@pytest.fixture(scope="module")
def hostile_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    tls_ca.issue_cert("mx.test", HOSTILE_IP).configure_cert(context)
    return context


def agent_config(port: int) -> Config:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "outbound": {"port": port, "connect_timeout": "5s", "command_timeout": "5s"},
        "route": [{"domain": "dest.test", "nexthop": f"[{HOSTILE_IP}]:{port}"}],
    }
    return validate(raw, "test.toml", Path("/nonexistent"))


def deliver(cfg: Config) -> DeliveryResult:
    return outbound.deliver(cfg, "dest.test", ["bob@dest.test"], CONTENT)


@pytest.mark.parametrize("separate", [False, True], ids=["same-write", "separate-write"])
def test_replies_injected_after_220_are_never_taken_as_replies(
    hostile_tls: ssl.SSLContext, separate: bool
) -> None:
    with HostileServer(HOSTILE_IP, context=hostile_tls, inject=INJECTED, separate=separate) as mx:
        result = deliver(agent_config(mx.port))
        commands, messages = list(mx.commands), list(mx.messages)
    (rcpt,) = result.results
    assert "injected" not in rcpt.reply.text
    # Nothing of the transaction was ever sent in plaintext (after a failed handshake a
    # second connection may ask why: EHLO and STARTTLS again, never more).
    plaintext = [c.line.split()[0] for c in commands if not c.tls]
    assert plaintext in ([b"EHLO", b"STARTTLS"], [b"EHLO", b"STARTTLS"] * 2)
    if rcpt.outcome is Outcome.SENT:
        assert rcpt.reply.text == "real: queued"
        assert messages == [(True, CONTENT)]
        # RFC 3207 §4.2: EHLO again after TLS, and every reply taken is one sent over TLS.
        assert [c.line.split()[0] for c in commands if c.tls][:4] == [
            b"EHLO",
            b"MAIL",
            b"RCPT",
            b"DATA",
        ]
    else:
        # The injected bytes reached the handshake as garbage: defer, never downgrade.
        assert separate, "in one write with the 220 they must be dropped, not fail TLS"
        assert (rcpt.outcome, rcpt.reply.code, rcpt.reply.enhanced) == (
            Outcome.DEFERRED,
            451,
            "4.7.5",
        )
        assert messages == []


def test_aiosmtplib_discards_what_arrived_before_the_handshake(
    hostile_tls: ssl.SSLContext, ca_file: Path
) -> None:
    """Regression guard for the library itself: after STARTTLS the EHLO reply is the real
    one, not the injected ``250-injected.test``."""

    async def talk(port: int) -> tuple[str, str]:
        smtp = aiosmtplib.SMTP(hostname=HOSTILE_IP, port=port, start_tls=False, timeout=5)
        await smtp.connect()
        await smtp.ehlo()
        context = ssl.create_default_context(cafile=str(ca_file))
        await smtp.starttls(tls_context=context, server_hostname="mx.test")
        ehlo = await smtp.ehlo()
        mail = await smtp.mail("a@sender.test")
        await smtp.quit()
        return ehlo.message, mail.message

    with HostileServer(HOSTILE_IP, context=hostile_tls, inject=INJECTED) as mx:
        ehlo, mail = asyncio.run(talk(mx.port))
    assert ehlo.startswith("hostile.test")
    assert "injected" not in ehlo
    assert mail == "2.0.0 real: ok"
