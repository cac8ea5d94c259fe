"""RFC 8460 §5: the gzip-compressed JSON and the report mail, DKIM-signed and verified."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, date, datetime
from functools import cache

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mta.report.tlsrpt import (
    DailyTally,
    FailureDetail,
    PolicyType,
    ReportedSession,
    ReportPolicy,
    render_report,
)
from mta.report.tlsrpt_mail import (
    DkimKey,
    ReportSender,
    compress_report,
    report_filename,
    report_id,
    report_message,
)
from tests.report.tlsrpt_checks import check_report_json, parse_report_mail

DAY = date(2026, 12, 2)
SENDER = ReportSender("Example Relay", "tls-contact@relay.test", "tlsrpt-noreply@relay.test")
NOW = datetime(2026, 12, 3, 0, 17, 5, tzinfo=UTC)
STS = ReportPolicy(
    PolicyType.STS, "example.net", ("version: STSv1", "mode: enforce"), ("*.example.net",)
)


def _report() -> dict[str, object]:
    tally = DailyTally()
    tally.add_all([ReportedSession(DAY, STS)] * 4)
    failure = FailureDetail("certificate-expired", "127.0.0.1", "mx1.example.net", "127.0.0.9")
    tally.add(ReportedSession(DAY, STS, failure))
    tally.add(ReportedSession(DAY, ReportPolicy(PolicyType.TLSA, "example.net", ("3 1 1 ab",))))
    return render_report(
        tally,
        DAY,
        "example.net",
        organization=SENDER.organization,
        contact=SENDER.contact,
        report_id=report_id(DAY, "example.net", SENDER.submitter),
    )


@cache
def _key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _dns(service: str = "tlsrpt") -> dkim.DNSFunc:  # type: ignore[name-defined]
    record = f"v=DKIM1; k=rsa; s={service}; p={base64.b64encode(_key()[1]).decode()}"

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name == b"rpt._domainkey.relay.test." else None

    return lookup


def _mail(*, signed: bool = True) -> bytes:
    return report_message(
        _report(),
        day=DAY,
        domain="example.net",
        sender=SENDER,
        to=("tlsrpt@example.net", "other@example.org"),
        now=NOW,
        message_id="<r1@relay.test>",
        dkim_key=DkimKey("relay.test", "rpt", _key()[0]) if signed else None,
    )


def test_the_report_json_has_every_required_key_and_type() -> None:
    check_report_json(json.loads(json.dumps(_report())))


def test_the_report_is_gzip_compressed_json_and_always_the_same_bytes() -> None:
    data = compress_report(_report())
    assert data[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(data)) == _report()
    assert compress_report(_report()) == data  # no time, no name in the gzip header


def test_the_filename_follows_section_5_1() -> None:
    name = report_filename("relay.test", "example.net", DAY, "20261202.example.net@relay.test")
    start = int(datetime(2026, 12, 2, tzinfo=UTC).timestamp())
    prefix = f"relay.test!example.net!{start}!{start + 86399}!"
    assert name.startswith(prefix)
    assert name.endswith(".json.gz")
    assert "!" not in name.removeprefix(prefix)


def test_the_mail_is_a_tlsrpt_multipart_report_with_the_section_5_3_headers() -> None:
    message, report = parse_report_mail(_mail(signed=False))
    assert report == json.loads(json.dumps(_report()))
    assert message["From"] == "tlsrpt-noreply@relay.test"
    assert message["To"] == "tlsrpt@example.net, other@example.org"
    assert message["TLS-Report-Domain"] == "example.net"
    assert message["TLS-Report-Submitter"] == "relay.test"
    assert message["Subject"] == (
        "Report Domain: example.net Submitter: relay.test "
        "Report-ID: <20261202.example.net@relay.test>"
    )
    assert message["Date"] == "Thu, 03 Dec 2026 00:17:05 +0000"
    text = next(message.iter_parts()).get_content()
    assert "5 successful and 1 failed" in text
    assert b"\r\n" in _mail(signed=False)
    assert b"\n" not in _mail(signed=False).replace(b"\r\n", b"")
    assert b"\r\r" not in _mail(signed=False)


def test_the_dkim_signature_verifies_with_the_tlsrpt_service_type() -> None:
    data = _mail()
    assert data.startswith(b"DKIM-Signature:")
    assert b" l=" not in data.split(b"\r\n\r\n", 1)[0]  # §5.3: no body length limit
    parse_report_mail(data, dnsfunc=_dns())
    # strict: a key published for email only does not vouch for a report
    assert not dkim.verify(data, dnsfunc=_dns("email"), tlsrpt="strict")


def test_a_changed_report_no_longer_verifies() -> None:
    data = _mail()
    tampered = data.replace(b"Report Domain: example.net", b"Report Domain: example.org")
    assert tampered != data
    assert not dkim.verify(tampered, dnsfunc=_dns(), tlsrpt="strict")
