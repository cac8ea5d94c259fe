"""Outbound PIPELINING (RFC 2920, issue 13 §1), against a peer that offers it over TLS.

- MAIL FROM, every RCPT TO and DATA leave in one write (the peer reads them in one
  read), and each recipient gets the reply to its own RCPT: 550 bounces, 450 defers,
  the accepted ones get the message.
- Every RCPT refused: the content is never sent. DATA refused (554): nothing more is
  written. DATA answered 354 all the same: a lone dot ends the empty data (RFC 2920
  §3.1). Either way the connection is not reused.
- MAIL refused: 5xx bounces every recipient, 4xx defers them; nothing is sent even when
  the peer answers the rest of the group with 250 and 354.
- A cached connection found dead by the group is replaced, as without pipelining.
- A peer that does not offer PIPELINING gets one command per round trip, as before.
- Postfix's ``smtp-sink`` (a real peer that offers PIPELINING, but no TLS: so at
  ``may``, in plaintext) takes a pipelined delivery; its ``421`` to MAIL defers it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.app import build_destinations
from mta.clock import SystemClock
from mta.config import validate
from mta.deliver.agent import DeliveryAgent
from mta.model import DeliveryResult, Envelope, Outcome, QueueId
from tests.integration import outbound
from tests.integration.hostile import HostileServer
from tests.integration.relayproc import wait_until
from tests.integration.test_reply_hygiene import CONTENT, MX_IP, SENDER, config, mx_tls

__all__ = ["mx_tls"]  # the fixture, shared

BOB, CAROL, DAVE = "bob@dest.test", "carol@dest.test", "dave@dest.test"


def deliver(
    port: int, *batches: tuple[str, ...], between: Callable[[], None] | None = None
) -> list[DeliveryResult]:
    """One delivery per batch of recipients, one after the other, with one agent (so a
    clean connection is reused); ``between`` runs (in a thread) after the first."""

    async def run() -> list[DeliveryResult]:
        cfg = config(port)
        agent = DeliveryAgent(cfg, build_destinations(cfg, SystemClock()).resolver)
        try:
            results = []
            for n, rcpts in enumerate(batches):
                if n == 1 and between is not None:
                    await asyncio.to_thread(between)
                envelope = Envelope(SENDER, rcpts, received_at=0.0)
                id_ = QueueId(f"q{n}")
                results.append(await agent.deliver(id_, envelope, "dest.test", rcpts, CONTENT))
            return results
        finally:
            await agent.close()

    return asyncio.run(run())


def outcomes(result: DeliveryResult) -> dict[str, tuple[Outcome, int]]:
    return {r.rcpt: (r.outcome, r.reply.code) for r in result.results}


def connections(mx: HostileServer) -> int:
    return sum(1 for seen in mx.commands if not seen.tls and seen.line.startswith(b"EHLO"))


def test_one_write_and_each_recipient_its_own_reply(mx_tls: ssl.SSLContext) -> None:
    replies = {b"RCPT TO:<carol@": b"550 5.1.1 no such user", b"RCPT TO:<dave@": b"450 4.2.1 later"}
    with HostileServer(MX_IP, context=mx_tls, pipelining=True, replies=replies) as mx:
        (result,) = deliver(mx.port, (BOB, CAROL, DAVE))
        reads = [seen.line for seen in mx.reads if seen.tls]
        messages = list(mx.messages)
    assert outcomes(result) == {
        BOB: (Outcome.SENT, 250),
        CAROL: (Outcome.BOUNCED, 550),
        DAVE: (Outcome.DEFERRED, 450),
    }
    group = (
        b"MAIL FROM:<alice@sender.test> SIZE=%d\r\n" % len(CONTENT)
        + b"".join(b"RCPT TO:<%s>\r\n" % rcpt.encode() for rcpt in (BOB, CAROL, DAVE))
        + b"DATA\r\n"
    )
    assert reads[1] == group  # after the EHLO, the group in one read: one round trip
    assert messages == [(True, CONTENT)]


def test_every_rcpt_refused_and_data_refused_sends_nothing_and_is_not_reused(
    mx_tls: ssl.SSLContext,
) -> None:
    replies = {
        b"RCPT TO:<carol@": b"550 5.1.1 no such user",
        b"RCPT TO:<dave@": b"450 4.2.1 later",
        b"DATA": b"554 5.5.1 Error: no valid recipients",
    }
    with HostileServer(MX_IP, context=mx_tls, pipelining=True, replies=replies) as mx:
        first, _ = deliver(mx.port, (CAROL, DAVE), (CAROL,))
        after_data = [seen.line for seen in mx.commands if seen.tls][5:]
        opened = connections(mx)
        messages = list(mx.messages)
    assert outcomes(first) == {CAROL: (Outcome.BOUNCED, 550), DAVE: (Outcome.DEFERRED, 450)}
    assert after_data[0].startswith(b"EHLO")  # no content, no dot: the next connection
    assert opened == 2  # the first connection was closed, not cached
    assert messages == []


def test_every_rcpt_refused_but_data_accepted_ends_with_a_lone_dot(
    mx_tls: ssl.SSLContext,
) -> None:
    replies = {b"RCPT TO:<carol@": b"550 5.1.1 no such user", b"RCPT TO:<dave@": b"452 4.5.3 no"}
    with HostileServer(MX_IP, context=mx_tls, pipelining=True, replies=replies) as mx:
        first, second = deliver(mx.port, (CAROL, DAVE), (BOB,))
        reads = b"".join(seen.line for seen in mx.reads)
        opened = connections(mx)
        messages = list(mx.messages)
    assert outcomes(first) == {CAROL: (Outcome.BOUNCED, 550), DAVE: (Outcome.DEFERRED, 452)}
    assert outcomes(second) == {BOB: (Outcome.SENT, 250)}
    assert messages == [(True, b""), (True, CONTENT)]  # the dot alone, then bob's
    assert reads.count(CONTENT) == 1  # the refused transaction never carried it
    assert opened == 2


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [(b"550 5.7.1 sender refused", Outcome.BOUNCED), (b"451 4.3.0 later", Outcome.DEFERRED)],
)
def test_mail_refused_sends_nothing(
    mx_tls: ssl.SSLContext, refusal: bytes, expected: Outcome
) -> None:
    # This peer answers the RCPTs 250 and DATA 354 after refusing MAIL: still no content.
    with HostileServer(
        MX_IP, context=mx_tls, pipelining=True, replies={b"MAIL FROM": refusal}
    ) as mx:
        (result,) = deliver(mx.port, (BOB, CAROL))
        reads = b"".join(seen.line for seen in mx.reads)
        messages = list(mx.messages)
    assert {r.outcome for r in result.results} == {expected}
    assert CONTENT not in reads
    assert messages == [(True, b"")]


def test_a_cached_connection_the_peer_closed_is_replaced(mx_tls: ssl.SSLContext) -> None:
    # The pipelined group meets a dead connection: no reply to MAIL, so nothing was
    # decided there, and the delivery goes over a new connection.
    first = HostileServer(MX_IP, context=mx_tls, pipelining=True).start()
    second = HostileServer(MX_IP, first.port, context=mx_tls, pipelining=True)

    def restart() -> None:
        first.stop()
        second.start()

    try:
        results = deliver(first.port, (BOB,), (CAROL,), between=restart)
        assert [outcomes(result) for result in results] == [
            {BOB: (Outcome.SENT, 250)},
            {CAROL: (Outcome.SENT, 250)},
        ]
        assert [len(first.messages), len(second.messages)] == [1, 1]
    finally:
        second.stop()


def test_a_surplus_reply_is_caught_before_the_group(mx_tls: ssl.SSLContext) -> None:
    surplus = b"250 2.0.0 surplus: ok\r\n"
    with HostileServer(MX_IP, context=mx_tls, pipelining=True, surplus=surplus) as mx:
        result = outbound.deliver(config(mx.port), "dest.test", (BOB,), CONTENT)
        after_tls = [seen.line.split()[0] for seen in mx.commands if seen.tls]
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.DEFERRED, 451, "4.5.0")
    }
    assert after_tls == [b"EHLO"]


SINK_IP = "127.0.0.174"


@pytest.fixture
def sink_options() -> tuple[str, ...]:
    return ()


@pytest.fixture
def sink(tmp_path: Path, sink_options: tuple[str, ...]) -> Iterator[tuple[int, Path]]:
    """``smtp-sink`` on a free port of ``SINK_IP``, dumping each message under a
    directory: (port, directory)."""
    with socket.socket() as probe:
        probe.bind((SINK_IP, 0))
        port = probe.getsockname()[1]
    dump = tmp_path / "dump"
    dump.mkdir()
    argv = ["/usr/sbin/smtp-sink", "-u", "root", "-d", f"{dump}/%M.", *sink_options]
    process = subprocess.Popen([*argv, f"{SINK_IP}:{port}", "10"])
    try:
        wait_until(lambda: _listening(port), 10, "smtp-sink")
        yield port, dump
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as conn:
        return conn.connect_ex((SINK_IP, port)) == 0


def sink_deliver(port: int, rcpts: tuple[str, ...]) -> DeliveryResult:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "outbound": {"port": port, "default_level": "may", "command_timeout": "5s"},
        "route": [{"domain": "dest.test", "nexthop": f"[{SINK_IP}]:{port}"}],
    }
    cfg = validate(raw, "test.toml", Path("/nonexistent"))
    return outbound.deliver(cfg, "dest.test", rcpts, CONTENT)


def test_smtp_sink_takes_a_pipelined_delivery(sink: tuple[int, Path]) -> None:
    port, dump = sink
    result = sink_deliver(port, (BOB, CAROL))
    assert outcomes(result) == {BOB: (Outcome.SENT, 250), CAROL: (Outcome.SENT, 250)}
    (message,) = [path.read_bytes() for path in dump.iterdir()]
    assert b"X-Rcpt-Args: <bob@dest.test>\nX-Rcpt-Args: <carol@dest.test>\n" in message
    assert message.replace(b"\n", b"\r\n").endswith(CONTENT + b"\r\n")  # then the dump's blank line


@pytest.mark.parametrize("sink_options", [("-Q", "MAIL")])
def test_smtp_sink_421_to_mail_defers(sink: tuple[int, Path]) -> None:
    port, dump = sink
    result = sink_deliver(port, (BOB, CAROL))
    assert {(r.outcome, r.reply.code) for r in result.results} == {(Outcome.DEFERRED, 421)}
    assert list(dump.iterdir()) == []


def test_without_pipelining_one_command_per_round_trip(mx_tls: ssl.SSLContext) -> None:
    with HostileServer(MX_IP, context=mx_tls) as mx:
        (result,) = deliver(mx.port, (BOB, CAROL))
        reads = [seen.line for seen in mx.reads if seen.tls]
    assert outcomes(result) == {BOB: (Outcome.SENT, 250), CAROL: (Outcome.SENT, 250)}
    assert [read.split(b":")[0] for read in reads[1:5]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA\r\n",
    ]
