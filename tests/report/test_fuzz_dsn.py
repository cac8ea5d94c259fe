"""Fuzzing the DSN builder (mta/report/dsn.py) with what the outside world controls: the
original message's header section, recipient addresses, the remote server's reply text
and the MX host name.

Whatever they hold, the report is a well-formed ``multipart/report`` of exactly three
parts, every line CRLF-terminated and within RFC 5322's 998 octets, and nothing from
the original can add a part, end the report early or smuggle in a header field of the
report's own.
"""

from __future__ import annotations

import email
import email.policy
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.model import Envelope
from mta.receive.addresses import AddressError, parse_path, quote_local_part
from mta.reply import SmtpReply
from mta.report.dsn import FailedRecipient, build_dsn, header_block

_LOCAL = st.one_of(
    st.from_regex(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[A-Za-z0-9_-]{1,10}){0,2}", fullmatch=True
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30),
    st.text(min_size=1, max_size=10).filter(lambda t: not any(c in t for c in "\r\n")),
)
_DOMAIN = st.from_regex(
    r"[a-z0-9]{1,20}(\.[a-z0-9-]{0,20}[a-z0-9])?\.(test|example)", fullmatch=True
)
addresses = st.builds(lambda local, domain: f"{quote_local_part(local)}@{domain}", _LOCAL, _DOMAIN)


def _accepted(address: str) -> bool:
    try:
        parse_path(f"<{address}>")
    except AddressError:
        return False
    return True


senders = addresses.filter(_accepted)  # what MAIL FROM lets in
header_bytes = st.one_of(
    st.binary(max_size=3000),
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    b"Subject: hi",
                    b"Content-Type: multipart/mixed; boundary=x",
                    b"--=_dsn_",
                    b"--x--",
                    b".",
                    b"\r\n.\r\n",
                    b"From: a@b\rBcc: c@d",
                    b"X-Long: " + b"y" * 5000,
                    b"\xff\xfe\x00",
                    b"=?utf-8?q?=0D=0A?=",
                ]
            ),
            st.binary(max_size=60),
        ),
        max_size=12,
    ).map(b"\r\n".join),
)
replies = st.builds(
    SmtpReply,
    code=st.integers(200, 599),
    enhanced=st.one_of(
        st.from_regex(r"[245]\.\d{1,3}\.\d{1,3}", fullmatch=True), st.text(max_size=10)
    ),
    text=st.text(max_size=600),
)
failed_rcpts = st.lists(
    st.builds(
        FailedRecipient,
        rcpt=st.one_of(addresses, st.text(min_size=1, max_size=80)),
        status=st.one_of(st.sampled_from(["5.1.1", "4.4.7", "5.0.0"]), st.text(max_size=12)),
        diagnostic=st.one_of(st.none(), replies),
        remote_mta=st.one_of(st.none(), _DOMAIN, st.text(max_size=300)),
    ),
    min_size=1,
    max_size=4,
)


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(sender=senders, headers=header_bytes, failed=failed_rcpts)
@example(
    sender="a@b.test",
    headers=b"Subject: x\r\n\r\n--=_dsn_0\r\nContent-Type: text/plain\r\n",
    failed=[FailedRecipient("bob@c.test", "5.1.1", SmtpReply(550, "5.1.1", "no\r\nBcc: x"))],
)
def test_dsn_is_well_formed_whatever_the_original(
    sender: str, headers: bytes, failed: list[FailedRecipient]
) -> None:
    original = Envelope(sender, tuple(f.rcpt for f in failed), received_at=1_700_000_000.0)
    dsn = build_dsn(
        original=original,
        original_headers=header_block(headers),
        failed=failed,
        reporting_mta="mx.test",
        now=1_700_000_100.0,
        message_id="<dsn1@mx.test>",
        queue_id="Q1",
    )
    assert dsn.endswith(b"\r\n")
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", dsn)  # CRLF only
    assert max(len(line) for line in dsn.split(b"\r\n")) <= 998

    report = email.message_from_bytes(dsn, policy=email.policy.SMTP)
    assert report.get_content_type() == "multipart/report"
    parts = report.get_payload()
    assert isinstance(parts, list)
    assert [part.get_content_type() for part in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not report.defects
    # The report's own header fields are ours alone.
    for field in ("To", "From", "Subject", "Message-ID"):
        assert len(report.get_all(field) or []) == 1
    assert report.get_all("Bcc") is None
    assert f"\r\nTo: {sender}\r\n".encode() in dsn
