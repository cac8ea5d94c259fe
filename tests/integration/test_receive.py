"""The inbound listeners over real sockets on 127.0.0.0/8 (mta/receive/).

Each test starts ``start_listeners`` on its own event loop in a thread and talks to it
with ``smtplib`` (or raw bytes where a well-behaved client would not send them). The
``accept`` callable is a recorder: it keeps envelopes and returns fake queue ids.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import smtplib
import socket
import ssl
import subprocess
import threading
import warnings
from pathlib import Path

import aiosmtplib
import pytest

from mta.errors import ConfigError, SpoolFull
from mta.events import MessageReceived
from mta.receive.auth import PasswordFile
from tests.integration.inbound import (
    ADDRESS_USER,
    HOST,
    PASSWORD,
    TIMEOUT,
    TRUSTED,
    USER,
    RawSmtp,
    Recorder,
    Relay,
    make_config,
    wait_for_record,
)


def ehlo_keywords(smtp: smtplib.SMTP) -> set[str]:
    code, _ = smtp.ehlo()
    assert code == 250
    return {name.upper() for name in smtp.esmtp_features}


def reply(smtp: smtplib.SMTP, command: str) -> str:
    code, text = smtp.docmd(command)
    return f"{code} {text.decode()}"


def send_data(smtp: smtplib.SMTP, payload: bytes) -> str:
    """DATA with ``payload`` sent exactly as given (it must end with CRLF.CRLF)."""
    code, text = smtp.docmd("DATA")
    assert code == 354, text
    smtp.send(payload)
    code, text = smtp.getreply()
    return f"{code} {text.decode()}"


MESSAGE = b"From: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n.\r\n"


# --- EHLO, STARTTLS, AUTH ---


def test_ehlo_before_and_after_starttls(relay: Relay, client_context: ssl.SSLContext) -> None:
    with relay.client() as smtp:
        before = ehlo_keywords(smtp)
        assert {"STARTTLS", "SIZE", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= before
        assert "AUTH" not in before
        assert smtp.esmtp_features["size"] == str(64 * 1024)
        smtp.starttls(context=client_context)
        after = ehlo_keywords(smtp)
        assert "STARTTLS" not in after
        assert {"PIPELINING", "ENHANCEDSTATUSCODES"} <= after
        assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert reply(smtp, "STARTTLS").startswith("503 5.5.1")


def test_banner_names_host(relay: Relay) -> None:
    with socket.create_connection((HOST, relay.port), timeout=TIMEOUT) as sock:
        assert sock.recv(512).startswith(b"220 mx.test ESMTP mta")


def test_auth_before_starttls_refused(relay: Relay) -> None:
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with relay.client() as smtp:
        smtp.ehlo()
        code, _ = smtp.docmd("AUTH", f"PLAIN {blob}")
        assert 500 <= code < 600
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250")
        assert reply(smtp, "RCPT TO:<b@other.test>").startswith("554 5.7.1")


def test_auth_after_starttls(relay: Relay, client_context: ssl.SSLContext) -> None:
    with relay.client() as smtp:
        smtp.starttls(context=client_context)
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            smtp.login(USER, "wrong password")
        assert caught.value.smtp_code == 535
        code, text = smtp.login(USER, PASSWORD)
        assert code == 235, text


def test_auth_login_mechanism(relay: Relay, client_context: ssl.SSLContext) -> None:
    with relay.client() as smtp:
        smtp.starttls(context=client_context)
        smtp.ehlo()
        smtp.user, smtp.password = USER, PASSWORD
        code, _ = smtp.auth("LOGIN", smtp.auth_login)
        assert code == 235


def test_password_check_runs_off_the_event_loop(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    threads: list[threading.Thread] = []

    def checking(*args: object) -> object:
        threads.append(threading.current_thread())
        return passwords.authenticator(*args)  # type: ignore[arg-type]

    with Relay(make_config(tmp_path), recorder, server_tls, checking) as relay:
        with relay.client() as smtp:
            smtp.starttls(context=client_context)
            smtp.ehlo()
            assert smtp.login(USER, PASSWORD)[0] == 235
        loop_thread = relay._thread
    assert len(threads) == 1
    assert threads[0] is not loop_thread
    assert threads[0] is not threading.current_thread()


def test_no_auth_without_password_file(
    tmp_path: Path, recorder: Recorder, server_tls: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with (
        Relay(make_config(tmp_path, auth=False), recorder, server_tls, None) as relay,
        relay.client() as smtp,
    ):
        smtp.starttls(context=client_context)
        assert "AUTH" not in ehlo_keywords(smtp)
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, _ = smtp.docmd("AUTH", f"PLAIN {blob}")
        assert code == 504


# --- relay control ---


@pytest.mark.parametrize(
    "rcpt",
    [
        "<user@other.test>",
        "<user%other.test@local.test>",
        "<other.test!user@local.test>",
        "<@other.test:user@local.test>",
        '<"user@other.test"@local.test>',
        '<"user%other.test"@local.test>',
        "<user@[192.0.2.1]>",
    ],
)
def test_relay_denied_outside_networks(relay: Relay, rcpt: str) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250 2.1.0")
        assert reply(smtp, f"RCPT TO:{rcpt}") == "554 5.7.1 Relay access denied"


def test_local_domain_accepted_from_anyone(relay: Relay, recorder: Recorder) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250 2.1.0")
        assert reply(smtp, "RCPT TO:<User@Local.Test>").startswith("250 2.1.5")
        assert reply(smtp, "RCPT TO:<other@other.test>").startswith("554 5.7.1")
        assert send_data(smtp, MESSAGE) == "250 2.0.0 Ok: queued as Q0001"
    envelope, _ = recorder.calls[0]
    assert envelope.rcpt_tos == ("User@local.test",)
    assert envelope.crlf_only  # bare CR or LF was refused: delivery need not scan again
    assert envelope.dot_free  # no line begins with a dot: delivery need not stuff one


def test_a_line_that_begins_with_a_dot_is_marked_for_stuffing(
    relay: Relay, recorder: Recorder
) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, b"Subject: x\r\n\r\n..hidden\r\n.\r\n").startswith("250")
    envelope, content = recorder.calls[0]
    assert content.endswith(b"\r\n.hidden\r\n")
    assert envelope.crlf_only
    assert not envelope.dot_free  # delivery stuffs it again


@pytest.mark.parametrize("rcpt", ["<a..b@local.test>", "<user@-bad.test>", "<@x:user>", "<a@b@c>"])
@pytest.mark.parametrize("source", [HOST, TRUSTED])
def test_broken_syntax_is_501_for_everyone(relay: Relay, source: str, rcpt: str) -> None:
    with relay.client(source) as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        assert reply(smtp, f"RCPT TO:{rcpt}").startswith("501 5.1.3")


def test_trusted_network_relays_anywhere(relay: Relay, recorder: Recorder) -> None:
    with relay.client(TRUSTED) as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<>")
        assert reply(smtp, "RCPT TO:<user@other.test>").startswith("250 2.1.5")
        assert reply(smtp, "RCPT TO:<@hop.test:user2@other.test>").startswith("250 2.1.5")
        assert send_data(smtp, MESSAGE).startswith("250 2.0.0")
    envelope, _ = recorder.calls[0]
    assert envelope.mail_from == ""
    assert envelope.rcpt_tos == ("user@other.test", "user2@other.test")
    assert envelope.client_address == TRUSTED


def test_authenticated_client_relays_anywhere(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    with relay.client() as smtp:
        smtp.starttls(context=client_context)
        smtp.ehlo()
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail("alice@example.test", ["b@other.test"], MESSAGE[:-3]) == {}
    assert recorder.calls[0][0].rcpt_tos == ("b@other.test",)
    assert b"with ESMTPSA;" in recorder.calls[0][1]


def test_recipient_limit(
    tmp_path: Path, recorder: Recorder, server_tls: ssl.SSLContext, passwords: PasswordFile
) -> None:
    config = make_config(tmp_path, limits="recipients = 2")
    with (
        Relay(config, recorder, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        assert reply(smtp, "RCPT TO:<a@local.test>").startswith("250")
        assert reply(smtp, "RCPT TO:<b@local.test>").startswith("250")
        assert reply(smtp, "RCPT TO:<c@local.test>").startswith("452 4.5.3")
        assert send_data(smtp, MESSAGE).startswith("250 2.0.0")
    assert recorder.calls[0][0].rcpt_tos == ("a@local.test", "b@local.test")


# --- listener modes ---


def test_require_tls_refuses_mail_before_starttls(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    config = make_config(tmp_path, listener='mode = "relay"\nrequire_tls = true')
    with (
        Relay(config, recorder, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("530 5.7.0")
        smtp.starttls(context=client_context)
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250 2.1.0")


def test_submission_requires_tls_and_auth(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    config = make_config(tmp_path, listener='mode = "submission"')
    with (
        Relay(config, recorder, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("530 5.7.0")
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, _ = smtp.docmd("AUTH", f"PLAIN {blob}")
        assert 500 <= code < 600
        smtp.starttls(context=client_context)
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test>") == ("530 5.7.0 Authentication required")
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail("alice@example.test", ["b@other.test"], MESSAGE[:-3]) == {}
    assert len(recorder.calls) == 1


def test_submission_without_authenticator_refuses_to_start(
    tmp_path: Path, recorder: Recorder, server_tls: ssl.SSLContext
) -> None:
    config = make_config(tmp_path, listener='mode = "submission"')
    with (
        pytest.raises(ConfigError, match=r"auth\.password_file"),
        Relay(config, recorder, server_tls, None),
    ):
        pass


def test_smtps_implicit_tls(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    config = make_config(tmp_path, listener='mode = "smtps"')
    with Relay(config, recorder, server_tls, passwords.authenticator) as relay:
        with smtplib.SMTP_SSL(
            HOST, relay.port, local_hostname="client.test", timeout=TIMEOUT, context=client_context
        ) as smtp:
            features = ehlo_keywords(smtp)
            assert "STARTTLS" not in features
            assert "AUTH" in features
            assert reply(smtp, "STARTTLS").startswith("503 5.5.1")
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail("alice@example.test", ["b@other.test"], MESSAGE[:-3]) == {}
        # a plaintext client gets no SMTP greeting from an implicit-TLS port
        with socket.create_connection((HOST, relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"EHLO client.test\r\n")
            assert not sock.recv(512).startswith(b"220")
    content = recorder.calls[0][1]
    assert b"(using TLSv1.3 with cipher " in content
    assert b"with ESMTPSA;" in content


# --- the TLS floor ---


def test_tls_1_1_refused(relay: Relay, ca_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mta")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(ca_file))
    with warnings.catch_warnings():  # the deprecation is the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1 at all
    smtp = relay.client()
    try:
        smtp.ehlo()
        with pytest.raises(ssl.SSLError):
            smtp.starttls(context=old)
    finally:
        smtp.close()
    # The server's own log shows that it, not the client, refused the handshake.
    record = wait_for_record(caplog, "receive.tls_failed")
    assert vars(record)["reason"] == "UNSUPPORTED_PROTOCOL"


def test_non_forward_secret_suite_refused(
    relay: Relay, ca_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mta")
    static_rsa = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    static_rsa.load_verify_locations(cafile=str(ca_file))
    static_rsa.maximum_version = ssl.TLSVersion.TLSv1_2
    static_rsa.set_ciphers("AES128-GCM-SHA256")
    smtp = relay.client()
    try:
        smtp.ehlo()
        with pytest.raises(ssl.SSLError):
            smtp.starttls(context=static_rsa)
    finally:
        smtp.close()
    # The server's own log shows that it, not the client, refused the handshake.
    record = wait_for_record(caplog, "receive.tls_failed")
    assert vars(record)["reason"] == "NO_SHARED_CIPHER"


def test_tls_1_2_forward_secret_accepted(relay: Relay, recorder: Recorder, ca_file: Path) -> None:
    tls12 = ssl.create_default_context(cafile=str(ca_file))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with relay.client() as smtp:
        smtp.starttls(context=tls12)
        assert smtp.sendmail("a@example.test", ["b@local.test"], MESSAGE[:-3]) == {}
    content = recorder.calls[0][1]
    assert b"(using TLSv1.2 with cipher ECDHE-" in content


# --- DATA ---


def test_size_too_big_at_mail(relay: Relay) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@example.test> SIZE=100000").startswith("552 5.3.4")
        assert reply(smtp, "MAIL FROM:<a@example.test> SIZE=1000").startswith("250")


def test_size_too_big_in_data(relay: Relay, recorder: Recorder) -> None:
    line = b"x" * 98 + b"\r\n"
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, b"Subject: big\r\n\r\n" + line * 700 + b".\r\n").startswith(
            "552 5.3.4"
        )
    assert recorder.attempts == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: x\r\n\r\nline one\nline two\r\n.\r\n",
        b"Subject: x\r\n\r\nline one\rline two\r\n.\r\n",
        # SMTP smuggling: <LF>.<CR><LF> then a second transaction inside the first
        b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@other.test>\r\nRCPT TO:<v@local.test>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nboo\r\n.\r\n",
        b"Subject: x\r\n\r\nhi\r\n.\nMAIL FROM:<evil@other.test>\r\n.\r\n",
    ],
)
def test_bare_line_endings_refused(relay: Relay, recorder: Recorder, payload: bytes) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, payload).startswith("550 5.5.2")
        assert reply(smtp, "NOOP") == "250 2.0.0 OK"
    assert recorder.attempts == 0


def test_received_header_without_tls(relay: Relay, recorder: Recorder) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test> BODY=8BITMIME")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, MESSAGE) == "250 2.0.0 Ok: queued as Q0001"
    envelope, content = recorder.calls[0]
    header, _, rest = content.partition(b"\r\nFrom: a@example.test\r\n")
    assert header.startswith(b"Received: from client.test ([127.0.0.1])\r\n\t(no TLS)\r\n")
    assert b"\tby mx.test (mta) with ESMTP;\r\n\t" in header
    assert rest == b"Subject: hi\r\n\r\nhello\r\n"
    assert envelope.mail_from == "a@example.test"
    assert envelope.helo == "client.test"
    assert envelope.body_8bit
    assert envelope.client_address == HOST


def test_received_header_after_starttls(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    with relay.client() as smtp:
        smtp.starttls(context=client_context)
        assert smtp.sendmail("a@example.test", ["b@local.test"], MESSAGE[:-3]) == {}
        tls = smtp.sock
        assert isinstance(tls, ssl.SSLSocket)
        version, cipher = tls.version(), tls.cipher()
    assert version == "TLSv1.3"
    assert cipher is not None
    content = recorder.calls[0][1]
    expected = f"(using TLSv1.3 with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits))"
    assert content.startswith(b"Received: from client.test ([127.0.0.1])\r\n\t")
    assert expected.encode() in content.split(b"\r\n\r\n")[0]
    assert b"with ESMTPS;" in content


def test_dot_stuffing_undone(relay: Relay, recorder: Recorder) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, b"Subject: x\r\n\r\n..leading dot\r\n.\r\n").startswith("250")
    assert recorder.calls[0][1].endswith(b"\r\n\r\n.leading dot\r\n")


def test_spool_error_is_452(
    tmp_path: Path, server_tls: ssl.SSLContext, passwords: PasswordFile
) -> None:
    failing = Recorder(fail=SpoolFull("disk full"))
    with (
        Relay(make_config(tmp_path), failing, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, MESSAGE) == "452 4.3.1 Insufficient system storage"
        assert reply(smtp, "NOOP").startswith("250")
    assert failing.attempts == 1


def test_other_accept_error_is_451_and_session_continues(
    tmp_path: Path, server_tls: ssl.SSLContext, passwords: PasswordFile
) -> None:
    failing = Recorder(fail=RuntimeError("boom"))
    with (
        Relay(make_config(tmp_path), failing, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        for _ in range(2):
            assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250")
            smtp.docmd("RCPT TO:<b@local.test>")
            assert send_data(smtp, MESSAGE).startswith("451 4.3.0")
    assert failing.attempts == 2


def test_accepted_log_has_facts_not_addresses(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mta")
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<secret.sender@example.test>")
        smtp.docmd("RCPT TO:<b@local.test>")
        assert send_data(smtp, MESSAGE).startswith("250")
    wait_for_record(caplog, "receive.accepted")
    record = next(r for r in caplog.records if r.getMessage() == "receive.accepted")
    facts = vars(record)
    assert facts["qid"] == "Q0001"
    assert facts["client"] == HOST
    assert facts["rcpts"] == 1
    assert facts["tls"] == "none"
    assert facts["sender"].startswith("h:")
    assert facts["sender"].endswith("@example.test")
    assert facts["size"] > len(MESSAGE)
    for r in caplog.records:
        assert "secret.sender" not in repr(vars(r))
        assert "hello" not in repr(vars(r))


def test_stock_replies_have_enhanced_codes(relay: Relay) -> None:
    with relay.client() as smtp:
        smtp.ehlo()
        assert reply(smtp, "RCPT TO:<b@local.test>").startswith("503 5.5.1")
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("250 2.1.0")
        assert reply(smtp, "MAIL FROM:<a@example.test>").startswith("503 5.5.1")
        assert reply(smtp, "RSET") == "250 2.0.0 OK"
        assert reply(smtp, "NOOP") == "250 2.0.0 OK"
        assert reply(smtp, "VRFY b@local.test").startswith("252")
        assert reply(smtp, "BOGUS").startswith("500 5.5.2")
        assert reply(smtp, "MAIL FROM:<a@example.test> FOO=BAR").startswith("555 5.5.4")


def test_pipelining(relay: Relay, recorder: Recorder) -> None:
    with RawSmtp(relay.port) as client:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.test").endswith("250 HELP")
        client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
        assert [client.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
        client.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert client.reply().startswith("250 2.0.0 Ok: queued as Q0001")
        assert client.reply().startswith("221")
    assert len(recorder.calls) == 1


def test_idle_client_disconnected(
    tmp_path: Path, recorder: Recorder, server_tls: ssl.SSLContext, passwords: PasswordFile
) -> None:
    config = make_config(tmp_path, limits='idle_timeout = "1s"')
    with (
        Relay(config, recorder, server_tls, passwords.authenticator) as relay,
        socket.create_connection((HOST, relay.port), timeout=TIMEOUT) as sock,
    ):
        assert sock.recv(512).startswith(b"220")
        stream = sock.makefile("rb")
        assert stream.readline() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
        assert stream.read() == b""  # closed by the server, well before TIMEOUT


def test_listener_config_port_in_use_names_listener(
    tmp_path: Path, recorder: Recorder, server_tls: ssl.SSLContext
) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, auth=False)
        busy = (dataclasses.replace(config.listeners[0], port=port),)
        config = dataclasses.replace(config, listeners=busy)
        with (
            pytest.raises(ConfigError, match=r"listener\[0\]: cannot listen on 127\.0\.0\.1:"),
            Relay(config, recorder, server_tls, None),
        ):
            pass


def test_replies_to_pipelined_commands_come_in_one_tls_record(
    relay: Relay, client_context: ssl.SSLContext
) -> None:
    """RFC 2920: the replies to MAIL, RCPT and DATA sent together are collected and
    written once; over TLS one read returns at most one record, so one read holds all
    three. (The reply to a command sent alone is never held back: see every other test.)"""
    with RawSmtp(relay.port, source=TRUSTED) as client:
        assert client.reply().startswith("220")
        assert client.command("EHLO client.test").endswith("250 HELP")
        assert client.command("STARTTLS").startswith("220")
        client.starttls(client_context)
        assert client.command("EHLO client.test").endswith("250 HELP")
        assert client.command("NOOP").startswith("250")  # whatever TLS sent first is read
        client.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        client.pending_into_buffer(0.5)
        replies = client.pending(0).decode("ascii").splitlines()
        assert [line[:3] for line in replies] == ["250", "250", "354"]
        client.send(b"Subject: one\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert client.reply().startswith("250")
        assert client.reply().startswith("221")


# --- who a logged-in user may send as (issue 8 §6) ---


async def _submit(
    port: int,
    context: ssl.SSLContext,
    senders: list[str],
    *,
    user: str = USER,
    rset: bool = False,
) -> list[str]:
    """One aiosmtplib session (STARTTLS, AUTH PLAIN): a transaction per sender, each
    ``MAIL FROM``, ``RCPT TO``, ``DATA`` as far as the server lets it go; a ``RSET``
    between them when asked. Returns the reply to each ``MAIL FROM`` (and to ``DATA``
    where the server took it), in order."""
    client = aiosmtplib.SMTP(
        hostname=HOST,
        port=port,
        start_tls=True,
        tls_context=context,
        local_hostname="client.test",
        timeout=TIMEOUT,
    )
    replies: list[str] = []
    async with client:
        await client.login(user, PASSWORD)
        for sender in senders:
            mail = await client.execute_command(f"MAIL FROM:<{sender}>".encode())
            replies.append(f"{mail.code} {mail.message}")
            if mail.code == 250:
                await client.rcpt("b@other.test")
                data = await client.data(MESSAGE[:-3])
                replies.append(f"{data.code} {data.message}")
            if rset:
                await client.rset()
        sock = client.get_transport_info("socket")
    # The TLS close (close_notify) finishes after QUIT returns: let it, before
    # asyncio.run closes the loop under it (bounded).
    for _ in range(100):
        if sock.fileno() == -1:
            break
        await asyncio.sleep(0.01)
    return replies


def test_login_sends_as_itself_and_its_grants(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    replies = asyncio.run(
        _submit(relay.port, client_context, [f"{USER}@example.test", "orders@shop.test", ""])
    )
    assert [r[:3] for r in replies] == ["250"] * 6
    assert [call[0].mail_from for call in recorder.calls] == [
        f"{USER}@example.test",
        "orders@shop.test",
        "",  # the null sender: allowed to every login, as Postfix does
    ]
    content = recorder.calls[0][1]
    header = content.split(b"\r\nFrom: ")[0]
    assert f"\r\n\t(Authenticated sender: {USER})\r\n\tby mx.test (mta) with ESMTPSA;".encode() in (
        header
    )
    assert PASSWORD.encode() not in content


@pytest.mark.parametrize("sender", ["ceo@local.test", "ceo@example.test", "bob@local.test"])
def test_login_cannot_send_as_anyone_else(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext, sender: str
) -> None:
    replies = asyncio.run(_submit(relay.port, client_context, [sender]))
    assert replies == [f"553 5.7.1 <{sender}>: Sender address rejected: not owned by user {USER}"]
    assert recorder.calls == []


def test_every_transaction_is_checked(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    """Allowed first, then (after RSET, and without) someone else's address: refused."""
    senders = [f"{USER}@example.test", "ceo@local.test", "x@shop.test", "ceo@local.test"]
    replies = asyncio.run(_submit(relay.port, client_context, senders, rset=True))
    assert [r[:9] for r in replies] == [
        "250 2.1.0",
        "250 2.0.0",
        "553 5.7.1",
        "250 2.1.0",
        "250 2.0.0",
        "553 5.7.1",
    ]
    assert len(recorder.calls) == 2


def test_a_login_that_is_an_address_owns_itself_only(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    replies = asyncio.run(
        _submit(
            relay.port,
            client_context,
            [ADDRESS_USER.upper(), f"{USER}@example.test"],
            user=ADDRESS_USER,
        )
    )
    assert replies[0].startswith("250 2.1.0")
    assert replies[2].startswith("553 5.7.1")
    assert recorder.calls[0][0].mail_from == ADDRESS_USER.upper()


def test_swaks_submission_as_someone_else(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    ca_file: Path,
    passwords: PasswordFile,
) -> None:
    """A real submission client on a submission listener: STARTTLS, AUTH, then a sender
    the login does not own."""
    config = make_config(tmp_path, listener='mode = "submission"')
    with Relay(config, recorder, server_tls, passwords.authenticator) as relay:
        done = subprocess.run(
            [
                "/usr/bin/swaks",
                *("--server", HOST, "--port", str(relay.port), "--helo", "client.test"),
                *("--tls", "--tls-verify", "--tls-ca-path", str(ca_file)),
                *("--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD),
                *("--from", "ceo@local.test", "--to", "b@other.test"),
                "--suppress-data",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 3,
            check=False,
        )
    assert "235 2.7.0 Authentication successful" in done.stdout
    assert (
        "<~* 553 5.7.1 <ceo@local.test>: Sender address rejected: not owned by user alice"
        in done.stdout
    )
    assert recorder.calls == []


def test_logs_name_the_user_hashed(
    relay: Relay, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mta")
    asyncio.run(_submit(relay.port, client_context, [f"{USER}@example.test", "ceo@local.test"]))
    accepted = wait_for_record(caplog, "receive.accepted")
    mismatch = wait_for_record(caplog, "receive.sender_login_mismatch")
    assert getattr(accepted, "user", "").startswith("h:")
    assert getattr(mismatch, "user", "").startswith("h:")
    assert getattr(mismatch, "sender", "").endswith("@local.test")
    for record in caplog.records:
        text = " ".join(str(value) for value in record.__dict__.values())
        assert f"={USER}" not in text
        assert PASSWORD not in text
        assert "ceo@local.test" not in text


# --- RCPT TO:<postmaster>, a final dot ---


@pytest.mark.parametrize(
    ("top", "expected"),
    [("", "postmaster@mx.test"), ('postmaster = "admin@ops.test"', "admin@ops.test")],
)
@pytest.mark.parametrize("rcpt", ["<postmaster>", "<PostMaster>"])
def test_bare_postmaster_goes_to_the_configured_address(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    passwords: PasswordFile,
    top: str,
    expected: str,
    rcpt: str,
) -> None:
    """RFC 5321 §4.5.1: accepted from anyone (not a relay: the address is ours to pick)."""
    config = make_config(tmp_path, top=top)
    with (
        Relay(config, recorder, server_tls, passwords.authenticator) as relay,
        relay.client() as smtp,
    ):
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<a@example.test>")
        assert reply(smtp, f"RCPT TO:{rcpt}").startswith("250 2.1.5")
        assert send_data(smtp, MESSAGE).startswith("250 2.0.0")
    assert recorder.calls[0][0].rcpt_tos == (expected,)


@pytest.mark.parametrize(
    ("source", "rcpt", "stored"),
    [
        (HOST, "<x@LOCAL.TEST.>", "x@local.test"),
        (TRUSTED, "<x@OURS.EXAMPLE.>", "x@ours.example"),
        (TRUSTED, "<x@OURS.EXAMPLE.> NOTIFY=NEVER", None),  # parameters: still parsed (555)
    ],
)
def test_a_final_dot_is_normalised(
    relay: Relay, recorder: Recorder, source: str, rcpt: str, stored: str | None
) -> None:
    with relay.client(source) as smtp:
        smtp.ehlo()
        assert reply(smtp, "MAIL FROM:<a@Example.TEST.>").startswith("250 2.1.0")
        answer = reply(smtp, f"RCPT TO:{rcpt}")
        if stored is None:
            assert answer.startswith("555")
            return
        assert answer.startswith("250 2.1.5")
        assert send_data(smtp, MESSAGE).startswith("250 2.0.0")
    assert recorder.calls[0][0].rcpt_tos == (stored,)
    assert recorder.calls[0][0].mail_from == "a@Example.TEST"


def test_each_accepted_message_is_one_received_event(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    """DESIGN.md: every acceptance is one typed event, after the 250; a refused
    message is none."""
    config = make_config(tmp_path, listener='mode = "submission"')
    with Relay(config, recorder, server_tls, passwords.authenticator) as relay:
        with relay.client() as smtp:
            smtp.starttls(context=client_context)
            smtp.ehlo()
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail("alice@example.test", ["b@other.test", "c@x.test"], MESSAGE) == {}
            with contextlib.suppress(smtplib.SMTPDataError):
                smtp.sendmail("alice@example.test", ["b@other.test"], b"bare\nline\r\n")
        port = relay.ports[0]
        [event] = relay.events
    assert isinstance(event, MessageReceived)
    [(_, content)] = recorder.calls
    assert (event.qid, event.listener, event.tls, event.authenticated) == (
        "Q0001",
        f"127.0.0.1:{port}",
        "TLSv1.3",
        True,
    )
    assert (event.size, event.recipients) == (len(content), 2)
    assert 0 < event.ack_seconds < 5
