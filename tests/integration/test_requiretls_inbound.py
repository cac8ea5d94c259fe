"""REQUIRETLS on our listeners (RFC 8689 §2, §4.1), with real clients over loopback.

swaks (which has no way to add a MAIL parameter) reads the EHLO replies; ``smtplib``
sends ``MAIL FROM:<...> REQUIRETLS``. The flag must reach the envelope the spool seals.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from pathlib import Path

from mta.receive.auth import PasswordFile
from tests.integration.inbound import HOST, TIMEOUT, TRUSTED, Recorder, Relay, make_config

MESSAGE = b"Subject: demand\r\n\r\nbody\r\n"


def _swaks_ehlo(port: int, ca_file: Path, *, tls: bool) -> str:
    """What swaks saw of the EHLO replies (quitting before MAIL)."""
    done = subprocess.run(
        [
            "/usr/bin/swaks",
            *("--server", HOST, "--port", str(port), "--helo", "client.test"),
            *(("--tls", "--tls-verify", "--tls-ca-path", str(ca_file)) if tls else ()),
            *("--quit-after", "HELO", "--to", "b@local.test", "--from", "a@example.test"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_requiretls_is_advertised_only_after_starttls(relay: Relay, ca_file: Path) -> None:
    plain = _swaks_ehlo(relay.port, ca_file, tls=False)
    assert "<-  250-STARTTLS" in plain
    assert "REQUIRETLS" not in plain
    secure = _swaks_ehlo(relay.port, ca_file, tls=True)
    # swaks marks what it read over TLS with "<~"; REQUIRETLS is there only.
    assert "<~  250-REQUIRETLS" in secure
    assert "<-  250-REQUIRETLS" not in secure


def test_requiretls_over_plaintext_gets_530_5_7_10(relay: Relay, recorder: Recorder) -> None:
    with relay.client(TRUSTED) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("a@example.test", ["REQUIRETLS"])
        assert (code, text.decode()) == (
            530,
            "5.7.10 REQUIRETLS needs a TLS session: issue STARTTLS first",
        )
        # the session goes on: the same sender without the demand is fine
        assert smtp.mail("a@example.test")[0] == 250
    assert recorder.calls == []


def test_requiretls_after_starttls_is_sealed_in_the_envelope(
    relay: Relay, recorder: Recorder, client_context: ssl.SSLContext
) -> None:
    with relay.client(TRUSTED) as smtp:
        smtp.starttls(context=client_context)
        smtp.ehlo()
        assert smtp.has_extn("requiretls")
        refused = smtp.sendmail(
            "a@example.test", ["b@other.test"], MESSAGE, mail_options=["REQUIRETLS", "SIZE=30"]
        )
        assert refused == {}
        # a second transaction without it is not marked
        assert smtp.sendmail("a@example.test", ["c@other.test"], MESSAGE) == {}
    assert [call[0].requiretls for call in recorder.calls] == [True, False]


def test_requiretls_with_a_value_is_a_parameter_we_do_not_know(
    relay: Relay, client_context: ssl.SSLContext
) -> None:
    with relay.client(TRUSTED) as smtp:
        smtp.starttls(context=client_context)
        smtp.ehlo()
        code, _ = smtp.mail("a@example.test", ["REQUIRETLS=YES"])
        assert code == 555
        code, _ = smtp.docmd("RSET")
        code, _ = smtp.mail("a@example.test")
        assert code == 250
        code, _ = smtp.rcpt("b@other.test", ["REQUIRETLS"])  # a MAIL parameter only
        assert code == 555


def test_requiretls_on_implicit_tls(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    client_context: ssl.SSLContext,
    passwords: PasswordFile,
) -> None:
    config = make_config(tmp_path, listener='mode = "smtps"')
    with Relay(config, recorder, server_tls, passwords.authenticator) as relay:
        smtp = smtplib.SMTP_SSL(
            HOST,
            relay.port,
            local_hostname="client.test",
            timeout=TIMEOUT,
            context=client_context,
            source_address=(TRUSTED, 0),
        )
        with smtp:
            smtp.ehlo()
            assert smtp.has_extn("requiretls")
            refused = smtp.sendmail(
                "a@example.test", ["b@other.test"], MESSAGE, mail_options=["REQUIRETLS"]
            )
            assert refused == {}
    assert recorder.calls[0][0].requiretls is True
