"""The test receivers themselves: each TLS mode does what other tests rely on."""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib
import pytest
import trustme

from mta.tlsbase import is_forward_secret
from tests.integration.receivers import Receiver


def client_context(ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if ciphers:
        context.set_ciphers(ciphers)
    return context


async def send(
    receiver: Receiver, *, starttls: bool, implicit: bool = False, ciphers: str | None = None
) -> bool:
    """Send one message; returns whether the server offered STARTTLS."""
    smtp = aiosmtplib.SMTP(
        hostname=receiver.host,
        port=receiver.port,
        local_hostname="client.test",
        timeout=10,
        start_tls=False,
        use_tls=implicit,
        tls_context=client_context(ciphers) if implicit else None,
    )
    await smtp.connect()
    raw = smtp.transport
    try:
        await smtp.ehlo()
        offered = smtp.supports_extension("starttls")
        if starttls:
            await smtp.starttls(tls_context=client_context(ciphers), server_hostname="mx.test")
            await smtp.ehlo()
        await smtp.sendmail("alice@sender.test", ["bob@dest.test"], b"Subject: t\r\n\r\nbody\r\n")
        await smtp.quit()
    finally:
        smtp.close()
        if raw is not None:
            raw.close()  # do not wait for the TLS close_notify exchange
    return offered


def test_fs_receiver_records_forward_secret_tls(tls_ca: trustme.CA) -> None:
    with Receiver("127.0.0.40", tls="fs", ca=tls_ca) as receiver:
        assert asyncio.run(send(receiver, starttls=True))
        (got,) = receiver.wait_for(1, timeout=5)
    assert got.mail_from == "alice@sender.test"
    assert got.rcpt_tos == ["bob@dest.test"]
    assert got.content == b"Subject: t\r\n\r\nbody\r\n"
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")
    assert is_forward_secret(got.tls_version, got.tls_cipher)


def test_none_receiver_offers_no_starttls(tls_ca: trustme.CA) -> None:
    with Receiver("127.0.0.41", tls="none", ca=tls_ca) as receiver:
        assert not asyncio.run(send(receiver, starttls=False))
        (got,) = receiver.wait_for(1, timeout=5)
    assert got.tls_version is None
    assert got.tls_cipher is None


def test_non_fs_receiver_speaks_only_rsa_key_exchange(tls_ca: trustme.CA) -> None:
    with Receiver("127.0.0.42", tls="non-fs", ca=tls_ca) as receiver:
        assert asyncio.run(send(receiver, starttls=True, ciphers="AES128-GCM-SHA256"))
        (got,) = receiver.wait_for(1, timeout=5)
    assert got.tls_version == "TLSv1.2"
    assert got.tls_cipher == "AES128-GCM-SHA256"
    assert not is_forward_secret(got.tls_version, got.tls_cipher)


def test_implicit_receiver_is_tls_from_the_first_byte(tls_ca: trustme.CA) -> None:
    with Receiver("127.0.0.43", tls="implicit", ca=tls_ca) as receiver:
        assert not asyncio.run(send(receiver, starttls=False, implicit=True))
        (got,) = receiver.wait_for(1, timeout=5)
    assert got.tls_version in ("TLSv1.2", "TLSv1.3")


def test_rcpt_reply_refuses_that_recipient(tls_ca: trustme.CA) -> None:
    refusal = {"bob@dest.test": "550 5.1.1 No such user"}
    with Receiver("127.0.0.44", tls="none", ca=tls_ca, rcpt_reply=refusal) as receiver:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            asyncio.run(send(receiver, starttls=False))
        assert receiver.messages == []


def test_fixed_port_and_wait_for_timeout(tls_ca: trustme.CA) -> None:
    with Receiver("127.0.0.45", tls="none", ca=tls_ca) as first:
        port = first.port
    assert port > 0
    with Receiver("127.0.0.45", port=port, tls="none", ca=tls_ca) as again:
        assert again.port == port
        with pytest.raises(AssertionError, match="expected 1"):
            again.wait_for(1, timeout=0.1)
