"""DeliveryAgent end to end on loopback: real DNS (TinyDns), real SMTP, real TLS.

Receivers listen on 127.0.0.50-59; MX hosts resolve there through TinyDns. Addresses
127.0.0.58 and .59 have nothing listening: connections to them are refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mta.config import Config, validate
from mta.model import DeliveryResult, Outcome
from mta.tlsbase import is_forward_secret
from tests.integration import outbound
from tests.integration.dnsserver import TinyDns, Zone
from tests.integration.receivers import Receiver
from tests.integration.relayproc import common_port

MX_IP = "127.0.0.50"  # the receiver behind mx.test and most routes
SPARE_IP = "127.0.0.51"
SCRIPTED_IP = "127.0.0.52"
DEAD_IP = "127.0.0.59"
SENDER = "alice@sender.test"
CONTENT = b"Subject: hello\r\n\r\nline one\n.leading dot\r\nlast line\r\n"

ZONE: Zone = {
    "mx.test": {"A": [MX_IP]},  # also its own implicit MX
    "verify.test": {"MX": ["10 mx.test."]},
    "mismatch.test": {"MX": ["10 other-name.test."]},
    "other-name.test": {"A": [MX_IP]},
    "foreign.test": {"MX": ["10 mx.test."]},
    "fallback.test": {"MX": ["10 dead.test.", "20 mx.test."]},
    "dead.test": {"A": [DEAD_IP]},
    "twoaddr.test": {"MX": ["10 two.test."]},
    "two.test": {"A": [DEAD_IP, MX_IP]},
    "nullmx.test": {"MX": ["0 ."]},
    "greylist.test": {"MX": ["10 busy.test.", "20 spare.test."]},
    "busy.test": {"A": [SCRIPTED_IP]},
    "spare.test": {"A": [SPARE_IP]},
    "refusing.test": {"MX": ["10 busy.test."]},
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TinyDns]:
    with TinyDns(ZONE) as server:
        yield server


def make_config(
    dns_server: TinyDns,
    port: int,
    *,
    level: str = "encrypt",
    ca_file: Path | None = None,
    route: str | None = None,
    timeout: str = "5s",
) -> Config:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "dns": {"resolvers": [f"127.0.0.1:{dns_server.port}"], "timeout": "5s"},
        "outbound": {
            "port": port,
            "default_level": level,
            "connect_timeout": timeout,
            "command_timeout": "10s",
        },
    }
    if ca_file is not None:
        raw["tls"] = {"ca_file": str(ca_file)}
    if route is not None:
        raw["route"] = [{"domain": "dest.test", "nexthop": route}]
    return validate(raw, "test.toml", Path("/nonexistent"))


def deliver(
    cfg: Config, domain: str, rcpts: tuple[str, ...], content: bytes = CONTENT
) -> DeliveryResult:
    return outbound.deliver(cfg, domain, rcpts, content, sender=SENDER)


def routed(dns_server: TinyDns, receiver: Receiver, level: str = "encrypt") -> Config:
    return make_config(
        dns_server, receiver.port, level=level, route=f"[{receiver.host}]:{receiver.port}"
    )


def summary(result: DeliveryResult) -> set[tuple[Outcome, int, str, str | None]]:
    return {(r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in result.results}


# --- TLS levels ---


def test_encrypt_delivers_over_forward_secret_tls(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
        (got,) = receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert result.results[0].reply.code == 250
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["bob@dest.test"]
    # Line endings normalised to CRLF, the leading dot survives (dot-stuffed on the wire).
    assert got.content == b"Subject: hello\r\n\r\nline one\r\n.leading dot\r\nlast line\r\n"
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert is_forward_secret(got.tls_version, got.tls_cipher)
    assert result.tls is not None
    assert (result.tls.version, result.tls.cipher) == (got.tls_version, got.tls_cipher)
    assert result.tls.peer_verified is False
    assert result.mx == MX_IP


def test_encrypt_defers_when_starttls_is_not_offered(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="none", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "starttls-not-supported")}


def test_each_session_records_our_end_of_the_connection(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    """TLS-RPT's sending-mta-ip: the local address of every connection made, sent or
    failed; none for a connection that never came about."""
    with Receiver(MX_IP, tls="none", ca=tls_ca) as receiver:
        failed = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        sent = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
        receiver.wait_for(1, timeout=5)
    refused = deliver(
        make_config(dns_server, common_port([DEAD_IP])), "dead.test", ("bob@dead.test",)
    )
    for result in (failed, sent):
        (session,) = result.sessions
        assert session.local_address.startswith("127.")
    assert [s.local_address for s in refused.sessions] == [""]


def test_encrypt_defers_without_forward_secrecy(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    with Receiver(MX_IP, tls="non-fs", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "no-forward-secrecy")}


def test_may_sends_in_clear_when_tls_is_not_offered(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="none", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver, "may"), "dest.test", ("bob@dest.test",))
        (got,) = receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert got.tls_version is None
    assert result.tls is None


def test_may_still_uses_tls_when_offered(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver, "may"), "dest.test", ("bob@dest.test",))
        (got,) = receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert result.tls is not None


def test_may_prefers_tls_without_forward_secrecy_to_plaintext(
    tls_ca: trustme.CA, dns_server: TinyDns, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8 §5: at ``may`` clear is only for peers that offer no TLS at all."""
    with Receiver(MX_IP, tls="non-fs", ca=tls_ca) as receiver:
        result = deliver(routed(dns_server, receiver, "may"), "dest.test", ("bob@dest.test",))
        (got,) = receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert got.tls_version == "TLSv1.2"
    assert not is_forward_secret(got.tls_version, got.tls_cipher)
    assert result.tls is not None
    assert result.tls.cipher == got.tls_cipher
    (weaker,) = [r for r in caplog.records if r.getMessage() == "deliver.tls.weaker"]
    assert weaker.levelname == "WARNING"
    assert vars(weaker)["forward_secret"] is False


def test_verify_with_the_ca_delivers(
    tls_ca: trustme.CA, ca_file: Path, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = make_config(dns_server, receiver.port, level="verify", ca_file=ca_file)
        result = deliver(cfg, "verify.test", ("bob@verify.test",))
        receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert result.mx == "mx.test"
    assert result.tls is not None
    assert result.tls.peer_verified is True


def test_verify_without_the_ca_defers(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = make_config(dns_server, receiver.port, level="verify")
        result = deliver(cfg, "verify.test", ("bob@verify.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "certificate-not-trusted")}


def test_verify_defers_when_the_certificate_names_another_host(
    tls_ca: trustme.CA, ca_file: Path, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = make_config(dns_server, receiver.port, level="verify", ca_file=ca_file)
        result = deliver(cfg, "mismatch.test", ("bob@mismatch.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "certificate-host-mismatch")}


def test_secure_delivers_when_the_mx_is_the_domain(
    tls_ca: trustme.CA, ca_file: Path, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = make_config(dns_server, receiver.port, level="secure", ca_file=ca_file)
        result = deliver(cfg, "mx.test", ("bob@mx.test",))  # implicit MX
        receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}


def test_secure_refuses_an_mx_outside_the_domain(
    tls_ca: trustme.CA, ca_file: Path, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = make_config(dns_server, receiver.port, level="secure", ca_file=ca_file)
        result = deliver(cfg, "foreign.test", ("bob@foreign.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.5", "certificate-host-mismatch")}


# --- recipients ---


def test_refused_recipients_get_their_own_results(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    refusals = {
        "carol@dest.test": "550 5.1.1 No such user",
        "dave@dest.test": "450 4.2.1 Mailbox busy",
    }
    rcpts = ("bob@dest.test", "carol@dest.test", "dave@dest.test")
    with Receiver(MX_IP, tls="fs", ca=tls_ca, rcpt_reply=refusals) as receiver:
        result = deliver(routed(dns_server, receiver), "dest.test", rcpts)
        (got,) = receiver.wait_for(1, timeout=5)
    by_rcpt = {r.rcpt: r for r in result.results}
    assert [r.rcpt for r in result.results] == list(rcpts)
    assert by_rcpt["bob@dest.test"].outcome is Outcome.SENT
    assert by_rcpt["carol@dest.test"].outcome is Outcome.BOUNCED
    assert (by_rcpt["carol@dest.test"].reply.code, by_rcpt["carol@dest.test"].reply.enhanced) == (
        550,
        "5.1.1",
    )
    assert by_rcpt["dave@dest.test"].outcome is Outcome.DEFERRED
    assert by_rcpt["dave@dest.test"].reply.enhanced == "4.2.1"
    assert got.rcpt_tos == ["bob@dest.test"]


def test_no_data_when_every_recipient_is_refused(tls_ca: trustme.CA, dns_server: TinyDns) -> None:
    refusals = {"bob@dest.test": "550 5.1.1 No such user"}
    with Receiver(MX_IP, tls="fs", ca=tls_ca, rcpt_reply=refusals) as receiver:
        result = deliver(routed(dns_server, receiver), "dest.test", ("bob@dest.test",))
        assert receiver.messages == []
    assert summary(result) == {(Outcome.BOUNCED, 550, "5.1.1", None)}


# --- hosts and addresses ---


def test_refused_connection_moves_on_to_the_next_mx(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(
            make_config(dns_server, receiver.port), "fallback.test", ("b@fallback.test",)
        )
        receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert result.mx == "mx.test"


def test_refused_connection_moves_on_to_the_next_address(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        result = deliver(
            make_config(dns_server, receiver.port), "twoaddr.test", ("b@twoaddr.test",)
        )
        receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert result.mx == "two.test"


def test_nothing_reachable_defers_with_4_4_1(dns_server: TinyDns) -> None:
    with Receiver(MX_IP, tls="fs") as receiver:
        port = receiver.port
    result = deliver(make_config(dns_server, port), "fallback.test", ("b@fallback.test",))
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.4.1", None)}
    assert result.mx == "mx.test"


def test_null_mx_bounces(dns_server: TinyDns) -> None:
    result = deliver(make_config(dns_server, 2525), "nullmx.test", ("b@nullmx.test",))
    assert summary(result) == {(Outcome.BOUNCED, 556, "5.1.10", None)}


def test_unknown_domain_bounces(dns_server: TinyDns) -> None:
    result = deliver(make_config(dns_server, 2525), "nowhere.test", ("b@nowhere.test",))
    assert summary(result) == {(Outcome.BOUNCED, 550, "5.4.4", None)}


# --- servers that misbehave (a scripted server; no STARTTLS, so level may) ---

Script = dict[str, str]
SILENT = "(silent)"


class ScriptedServer:
    """Greets with ``script["greeting"]`` (``SILENT``: never), answers each command verb
    from ``script`` (default ``250``); ``DATA`` gets 354, then ``script["DOT"]``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sessions: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        self.writers.append(writer)
        greeting = self.script.get("greeting", "220 scripted ESMTP")
        if greeting == SILENT:
            await reader.read()  # say nothing until the client gives up
            return
        writer.write((greeting + "\r\n").encode())
        while line := await reader.readline():
            verb = line.decode().split(" ", 1)[0].split(":", 1)[0].strip().upper()
            if verb == "EHLO":
                reply = self.script.get("EHLO", "250-scripted\r\n250 8BITMIME")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                reply = self.script.get("DOT", "250 2.0.0 OK")
            else:
                reply = self.script.get(verb, "250 2.0.0 OK")
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.sessions, return_exceptions=True)


def run_with_server(
    script: Script, port: int, attempt: Callable[[], Awaitable[DeliveryResult]]
) -> DeliveryResult:
    async def main() -> DeliveryResult:
        scripted = ScriptedServer(script)
        server = await asyncio.start_server(scripted.session, SCRIPTED_IP, port)
        try:
            return await attempt()
        finally:
            server.close()
            await scripted.close()
            await server.wait_closed()

    return asyncio.run(main())


def agent_attempt(
    cfg: Config, domain: str, rcpts: tuple[str, ...], *, smtputf8: bool = False
) -> Callable[[], Coroutine[Any, Any, DeliveryResult]]:
    return lambda: outbound.attempt(cfg, domain, rcpts, CONTENT, sender=SENDER, smtputf8=smtputf8)


def test_a_5xx_to_mail_from_bounces_every_recipient(dns_server: TinyDns) -> None:
    with Receiver(SPARE_IP, tls="none") as spare:
        cfg = make_config(dns_server, spare.port, level="may")
        rcpts = ("a@refusing.test", "b@refusing.test")
        script = {"MAIL": "550 5.7.1 Sender rejected"}
        result = run_with_server(script, spare.port, agent_attempt(cfg, "refusing.test", rcpts))
    assert summary(result) == {(Outcome.BOUNCED, 550, "5.7.1", None)}


def test_a_4xx_greeting_moves_on_to_the_next_mx(dns_server: TinyDns) -> None:
    with Receiver(SPARE_IP, tls="none") as spare:
        cfg = make_config(dns_server, spare.port, level="may")
        script = {"greeting": "421 4.3.2 Too busy, try later"}
        result = run_with_server(
            script, spare.port, agent_attempt(cfg, "greylist.test", ("a@greylist.test",))
        )
        spare.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert result.mx == "spare.test"


def test_a_4xx_to_mail_from_on_the_only_host_defers(dns_server: TinyDns) -> None:
    port = common_port([SPARE_IP, SCRIPTED_IP])  # nothing listens on the spare MX
    cfg = make_config(dns_server, port, level="may")
    script = {"MAIL": "451 4.7.1 Greylisted"}
    result = run_with_server(
        script, port, agent_attempt(cfg, "refusing.test", ("a@refusing.test",))
    )
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.7.1", None)}
    text = result.results[0].reply.text
    assert text.startswith(f"host busy.test[{SCRIPTED_IP}]:{port} said: 451 4.7.1 Greylisted")
    assert text.endswith("(in reply to MAIL FROM)")


def test_a_silent_server_times_out_and_defers(dns_server: TinyDns) -> None:
    port = common_port([SPARE_IP, SCRIPTED_IP])  # nothing listens on the spare MX
    cfg = make_config(dns_server, port, level="may", timeout="0.5s")
    result = run_with_server(
        {"greeting": SILENT}, port, agent_attempt(cfg, "refusing.test", ("a@refusing.test",))
    )
    assert summary(result) == {(Outcome.DEFERRED, 451, "4.4.1", None)}
    assert "timed out" in result.results[0].reply.text


def test_smtputf8_address_bounces_when_the_server_lacks_smtputf8(dns_server: TinyDns) -> None:
    port = common_port([SPARE_IP, SCRIPTED_IP])  # nothing listens on the spare MX
    cfg = make_config(dns_server, port, level="may")
    attempt = agent_attempt(cfg, "refusing.test", ("bøb@refusing.test",), smtputf8=True)
    result = run_with_server({}, port, attempt)
    assert summary(result) == {(Outcome.BOUNCED, 550, "5.6.7", None)}


def test_smtputf8_address_is_sent_when_the_server_has_smtputf8(
    tls_ca: trustme.CA, dns_server: TinyDns
) -> None:
    with Receiver(MX_IP, tls="fs", ca=tls_ca) as receiver:
        cfg = routed(dns_server, receiver)
        result = asyncio.run(agent_attempt(cfg, "dest.test", ("bøb@dest.test",), smtputf8=True)())
        (got,) = receiver.wait_for(1, timeout=5)
    assert {r.outcome for r in result.results} == {Outcome.SENT}
    assert got.rcpt_tos == ["bøb@dest.test"]


@pytest.mark.parametrize(
    ("dot_reply", "outcome"),
    [("554 5.6.0 Content rejected", Outcome.BOUNCED), ("452 4.3.1 Full", Outcome.DEFERRED)],
)
def test_the_reply_to_data_decides_the_accepted_recipients(
    dns_server: TinyDns, dot_reply: str, outcome: Outcome
) -> None:
    port = common_port([SPARE_IP, SCRIPTED_IP])  # nothing listens on the spare MX
    cfg = make_config(dns_server, port, level="may")
    rcpts = ("a@refusing.test", "b@refusing.test")
    result = run_with_server(
        {"DOT": dot_reply, "RCPT": "250 2.1.5 OK"}, port, agent_attempt(cfg, "refusing.test", rcpts)
    )
    code, enhanced, _text = dot_reply.split(" ", 2)
    assert summary(result) == {(outcome, int(code), enhanced, None)}
