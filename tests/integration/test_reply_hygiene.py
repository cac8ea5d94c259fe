"""The delivery client's protocol hygiene (issue 8 §5, issue 9): replies and envelopes.

- A reply that arrives when none is due (a second ``250`` in the segment of the EHLO
  reply over TLS) would be taken as the reply to MAIL FROM, and every later reply would
  pair with the wrong command: the session ends and the mail is deferred, no recipient
  decided by a reply that was not its own.
- An envelope address holding CR, LF or NUL is refused before anything of it is
  written: a bounce for that address (``553``), never "sent".
- A ``552`` to RCPT is temporary (RFC 5321 §4.5.3.1.10): deferred, not bounced.
- A peer that stops reading in the middle of DATA: the message is written in slices
  as the connection takes them, so the delivery ends at the command timeout, deferred.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from mta.config import Config, validate
from mta.model import DeliveryResult, Outcome
from mta.tlsbase import harden
from tests.integration import outbound
from tests.integration.hostile import HostileServer
from tests.integration.receivers import Receiver

MX_IP = "127.0.0.172"
SENDER = "alice@sender.test"
CONTENT = b"Subject: hygiene\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def mx_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    tls_ca.issue_cert("mx.test", MX_IP).configure_cert(context)
    return context


def config(port: int, command_timeout: str = "5s") -> Config:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "outbound": {"port": port, "connect_timeout": "5s", "command_timeout": command_timeout},
        "route": [{"domain": "dest.test", "nexthop": f"[{MX_IP}]:{port}"}],
    }
    return validate(raw, "test.toml", Path("/nonexistent"))


def deliver(port: int, rcpts: tuple[str, ...], sender: str = SENDER) -> DeliveryResult:
    return outbound.deliver(config(port), "dest.test", rcpts, CONTENT, sender=sender)


@pytest.mark.parametrize(
    "surplus",
    [b"250 2.0.0 surplus: ok\r\n", b"550 5.1.1 surplus: no such user\r\n", b"250-surplus"],
    ids=["250", "550", "partial"],
)
def test_a_surplus_reply_ends_the_session_and_defers(
    mx_tls: ssl.SSLContext, surplus: bytes
) -> None:
    with HostileServer(MX_IP, context=mx_tls, surplus=surplus) as mx:
        result = deliver(mx.port, ("bob@dest.test", "carol@dest.test"))
        after_tls = [seen.line.split()[0] for seen in mx.commands if seen.tls]
        messages = list(mx.messages)
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.DEFERRED, 451, "4.5.0")
    }
    assert "a reply arrived when none was due" in result.results[0].reply.text
    assert "surplus" not in result.results[0].reply.text
    assert after_tls == [b"EHLO"]  # no MAIL, no RCPT, no DATA, not even QUIT
    assert messages == []


@pytest.mark.parametrize(
    "bad", ["eve@dest.test\r\nRCPT TO:<x@dest.test>", "eve@dest.test\nX", "eve\x00@dest.test"]
)
def test_a_recipient_with_a_line_break_or_nul_is_refused(tls_ca: trustme.CA, bad: str) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(receiver.port, ("bob@dest.test", bad))
        (got,) = receiver.wait_for(1, timeout=5)
    by_rcpt = {r.rcpt: r for r in result.results}
    assert by_rcpt["bob@dest.test"].outcome is Outcome.SENT
    refused = by_rcpt[bad]
    assert (refused.outcome, refused.reply.code, refused.reply.enhanced) == (
        Outcome.BOUNCED,
        553,
        "5.1.3",
    )
    assert got.rcpt_tos == ["bob@dest.test"]


def test_a_sender_with_a_line_break_bounces_and_sends_nothing(tls_ca: trustme.CA) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(receiver.port, ("bob@dest.test",), sender="a@x.test\r\nRSET")
        messages = list(receiver.messages)
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.BOUNCED, 553, "5.1.7")
    }
    assert messages == []


def test_552_to_rcpt_defers(tls_ca: trustme.CA) -> None:
    refusals = {"carol@dest.test": "552 5.2.2 Mailbox full", "dave@dest.test": "550 5.1.1 No"}
    rcpts = ("bob@dest.test", "carol@dest.test", "dave@dest.test")
    with Receiver(MX_IP, tls="fs", ca=tls_ca, rcpt_reply=refusals) as receiver:
        result = deliver(receiver.port, rcpts)
        receiver.wait_for(1, timeout=5)
    outcomes = {r.rcpt: (r.outcome, r.reply.code) for r in result.results}
    assert outcomes == {
        "bob@dest.test": (Outcome.SENT, 250),
        "carol@dest.test": (Outcome.DEFERRED, 552),
        "dave@dest.test": (Outcome.BOUNCED, 550),
    }


def test_a_peer_that_stops_reading_mid_data_defers_at_the_timeout(
    mx_tls: ssl.SSLContext,
) -> None:
    # On uvloop, as ``mta run``. The peer reads nothing after its 354: the kernel's
    # buffers fill, then the TLS transport's, then the client must wait for room, for
    # the command timeout at most (a wait without a bound hangs until the test's 20 s
    # run out: a failure). And it must not take the rest of the message into its own
    # buffers meanwhile: written whole, 32 MB of ciphertext would wait in this process.
    big = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 400_000  # 32 MB
    with HostileServer(MX_IP, context=mx_tls, stall=True) as mx:
        cfg = config(mx.port, command_timeout="1s")
        attempt = outbound.attempt(cfg, "dest.test", ("bob@dest.test",), big)
        before = _peak_rss_reset()
        started = time.monotonic()
        result = uvloop.run(asyncio.wait_for(attempt, 20))
        took = time.monotonic() - started
        grew = _peak_rss() - before
    (only,) = result.results
    assert only.outcome is Outcome.DEFERRED
    assert (only.reply.code, only.reply.enhanced) == (451, "4.4.2")
    assert only.reply.text.startswith("timeout with ")
    assert only.reply.text.endswith(" during DATA")
    assert took < 10
    assert grew < len(big) // 4, f"peak RSS grew {grew >> 20} MiB while the peer read nothing"


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) << 10


def _peak_rss_reset() -> int:
    """Reset the peak resident set to the current one (clear_refs "5"), and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss()
