"""The failure DSN (RFC 3464 / RFC 6522), checked by parsing it back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message, MIMEPart

import pytest

from mta.model import Envelope
from mta.reply import SmtpReply
from mta.report.dsn import FailedRecipient, build_dsn, header_block, status_of

T0 = 1_700_000_000.0
HEADERS = b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Quarterly report"
ORIGINAL = Envelope(
    mail_from="alice@example.org",
    rcpt_tos=("bob@example.com", "carol@example.net"),
    received_at=T0,
)
BOB = FailedRecipient(
    "bob@example.com", "5.1.1", SmtpReply(550, "5.1.1", "No such user"), "mx.example.com"
)
CAROL = FailedRecipient("carol@example.net", "4.4.7", SmtpReply(451, "4.7.5", "TLS required"))


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "original": ORIGINAL,
        "original_headers": HEADERS,
        "failed": [BOB, CAROL],
        "reporting_mta": "relay.example.org",
        "now": T0 + 3600,
        "message_id": "<dsn1@relay.example.org>",
        "queue_id": "q0123",
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[MIMEPart]:
    return list(message.iter_parts())


def status_blocks(message: EmailMessage) -> list[Message]:
    blocks = parts(message)[1].get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_top_level_headers() -> None:
    message = parse(build())
    assert message["From"] == "MAILER-DAEMON@relay.example.org"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Message-ID"] == "<dsn1@relay.example.org>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Date"].datetime.timestamp() == T0 + 3600
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"


def test_three_parts_in_order() -> None:
    assert [p.get_content_type() for p in parts(parse(build()))] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_part_names_each_recipient() -> None:
    text = parts(parse(build()))[0].get_content()
    assert "relay.example.org" in text
    assert "<bob@example.com>: 550 5.1.1 No such user" in text
    assert "<carol@example.net>: message expired in the queue; last reply: 451 4.7.5" in text


def test_delivery_status_fields() -> None:
    per_message, bob, carol = status_blocks(parse(build()))
    assert per_message["Reporting-MTA"] == "dns; relay.example.org"
    assert per_message["X-Mta-Queue-Id"] == "q0123"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    assert arrival.timestamp() == T0
    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None


def test_no_diagnostic_without_a_reply() -> None:
    lonely = FailedRecipient("dave@example.com", "5.0.0")
    _, dave = status_blocks(parse(build(failed=[lonely])))
    assert dave["Status"] == "5.0.0"
    assert dave["Diagnostic-Code"] is None


def test_original_headers_only_never_the_body() -> None:
    content = HEADERS + b"\r\n\r\nThe secret body\r\n"
    data = build(original_headers=header_block(content))
    part = parts(parse(data))[2]
    assert "Subject: Quarterly report" in part.get_content()
    assert b"secret body" not in data


def test_crlf_only() -> None:
    data = build()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")


def test_remote_reply_cannot_inject_fields() -> None:
    evil = SmtpReply(550, "5.7.1", "Denied\r\nAction: delivered\nStatus: 2.0.0")
    _, block = status_blocks(
        parse(build(failed=[FailedRecipient("bob@example.com", "5.7.1", evil)]))
    )
    assert block["Action"] == "failed"
    assert block["Status"] == "5.7.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.7.1 Denied Action: delivered Status: 2.0.0"


def test_long_diagnostic_stays_plain_text() -> None:
    long = SmtpReply(550, "5.7.1", "x" * 2000)
    data = build(failed=[FailedRecipient("bob@example.com", "5.7.1", long)])
    assert b"=?" not in data  # no RFC 2047 encoded words in the report fields
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    _, block = status_blocks(parse(data))
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 xxxx")


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    failed = [FailedRecipient("jörg@exämple.de", "5.1.1")]
    data = build(failed=failed)
    assert data.isascii()
    _, block = status_blocks(parse(data))
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@ex\\x{E4}mple.de"
    text = parts(parse(data))[0].get_content()
    assert "<jörg@exämple.de>" in text


def test_non_ascii_sender_makes_an_smtputf8_report() -> None:
    original = Envelope("jörg@exämple.de", ("bob@example.com",), T0, smtputf8=True)
    message = parse(build(original=original, failed=[BOB]))
    assert message["To"] == "jörg@exämple.de"


def test_non_ascii_original_headers() -> None:
    headers = "Subject: Grüße".encode()
    part = parts(parse(build(original_headers=headers)))[2]
    assert part.get_content().strip() == "Subject: Grüße"


def test_boundary_does_not_occur_in_parts() -> None:
    data = build()
    boundary = parse(data).get_boundary()
    assert boundary is not None
    assert data.count(boundary.encode()) == 1 + 3 + 1  # header, three parts, close


def test_same_input_same_bytes() -> None:
    assert build() == build()


def test_never_to_the_null_sender() -> None:
    with pytest.raises(ValueError, match="null sender"):
        build(original=Envelope("", ("bob@example.com",), T0))


def test_needs_a_failed_recipient() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build(failed=[])


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (SmtpReply(550, "5.1.1", "x"), "5.1.1"),
        (SmtpReply(554, "", "x"), "5.0.0"),
        (SmtpReply(451, "", "x"), "4.0.0"),
        (SmtpReply(550, "junk", "x"), "5.0.0"),
        (SmtpReply(999, "", "x"), "5.0.0"),
    ],
)
def test_status_of(reply: SmtpReply, status: str) -> None:
    assert status_of(reply) == status


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"Subject: a\r\n\r\nbody", b"Subject: a"),
        (b"Subject: a\n\nbody\r\n\r\nmore", b"Subject: a"),
        (b"Subject: a\r\nX: b", b"Subject: a\r\nX: b"),
        (b"\r\n\r\nbody", b""),
        (b"", b""),
    ],
)
def test_header_block(content: bytes, headers: bytes) -> None:
    assert header_block(content) == headers
