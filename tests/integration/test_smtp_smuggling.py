"""SMTP smuggling (CVE-2023-51764/51765/51766 class; aiosmtpd CVE-2024-27305).

A sender hides a second transaction inside the first message's DATA behind an end-of-data
sequence that some server in the chain accepts and another does not (``<LF>.<CR><LF>``,
``<CR>.<CR><LF>``, ``<CR><LF>.<LF>``, ``<LF>.<LF>``, bare LF, bare CR). The relay ends
DATA only at ``<CR><LF>.<CR><LF>`` (aiosmtpd) and refuses a message holding a bare CR or
LF anywhere (``550 5.5.2``), so it never becomes the hop that hands the hidden
transaction to the next server. Command lines ended by a bare LF (or holding a bare CR)
get ``521 5.5.2 ... bare <LF> received`` and the connection is closed; nothing after
them is executed.

Shown three ways: with a raw client against the listeners (one reply per DATA, nothing
stored); through a relay process with a real receiving server behind it (exactly the
one honest message arrives, never the smuggled one); and on the way out (aiosmtplib
writes CRLF lines and dot-stuffs, so a receiver finds exactly one end of data).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mta.config import validate
from mta.model import Outcome
from tests.integration import outbound
from tests.integration.hostile import HostileServer
from tests.integration.inbound import (
    PASSWORD,
    RawSmtp,
    Relay,
)
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, wait_until

RECEIVER_IP = "127.0.0.162"
WIRE_IP = "127.0.0.163"

SMUGGLED = (
    b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled body\r\n.\r\n"
)
# The end-of-data look-alikes of the smuggling papers, and lone CR and LF.
SEQUENCES = {
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "bare-LF": b"\n",
    "bare-CR": b"\r",
}


def smuggling(sequence: bytes, rcpt_domain: str = "dest.test") -> bytes:
    """A DATA section: one message, a fake end of data, a whole second transaction."""
    hidden = SMUGGLED.replace(b"@dest.test", b"@" + rcpt_domain.encode())
    return b"Subject: honest\r\n\r\nfirst part" + sequence + hidden


def start_transaction(client: RawSmtp, rcpt: str = "<b@local.test>") -> None:
    assert client.command("MAIL FROM:<a@example.test>").startswith("250")
    assert client.command(f"RCPT TO:{rcpt}").startswith("250")
    assert client.command("DATA").startswith("354")


# --- DATA: the listeners, with a raw client ---


@pytest.mark.parametrize("sequence", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_smuggled_transaction_is_refused_with_one_reply(relay: Relay, sequence: bytes) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        start_transaction(client)
        client.send(smuggling(sequence, "local.test"))
        assert client.reply().startswith("550 5.5.2 ")
        assert client.pending(0.3) == b""  # no reply to any smuggled command
        assert client.command("NOOP") == "250 2.0.0 OK"  # still in step
        # the session goes on: an honest message right after is taken
        start_transaction(client)
        client.send(b"Subject: next\r\n\r\nclean\r\n.\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued as Q0001")
    calls = relay.accept.calls
    assert [envelope.mail_from for envelope, _ in calls] == ["a@example.test"]
    assert b"smuggled" not in calls[0][1]


def test_data_ends_only_at_crlf_dot_crlf(relay: Relay) -> None:
    """``<CR><LF>.<CR><LF>`` written as a dot-stuffed line is data, not an end."""
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        start_transaction(client)
        client.send(b"Subject: dots\r\n\r\nline\r\n..\r\nMAIL FROM:<x@example.test>\r\n.\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued as Q0001")
        assert client.pending(0.3) == b""
    (_, content) = relay.accept.calls[0]
    assert content.endswith(b"\r\nline\r\n.\r\nMAIL FROM:<x@example.test>\r\n")


# --- command lines ended by a bare LF, or holding a bare CR ---


@pytest.mark.parametrize(
    ("line", "what"),
    [
        (b"EHLO client.test\n", b"<LF>"),
        (b"NOOP\rRSET\r\n", b"<CR>"),
        (b"EHLO client.test\r\r\n", b"<CR>"),
    ],
)
def test_bare_line_ending_in_a_command_line_hangs_up(
    relay: Relay, line: bytes, what: bytes
) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.send(line)
        assert client.line() == b"521 5.5.2 mx.test Error: bare " + what + b" received\r\n"
        assert client.rest() == b""


def test_nothing_pipelined_after_a_bare_lf_command_runs(relay: Relay) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.send(
            b"EHLO client.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@local.test>\n"
            b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
        )
        assert client.reply().endswith("250 HELP")
        assert client.reply().startswith("250 2.1.0")
        assert client.reply() == "521 5.5.2 mx.test Error: bare <LF> received"
        assert client.rest() == b""
    assert relay.accept.attempts == 0


def test_bare_lf_in_an_auth_continuation_line_hangs_up(relay: Relay, ca_file: Path) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        assert client.command("STARTTLS").startswith("220")
        client.starttls(ssl.create_default_context(cafile=str(ca_file)))
        client.command("EHLO client.test")
        assert client.command("AUTH LOGIN").startswith("334")
        client.send(b"YWxpY2U=\n" + PASSWORD.encode() + b"\r\n")
        assert client.reply() == "521 5.5.2 mx.test Error: bare <LF> received"


# --- through a relay process, to a real receiving server ---


@pytest.fixture(scope="module")
def chain(
    tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RelayProcess, Receiver]]:
    """A relay process whose route for dest.test leads to a real receiving server."""
    with Receiver(RECEIVER_IP, tls="fs", ca=tls_ca) as receiver:
        relay = RelayProcess(
            tmp_path_factory.mktemp("smuggling-relay"),
            f'[[route]]\ndomain = "dest.test"\nnexthop = "[{RECEIVER_IP}]:{receiver.port}"\n',
        ).start()
        try:
            yield relay, receiver
        finally:
            relay.stop()


def test_through_the_relay_exactly_the_honest_message_arrives(
    chain: tuple[RelayProcess, Receiver],
) -> None:
    relay, receiver = chain
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        for sequence in SEQUENCES.values():
            start_transaction(client, "<bob@dest.test>")
            client.send(smuggling(sequence))
            assert client.reply().startswith("550 5.5.2 ")
        start_transaction(client, "<bob@dest.test>")
        client.send(b"Subject: honest\r\n\r\nthe only message\r\n.\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued as ")
        assert client.command("QUIT").startswith("221")
    (got,) = receiver.wait_for(1, timeout=20)
    wait_until(lambda: relay.queue() == [], 20, "the relay's queue to empty")
    assert len(receiver.messages) == 1
    assert got.rcpt_tos == ["bob@dest.test"]
    assert got.content.endswith(b"Subject: honest\r\n\r\nthe only message\r\n")
    assert b"smuggled" not in got.content
    assert got.tls_version is not None


# --- on the way out: what our client writes ---


@pytest.mark.parametrize("sequence", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_outbound_data_has_one_end_whatever_the_content(sequence: bytes) -> None:
    """Even content that never passes our listener (it refuses bare CR and LF) leaves
    as CRLF lines, dot-stuffed: the receiver finds one message and no commands in it."""
    content = smuggling(sequence)

    async def attempt(port: int) -> Outcome:
        raw: dict[str, Any] = {
            "outbound": {"port": port, "connect_timeout": "5s", "command_timeout": "5s"},
            "route": [{"domain": "dest.test", "nexthop": f"[{WIRE_IP}]:{port}"}],
            "domain": [{"name": "dest.test", "level": "may"}],  # the wire recorder has no TLS
        }
        cfg = validate(raw, "test.toml", Path("/nonexistent"))
        result = await outbound.attempt(cfg, "dest.test", ["bob@dest.test"], content)
        return result.results[0].outcome

    with HostileServer(WIRE_IP) as wire:
        outcome = asyncio.run(attempt(wire.port))
        commands, messages = list(wire.commands), list(wire.messages)
    assert outcome is Outcome.SENT
    assert [c.line.split()[0] for c in commands] == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]
    ((_, data),) = messages
    lines = data.split(b"\r\n")
    assert lines[-1] == b""
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert b"." not in lines  # no end of data inside it


# --- NUL: a next hop that drops NULs would see an end of data (smtpsmug's nullbefore) ---

NUL_SEQUENCES = {
    "nullbefore": b"\r\n\x00.\r\n",
    "nullafter": b"\r\n.\x00\r\n",
    "null-in-line": b"\r\nline\x00\r\n",
}


@pytest.mark.parametrize("sequence", NUL_SEQUENCES.values(), ids=NUL_SEQUENCES.keys())
def test_nul_in_data_is_refused_with_one_reply(relay: Relay, sequence: bytes) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        start_transaction(client, "<b@local.test>")
        client.send(smuggling(sequence, "local.test"))
        assert client.reply() == "550 5.6.0 Message contains NUL characters"
        assert client.pending(0.3) == b""  # no reply to any smuggled command
        assert client.command("NOOP") == "250 2.0.0 OK"  # still in step
    assert relay.accept.attempts == 0


@pytest.mark.parametrize("line", [b"NOOP\x00\r\n", b"MAIL FROM:<a@example.test>\x00\r\n"])
def test_nul_in_a_command_line_hangs_up(relay: Relay, line: bytes) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        client.command("EHLO client.test")
        client.send(line + b"RCPT TO:<b@local.test>\r\nDATA\r\n")
        assert client.reply() == "521 5.5.2 mx.test Error: <NUL> received"
        assert client.rest() == b""
    assert relay.accept.attempts == 0
