"""What a received TLS report must look like (RFC 8460 §4.4, §5.3): shared by the pure
tests and the integration tests that parse a report back from the wire."""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import re
from datetime import datetime
from email.message import EmailMessage
from typing import Any

import dkim

POLICY_TYPES = {"tlsa", "sts", "no-policy-found"}
RESULT_TYPES = {
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
}
FILENAME = re.compile(r"^([^!]+)!([^!]+)!(\d+)!(\d+)(?:!([^!]+))?\.json\.gz$")


def _is(value: object, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _datetime(value: object) -> bool:
    if not isinstance(value, str) or not value.endswith("Z"):
        return False
    datetime.fromisoformat(value.removesuffix("Z") + "+00:00")
    return True


def check_report_json(doc: Any) -> None:
    """Every required key of §4.4 present with its type; optional ones typed if present."""
    assert isinstance(doc, dict)
    assert _is(doc["organization-name"], str)
    assert doc["organization-name"]
    assert _datetime(doc["date-range"]["start-datetime"])
    assert _datetime(doc["date-range"]["end-datetime"])
    assert _is(doc["contact-info"], str)
    assert doc["contact-info"]
    assert _is(doc["report-id"], str)
    assert doc["report-id"]
    assert isinstance(doc["policies"], list)
    assert doc["policies"]
    for entry in doc["policies"]:
        policy = entry["policy"]
        assert policy["policy-type"] in POLICY_TYPES
        assert _is(policy["policy-domain"], str)
        for optional in ("policy-string", "mx-host"):
            assert optional not in policy or _strings(policy[optional])
        summary = entry["summary"]
        assert _is(summary["total-successful-session-count"], int)
        assert _is(summary["total-failure-session-count"], int)
        details = entry.get("failure-details", [])
        assert isinstance(details, list)
        assert (
            sum(d["failed-session-count"] for d in details)
            <= summary["total-failure-session-count"]
        )
        for detail in details:
            assert detail["result-type"] in RESULT_TYPES
            assert _is(detail["failed-session-count"], int)
            assert detail["failed-session-count"] > 0
            for optional in (
                "sending-mta-ip",
                "receiving-ip",
                "receiving-mx-hostname",
                "receiving-mx-helo",
                "additional-information",
                "failure-reason-code",
            ):
                assert optional not in detail or _is(detail[optional], str)


def parse_report_mail(data: bytes, dnsfunc: Any | None = None) -> tuple[EmailMessage, Any]:
    """The §5.3 mail checked (and its DKIM signature verified when ``dnsfunc`` is
    given); returns the message and the decompressed, schema-checked report."""
    if dnsfunc is not None:
        assert dkim.verify(data, dnsfunc=dnsfunc, tlsrpt="strict"), "DKIM does not verify"
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    domain = message["TLS-Report-Domain"]
    submitter = message["TLS-Report-Submitter"]
    assert domain
    assert submitter
    assert message["From"]
    assert message["Date"]
    assert message["Message-ID"]
    assert message["To"]
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    attachment = parts[1]
    assert isinstance(attachment, EmailMessage)
    match = FILENAME.match(attachment.get_filename() or "")
    assert match, attachment.get_filename()
    assert (match.group(1), match.group(2)) == (submitter, domain)
    payload = attachment.get_content()
    assert isinstance(payload, bytes)
    report = json.loads(gzip.decompress(payload))
    check_report_json(report)
    start = datetime.fromisoformat(report["date-range"]["start-datetime"].replace("Z", "+00:00"))
    assert int(match.group(3)) == int(start.timestamp())
    subject = " ".join(str(message["Subject"]).split())
    assert subject == (
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    )
    return message, report
