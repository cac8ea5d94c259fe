"""Non-delivery reports: the RFC 3464 DSN sent to the sender when recipients bounce.

Pure: no I/O, no clock, no randomness. The caller passes ``now`` and the
``message_id``; the MIME boundary is derived from the parts' own text. The report is
``multipart/report; report-type=delivery-status`` (RFC 6522) with a human-readable
part, a ``message/delivery-status`` part (RFC 3464 §2) and the original's header
section as ``text/rfc822-headers`` -- never its body: the relay keeps mail private,
so a bounce does not carry the message back across the network.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message, MIMEPart
from typing import Final

from mta.model import Envelope
from mta.reply import SmtpReply

SUBJECT: Final = "Undelivered Mail Returned to Sender"
# RFC 3463 X.4.7 "Delivery time expired".
EXPIRED_STATUS: Final = "4.4.7"
# Fields stay well inside RFC 5322's 998-octet line limit.
MAX_FIELD: Final = 900
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the report is about.

    Parameters:
        rcpt: the address as given in RCPT TO.
        status: the RFC 3463 status code, ``x.y.z`` (``4.4.7`` for an expired message).
        diagnostic: the SMTP reply that decided it, when there is one.
        remote_mta: the host that gave that reply, when known.
    """

    rcpt: str
    status: str
    diagnostic: SmtpReply | None = None
    remote_mta: str | None = None


def status_of(reply: SmtpReply) -> str:
    """The DSN status for a reply: its enhanced code, else ``<class>.0.0`` from the code."""
    if _STATUS.match(reply.enhanced):
        return reply.enhanced
    klass = reply.code // 100
    return f"{klass if klass in (2, 4, 5) else 5}.0.0"


def header_block(content: bytes) -> bytes:
    """The header section of a message (up to the first empty line; all of it if none)."""
    match = _HEADER_END.search(content)
    return content if match is None else content[: match.start()]


def build_dsn(
    *,
    original: Envelope,
    original_headers: bytes,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    now: float,
    message_id: str,
    queue_id: str = "",
) -> bytes:
    """A failure DSN for ``failed`` recipients of ``original``, addressed to its sender.

    Parameters:
        original: the envelope of the message that bounced (its sender must not be ``""``).
        original_headers: its header section (see ``header_block``).
        failed: the recipients to report, each with ``Action: failed``.
        reporting_mta: our host name (``Reporting-MTA: dns; ...``, ``MAILER-DAEMON@...``).
        now: the report's date, seconds since the epoch.
        message_id: the report's ``Message-ID`` (``<...@host>``).
        queue_id: the original's queue id, for the operator (``X-Mta-Queue-Id``).

    Returns the message as bytes with CRLF line endings.
    """
    if not original.mail_from:
        raise ValueError("no DSN is ever sent to the null sender")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    utf8 = not original.mail_from.isascii()
    # Fields stay under MAX_FIELD, so nothing needs folding; folding at the default
    # 78 columns would turn a long word of a diagnostic into RFC 2047 encoded words.
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(max_line_length=998)

    human = MIMEPart(policy=policy)
    _set_text(human, _human_text(failed, reporting_mta), "plain")
    status = MIMEPart(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(_status_blocks(original, failed, reporting_mta, now, queue_id, policy))
    headers = MIMEPart(policy=policy)
    _set_text(headers, original_headers.decode("utf-8", "replace"), "rfc822-headers")
    parts = (human, status, headers)

    report = MIMEPart(policy=policy)
    report["From"] = f"MAILER-DAEMON@{reporting_mta}"
    report["To"] = original.mail_from
    report["Subject"] = SUBJECT
    report["Date"] = _date(now)
    report["Message-ID"] = message_id
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report.set_boundary(digest_boundary(parts, "dsn"))
    for part in parts:
        report.attach(part)
    return report.as_bytes()


def _set_text(part: MIMEPart, text: str, subtype: str) -> None:
    lines = text.splitlines()
    plain = text.isascii() and all(len(line) <= MAX_FIELD for line in lines)
    part.set_content(
        text,
        subtype=subtype,
        charset="us-ascii" if text.isascii() else "utf-8",
        cte="7bit" if plain else "quoted-printable",
    )


def _human_text(failed: Sequence[FailedRecipient], reporting_mta: str) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The delivery report and the headers of your message are attached.",
        "",
    ]
    for rcpt in failed:
        reply = str(rcpt.diagnostic) if rcpt.diagnostic is not None else ""
        if rcpt.status == EXPIRED_STATUS:
            why = "message expired in the queue" + (f"; last reply: {reply}" if reply else "")
        else:
            why = reply or f"status {rcpt.status}"
        lines.append(f"<{_clean(rcpt.rcpt, keep_unicode=True)}>: {_clean(why)}")
    return "\n".join(lines) + "\n"


def _status_blocks(
    original: Envelope,
    failed: Sequence[FailedRecipient],
    reporting_mta: str,
    now: float,
    queue_id: str,
    policy: email.policy.EmailPolicy[EmailMessage],
) -> list[Message[str, str] | str]:
    per_message = EmailMessage(policy=policy)
    per_message["Reporting-MTA"] = f"dns; {_clean(reporting_mta)}"
    if queue_id:
        per_message["X-Mta-Queue-Id"] = _clean(queue_id)
    per_message["Arrival-Date"] = _date(original.received_at)
    blocks: list[Message[str, str] | str] = [per_message]
    for rcpt in failed:
        block = EmailMessage(policy=policy)
        block["Final-Recipient"] = _address_field(rcpt.rcpt)
        block["Action"] = "failed"
        block["Status"] = rcpt.status if _STATUS.match(rcpt.status) else "5.0.0"
        if rcpt.remote_mta:
            block["Remote-MTA"] = f"dns; {_clean(rcpt.remote_mta)}"
        if rcpt.diagnostic is not None:
            block["Diagnostic-Code"] = f"smtp; {_clean(str(rcpt.diagnostic))}"
        block["Last-Attempt-Date"] = _date(now)
        blocks.append(block)
    return blocks


def _address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; `` with ``\\x{HEX}`` for non-ASCII."""
    if address.isascii() and _clean(address) == address:
        return f"rfc822; {address}"
    escaped = "".join(
        ch if 0x21 <= ord(ch) <= 0x7E and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}"
        for ch in address
    )
    return f"utf-8; {escaped[:MAX_FIELD]}"


def _clean(text: str, *, keep_unicode: bool = False) -> str:
    """One line of printable text: controls (CR, LF...) become spaces, capped in length."""
    out = "".join(
        ch if ch.isprintable() and (keep_unicode or ch.isascii()) else " " if ch.isspace() else "?"
        for ch in text
    )
    return " ".join(out.split())[:MAX_FIELD]


def _date(timestamp: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(timestamp, UTC))


def digest_boundary(parts: Sequence[MIMEPart], tag: str) -> str:
    """A boundary that cannot occur in the parts: a digest of their own text (no
    randomness, so the same report is the same bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.as_bytes())
    return f"=_{tag}_{digest.hexdigest()[:40]}"
