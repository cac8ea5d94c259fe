"""A TLS report as it travels (RFC 8460 §5): gzip-compressed JSON, and the mail around it.

Pure: no I/O, no clock, no randomness. The caller passes ``now`` and the
``Message-ID``; everything else is derived from the report, so a retried report is
the same bytes (the receiver may deduplicate on the report id).

- ``compress_report``: the §4 JSON, gzip-compressed (``application/tlsrpt+gzip``,
  §5.3), with no file name or time in the gzip header.
- ``report_message``: ``multipart/report; report-type="tlsrpt"`` (§5.3) with a
  human-readable ``text/plain`` part and the compressed report as an attachment named
  ``<submitter>!<policy-domain>!<begin>!<end>!<unique>.json.gz`` (§5.1), the subject
  ``Report Domain: <domain> Submitter: <submitter> Report-ID: <<id>>`` and the
  ``TLS-Report-Domain`` / ``TLS-Report-Submitter`` headers (§5.3); DKIM-signed when
  a key is given (dkimpy, ``tlsrpt=True``: no ``l=`` tag, §5.3).
"""

from __future__ import annotations

import email.policy
import email.utils
import gzip
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from email.message import MIMEPart
from typing import Any, Final

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints

from mta.report.dsn import digest_boundary
from mta.report.tlsrpt import day_range

__all__ = [
    "CONTENT_TYPE",
    "DkimKey",
    "ReportSender",
    "compress_report",
    "dkim_sign",
    "report_filename",
    "report_id",
    "report_message",
]

CONTENT_TYPE: Final = "application/tlsrpt+gzip"
# What the signature covers (From first: RFC 6376 requires it).
SIGNED_HEADERS: Final = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "TLS-Report-Domain",
    "TLS-Report-Submitter",
    "MIME-Version",
    "Content-Type",
)


@dataclass(frozen=True, slots=True)
class ReportSender:
    """Who the reports are from (``[tlsrpt]``): the ``organization-name`` and
    ``contact-info`` of §4.4, the ``From`` address, and the submitter (its domain)."""

    organization: str
    contact: str
    address: str

    @property
    def submitter(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A DKIM signing key: ``d=`` domain, ``s=`` selector, the private key (PEM)."""

    domain: str
    selector: str
    private_key: bytes


def report_id(day: date, domain: str, submitter: str) -> str:
    """The report's id (§4.4 ``report-id``): one per day and policy domain, so a retry
    carries the same id; shaped like a Message-ID, as in §5.3's example."""
    return f"{day:%Y%m%d}.{domain}@{submitter}"


def compress_report(report: Mapping[str, Any]) -> bytes:
    """The §4 JSON, gzip-compressed; no name and time 0 in the header (same bytes)."""
    body = json.dumps(report, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return gzip.compress(body, mtime=0)


def report_filename(submitter: str, domain: str, day: date, identifier: str) -> str:
    """§5.1: ``submitter!policy-domain!begin-timestamp!end-timestamp!unique-id.json.gz``.

    The timestamps are the report's date range in epoch seconds; the unique id is
    derived from the report id (``!`` never occurs in it).
    """
    start, end = day_range(day)
    unique = hashlib.sha256(identifier.encode()).hexdigest()[:16]
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}!{unique}.json.gz"


def report_message(
    report: Mapping[str, Any],
    *,
    day: date,
    domain: str,
    sender: ReportSender,
    to: Sequence[str],
    now: datetime,
    message_id: str,
    dkim_key: DkimKey | None = None,
) -> bytes:
    """The report mail (module docstring) as bytes with CRLF line endings.

    Parameters:
        report: the §4 JSON object (``tlsrpt.render_report``).
        day: the UTC day it covers; domain: its policy domain.
        sender: who reports (``From``, submitter, organization).
        to: the ``mailto:`` addresses of the domain's ``rua``.
        now: the ``Date``; message_id: the ``Message-ID`` (``<...@host>``).
        dkim_key: sign with it (``DKIM-Signature`` first), or leave unsigned.
    """
    policy = email.policy.SMTP.clone(max_line_length=998)
    submitter = sender.submitter
    identifier = str(report["report-id"])

    human = MIMEPart(policy=policy)
    human.set_content(
        _human_text(report, day, domain, submitter), subtype="plain", charset="us-ascii", cte="7bit"
    )
    attachment = MIMEPart(policy=policy)
    attachment.set_content(
        compress_report(report),
        maintype="application",
        subtype="tlsrpt+gzip",
        disposition="attachment",
        filename=report_filename(submitter, domain, day, identifier),
    )
    parts = (human, attachment)

    message = MIMEPart(policy=policy)
    message["From"] = sender.address
    message["To"] = ", ".join(to)
    message["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{identifier}>"
    message["Date"] = email.utils.format_datetime(now)
    message["Message-ID"] = message_id
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["Auto-Submitted"] = "auto-generated"
    message["MIME-Version"] = "1.0"
    message["Content-Type"] = 'multipart/report; report-type="tlsrpt"'
    message.set_boundary(digest_boundary(parts, "tlsrpt"))
    for part in parts:
        message.attach(part)
    data = message.as_bytes()
    return dkim_sign(data, dkim_key) if dkim_key is not None else data


def dkim_sign(message: bytes, key: DkimKey) -> bytes:
    """``message`` with a ``DKIM-Signature`` (relaxed/simple, rsa-sha256) in front.

    ``dkim.DKIMException`` for a key dkimpy cannot use (checked at start-up, so a
    report never waits on a bad key).
    """
    signature = dkim.sign(
        message,
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private_key,
        include_headers=[name.encode("ascii") for name in SIGNED_HEADERS],
        tlsrpt=True,
    )
    return bytes(signature) + message


def _human_text(report: Mapping[str, Any], day: date, domain: str, submitter: str) -> str:
    successes = failures = 0
    for policy in report.get("policies", []):
        successes += int(policy["summary"]["total-successful-session-count"])
        failures += int(policy["summary"]["total-failure-session-count"])
    return (
        f"This is an aggregate TLS report (RFC 8460) from {submitter}\n"
        f"for {domain} on {day.isoformat()} (UTC): {successes} successful and "
        f"{failures} failed TLS session(s).\n"
        "The report is attached as gzip-compressed JSON.\n"
    )
