"""Inbound limits, each with the reply it must give (``limits.*``; mta/receive/server.py).

Line lengths (RFC 5321 §4.5.3.1): a command line over 512 octets and a text line over
1000 get ``500 5.5.2`` and the session goes on. Size: ``552 5.3.4``. Recipients:
``452 4.5.3`` (not counted as the client's errors until far past the limit). Errors per
session: ``421 4.7.0`` and disconnect. Connections per client and in total: ``421
4.7.0`` instead of the greeting. Idle and DATA time: ``421 4.4.2`` and disconnect, and a
slowloris client trickling its message byte by byte is cut off at the DATA deadline
however busy it looks. AUTH failures per client address: ``421 4.7.0``, even with the
right password, from that address only.
"""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import time
from pathlib import Path

import pytest

from mta.errors import SpoolFull
from mta.receive.server import HELD_REPLIES
from tests.integration.inbound import (
    HOST,
    PASSWORD,
    TIMEOUT,
    USER,
    RawSmtp,
    Recorder,
    Relay,
    make_config,
    wait_for_record,
)
from tests.integration.relayproc import RelayProcess, policy

OTHER = "127.0.0.3"  # another client
THIRD = "127.0.0.4"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def with_limits(text: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("limits", [text], ids=[text.replace("\n", ",")])


def greeted(relay: Relay, source: str = HOST) -> RawSmtp:
    client = RawSmtp(relay.port, source=source)
    assert client.reply().startswith("220 mx.test")
    assert client.command("EHLO client.test").endswith("250 HELP")
    return client


def start_transaction(client: RawSmtp) -> None:
    assert client.command("MAIL FROM:<a@example.test>").startswith("250")
    assert client.command("RCPT TO:<b@local.test>").startswith("250")
    assert client.command("DATA").startswith("354")


# --- line lengths ---


def test_command_line_limit_is_512_octets(relay: Relay) -> None:
    with greeted(relay) as client:
        assert client.command("NOOP " + "x" * 507) == "250 2.0.0 OK"  # 512 before CRLF
        assert client.command("NOOP " + "x" * 508) == "500 5.5.2 Command line too long"
        assert client.command("NOOP " + "x" * 5000) == "500 5.5.2 Command line too long"
        assert client.command("NOOP") == "250 2.0.0 OK"


def test_repeated_ehlo_does_not_lengthen_the_mail_limit(relay: Relay) -> None:
    """aiosmtpd adds 26 (SIZE) to MAIL's limit on every EHLO, for every session."""
    with greeted(relay) as client:
        for _ in range(30):
            client.command("EHLO client.test")
        path = "<" + "a" * 60 + "@" + ".".join(["d" * 60] * 8) + ".test>"
        line = f"MAIL FROM:{path} SIZE=10"
        assert 538 < len(line) < 600
        assert client.command(line) == "500 5.5.2 Command line too long"
    with greeted(relay) as other:  # nor for anyone else
        assert other.command(line) == "500 5.5.2 Command line too long"


def test_text_line_limit_is_1000_octets(relay: Relay) -> None:
    with greeted(relay) as client:
        start_transaction(client)
        client.send(b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued")
        for length in (1000, 5000):
            start_transaction(client)
            client.send(b"Subject: too long\r\n\r\n" + b"x" * length + b"\r\nmore\r\n.\r\n")
            assert client.reply() == "500 5.5.2 Line too long (1000 octets at most)"
        assert client.command("NOOP") == "250 2.0.0 OK"
    assert relay.accept.attempts == 1


# --- size and recipients ---


def test_message_size(relay: Relay) -> None:  # make_config: message_size = "64k"
    with greeted(relay) as client:
        assert client.command("MAIL FROM:<a@example.test> SIZE=65537").startswith("552 5.3.4")
        assert client.command("MAIL FROM:<a@example.test> SIZE=65536").startswith("250")
        assert client.command("RSET").startswith("250")
        start_transaction(client)
        client.send(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 700 + b".\r\n")
        assert client.reply() == "552 5.3.4 Message size exceeds fixed limit"
        assert client.command("NOOP") == "250 2.0.0 OK"
    assert relay.accept.attempts == 0


@with_limits("recipients = 2\nerrors = 3")
def test_too_many_recipients_is_452_and_not_an_error(relay: Relay) -> None:
    with greeted(relay) as client:
        assert client.command("MAIL FROM:<a@example.test>").startswith("250")
        replies = [client.command(f"RCPT TO:<r{n}@local.test>") for n in range(8)]
        assert [r[:9] for r in replies] == ["250 2.1.5"] * 2 + ["452 4.5.3"] * 6
        assert client.command("DATA").startswith("354")
        client.send(MESSAGE)
        assert client.reply().startswith("250 2.0.0 Ok: queued")
    assert relay.accept.calls[0][0].rcpt_tos == ("r0@local.test", "r1@local.test")


# --- errors per session ---


@with_limits("errors = 3")
def test_too_many_errors_hangs_up_and_runs_nothing_after(relay: Relay) -> None:
    with greeted(relay) as client:
        client.send(
            b"RCPT TO:<x@local.test>\r\nBOGUS\r\nDATA\r\n"  # three errors
            b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n" + MESSAGE
        )
        assert client.reply().startswith("503")
        assert client.reply().startswith("500")
        assert client.reply().startswith("503")
        assert client.reply() == "421 4.7.0 mx.test Error: too many errors"
        assert client.rest() == b""
    assert relay.accept.attempts == 0


def test_nothing_pipelined_after_quit_runs(relay: Relay) -> None:
    with greeted(relay) as client:
        client.send(
            b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@local.test>\r\nQUIT\r\nDATA\r\n" + MESSAGE
        )
        assert client.reply().startswith("250 2.1.0")
        assert client.reply().startswith("250 2.1.5")
        assert client.reply().startswith("221")
        assert client.rest() == b""
    assert relay.accept.attempts == 0


@with_limits("errors = 2")
def test_our_own_trouble_is_not_the_clients_error(
    tmp_path: Path, server_tls: ssl.SSLContext, limits: str
) -> None:
    full = Recorder(fail=SpoolFull("disk full"))
    with (
        Relay(make_config(tmp_path, limits=limits), full, server_tls, None) as relay,
        greeted(relay) as client,
    ):
        for _ in range(3):
            start_transaction(client)
            client.send(MESSAGE)
            assert client.reply() == "452 4.3.1 Insufficient system storage"
        assert client.command("NOOP") == "250 2.0.0 OK"


# --- connections per client and in total ---


def refused(relay: Relay, source: str) -> str:
    with RawSmtp(relay.port, source=source) as client:
        reply = client.reply()
        assert client.rest() == b""
        return reply


def admitted_again(relay: Relay, source: str) -> RawSmtp:
    """A new connection from ``source``, once the server has counted a closed one out."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = RawSmtp(relay.port, source=source)
        if client.reply().startswith("220"):
            return client
        client.close()
        assert time.monotonic() < deadline, "the closed connection was never counted out"
        time.sleep(0.05)


@with_limits("connections = 3\nconnections_per_client = 2")
def test_connections_per_client_and_in_total(relay: Relay) -> None:
    first, second = greeted(relay), greeted(relay)
    try:
        assert refused(relay, HOST) == (
            "421 4.7.0 mx.test Error: too many connections from 127.0.0.1"
        )
        with greeted(relay, OTHER):  # another client still gets in: 3 in all
            assert refused(relay, THIRD) == "421 4.7.0 mx.test Error: too many connections"
        first.close()
        with admitted_again(relay, HOST):
            pass
    finally:
        first.close()
        second.close()


# --- time: idle, DATA deadline, slowloris ---


@with_limits('idle_timeout = "1s"')
def test_slow_command_is_cut_off_at_the_idle_timeout(relay: Relay) -> None:
    with greeted(relay) as client:
        took, said = client.trickle(b"NOOP\r\n" * 5, pause=0.3)
        assert said == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
        assert 0.5 < took < 3
        assert client.rest() == b""


@with_limits('idle_timeout = "10s"\ndata_timeout = "1.5s"\nconnections_per_client = 1')
def test_slowloris_data_is_cut_off_at_the_data_deadline(relay: Relay) -> None:
    """Bytes every 0.1 s keep no per-read timer from firing; the DATA deadline still does,
    and the slot it held is free again."""
    with greeted(relay) as client:
        start_transaction(client)
        assert refused(relay, HOST).startswith("421 4.7.0")  # the slow client holds the slot
        took, said = client.trickle(b"Subject: slow\r\n\r\n" + b"x" * 200, pause=0.1)
        assert said == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
        assert 1.0 < took < 4
        assert client.rest() == b""
    with admitted_again(relay, HOST):
        pass
    assert relay.accept.attempts == 0


@with_limits('idle_timeout = "1s"\ndata_timeout = "30s"')
def test_idle_timeout_applies_again_after_data(relay: Relay) -> None:
    with greeted(relay) as client:
        start_transaction(client)
        client.send(MESSAGE)
        assert client.reply().startswith("250 2.0.0 Ok: queued")
        started = time.monotonic()
        assert client.line() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
        assert time.monotonic() - started < 3


# --- AUTH failures per client address ---


def auth_plain(client: RawSmtp, password: str) -> str:
    blob = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
    return client.command(f"AUTH PLAIN {blob}")


def over_tls(relay: Relay, ca_file: Path, source: str = HOST) -> RawSmtp:
    client = greeted(relay, source)
    assert client.command("STARTTLS").startswith("220")
    client.starttls(ssl.create_default_context(cafile=str(ca_file)))
    assert client.command("EHLO client.test").endswith("250 HELP")
    return client


@with_limits('auth_failures = 2\nauth_failure_window = "1m"')
def test_auth_failures_are_rate_limited_per_client(relay: Relay, ca_file: Path) -> None:
    blocked = "421 4.7.0 mx.test Error: too many AUTH failures from 127.0.0.1"
    with over_tls(relay, ca_file) as client:
        assert auth_plain(client, "wrong").startswith("535 5.7.8")
        assert auth_plain(client, "wrong again").startswith("535 5.7.8")
        assert auth_plain(client, PASSWORD) == blocked
        assert client.rest() == b""
    with over_tls(relay, ca_file) as client:  # a new connection does not reset it
        assert auth_plain(client, PASSWORD) == blocked
    with over_tls(relay, ca_file, OTHER) as client:  # another address is not affected
        assert auth_plain(client, PASSWORD).startswith("235")


# --- hostile load: unread replies, junk commands, stress ---


def _unsent(relay: Relay) -> int:
    """Octets the relay holds for its sessions' clients: held replies and the transport's
    write buffer (run on the relay's loop)."""

    def count() -> int:
        total = 0
        for session in relay.sessions.live:
            if session.transport is not None:
                total += session.transport.get_write_buffer_size()
            total += sum(len(reply) + 2 for reply in session._held)
        return total

    return relay.call(count)


def _read_to_the_end(client: socket.socket) -> None:
    while client.recv(1 << 16):
        pass


@with_limits('idle_timeout = "1.5s"\njunk_commands = 1000000')
def test_a_client_that_never_reads_is_not_buffered_for(relay: Relay) -> None:
    """50,000 pipelined NOOPs and not one reply read: the relay holds at most its
    transport's high-water mark (64 KiB) and a few KiB of replies for the client, stops
    executing its commands while they wait (back-pressure), and drops it at the idle
    (write) timeout. Before, every reply to a batch of pipelined commands was held and
    then written at once, however much the client left unread."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads nothing anyway
    client.connect((HOST, relay.port))
    client.settimeout(TIMEOUT)
    assert client.recv(100).startswith(b"220 mx.test")  # the session exists

    def shrink() -> None:  # the replies must pile up in the relay, not in the kernel
        for session in relay.sessions.live:
            assert session.transport is not None
            sock = session.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    relay.call(shrink)
    client.sendall(b"NOOP\r\n" * 50_000)
    sent, peak = time.monotonic(), 0
    while relay.call(lambda: len(relay.sessions.live)) and time.monotonic() < sent + 10:
        peak = max(peak, _unsent(relay))
        time.sleep(0.002)
    gone = time.monotonic() - sent
    assert 0 < peak <= 64 * 1024 + HELD_REPLIES + 1024
    with pytest.raises(ConnectionResetError):  # dropped, not closed in good order
        _read_to_the_end(client)
    client.close()
    assert gone < 1.5 + 3  # dropped at the idle timeout after the last command it ran


@with_limits("junk_commands = 5")
def test_junk_commands_are_counted_until_a_message_is_accepted(relay: Relay) -> None:
    """Postfix's smtpd_junk_command_limit: EHLO, NOOP, RSET, VRFY, HELP count; an accepted
    message forgives them; one more than the limit is ``421 4.7.0`` and the end."""
    with greeted(relay) as client:  # EHLO: 1
        for command in ("NOOP", "RSET", "VRFY <b@local.test>"):
            assert client.command(command).startswith(("250", "252"))
        assert client.command("HELP").startswith("250")  # 5
        start_transaction(client)
        client.send(MESSAGE)
        assert client.reply().startswith("250 2.0.0 Ok: queued")
        for _ in range(5):
            assert client.command("NOOP") == "250 2.0.0 OK"
        client.send(b"NOOP\r\nMAIL FROM:<a@example.test>\r\n")
        assert client.reply() == "421 4.7.0 mx.test Error: too many junk commands"
        assert client.rest() == b""  # the MAIL pipelined after it never ran
    assert len(relay.accept.calls) == 1


@with_limits('connections = 10\nidle_timeout = "30s"\nstress_idle_timeout = "0.5s"')
def test_under_stress_idle_sessions_get_the_short_timeout(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Nine sessions of ten: stress mode. Idle ones, even those idle since before, are cut
    off after ``stress_idle_timeout``; once the count is back down, the normal one holds."""
    caplog.set_level(logging.INFO)
    first = greeted(relay)
    others = [greeted(relay, source=f"127.0.0.{10 + n}") for n in range(8)]
    started = time.monotonic()
    with first:
        assert first.reply() == "421 4.4.2 mx.test Error: timeout exceeded"
    assert time.monotonic() - started < 3
    for client in others:
        with client:
            assert client.reply() == "421 4.4.2 mx.test Error: timeout exceeded"
    wait_for_record(caplog, "receive.stress.end")
    with greeted(relay) as calm:
        assert calm.pending(1.5) == b""  # 30 s now
        assert calm.command("NOOP") == "250 2.0.0 OK"
    starts = [r for r in caplog.records if r.getMessage() == "receive.stress.start"]
    assert len(starts) == 1


def hops(received: int, delivered_to: int = 0) -> bytes:
    """A message that has passed ``received`` relays and ``delivered_to`` local deliveries."""
    trace = b"".join(
        b"Received: from hop%d.example (hop%d.example [192.0.2.%d])\r\n\tby mx; x\r\n" % (n, n, n)
        for n in range(received)
    )
    trace += b"Delivered-To: x@local.test\r\n" * delivered_to
    return trace + b"Subject: loop\r\n\r\nbody\r\n.\r\n"


def test_a_looping_message_is_refused_at_the_hop_limit(relay: Relay) -> None:
    """Postfix's hopcount_limit (50), our own Received: counted: 60 hops are ``554 5.4.6``
    and nothing is stored; 48 (49 with ours) pass."""
    with greeted(relay) as client:
        start_transaction(client)
        client.send(hops(60))
        assert client.reply() == "554 5.4.6 Too many hops"
        start_transaction(client)
        client.send(hops(25, delivered_to=24))
        assert client.reply() == "554 5.4.6 Too many hops"
        start_transaction(client)
        client.send(hops(48))
        assert client.reply().startswith("250 2.0.0 Ok: queued as Q0001")
    assert len(relay.accept.calls) == 1


@with_limits('message_size = "16MiB"\ndata_timeout = "60s"')
@pytest.mark.parametrize(
    "header",
    [
        b"".join(b"X-Filler-%06d: some header value\r\n" % n for n in range(100_000)),
        b"X-Big: " + b"\r\n ".join([b"w" * 900] * 10_000) + b"\r\n",  # one 9 MB field
    ],
    ids=["100000-lines", "9MB-folded"],
)
def test_oversized_headers_are_refused(relay: Relay, header: bytes) -> None:
    with greeted(relay) as client:
        start_transaction(client)
        client.send(header + b"Subject: big\r\n\r\nbody\r\n.\r\n")
        assert client.reply() == "552 5.3.4 Message header too big"
        assert client.command("NOOP") == "250 2.0.0 OK"  # the session goes on
    assert relay.accept.attempts == 0


# --- shutdown ---


def test_shutdown_mid_data_says_421_and_keeps_nothing(tmp_path: Path) -> None:
    """SIGTERM while a client is in the middle of DATA: it reads ``421 4.3.2`` (not a
    silent hang-up) and the spool holds nothing of the half message."""
    relay = RelayProcess(tmp_path, policy("[127.0.0.1]:9")).start()
    try:
        before = relay.spool_files()
        with RawSmtp(relay.port) as client:
            assert client.reply().startswith("220")
            assert client.command("EHLO client.test").endswith("250 HELP")
            assert client.command("MAIL FROM:<a@example.test>").startswith("250")
            assert client.command("RCPT TO:<b@dest.test>").startswith("250")
            assert client.command("DATA").startswith("354")
            client.send(b"Subject: half\r\n\r\nthe first half of a message\r\n")
            assert client.pending(0.3) == b""
            assert relay.terminate() == 0
            assert client.reply() == "421 4.3.2 Service shutting down"
            assert client.rest() == b""
        assert relay.spool_files() == before
    finally:
        relay.stop()
