"""SMTP replies with enhanced status codes (RFC 5321, RFC 3463), and the catalogue we send.

Pure: no I/O. Every reply the relay sends or records is an ``SmtpReply`` so the
code, the enhanced code and the text always travel together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One SMTP reply line: ``code enhanced text``."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


# Catalogue, named S<code>_<MEANING> as in aiosmtpd's testing/statuscodes.py.
S250_OK = SmtpReply(250, "2.0.0", "OK")
S250_SENDER_OK = SmtpReply(250, "2.1.0", "Sender OK")
S250_RCPT_OK = SmtpReply(250, "2.1.5", "Recipient OK")
S421_SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down")
S451_LOCAL_ERROR = SmtpReply(451, "4.3.0", "Local error in processing")
S452_SPOOL_FULL = SmtpReply(452, "4.3.1", "Insufficient system storage")
S452_TOO_MANY_RCPTS = SmtpReply(452, "4.5.3", "Too many recipients")
S501_BAD_ADDRESS = SmtpReply(501, "5.1.3", "Bad address syntax")
S501_BAD_SENDER = SmtpReply(501, "5.1.7", "Bad sender address syntax")
S503_NEED_RCPT = SmtpReply(503, "5.5.1", "Need RCPT command")
S530_STARTTLS_FIRST = SmtpReply(530, "5.7.0", "Must issue a STARTTLS command first")
S530_AUTH_REQUIRED = SmtpReply(530, "5.7.0", "Authentication required")
S530_REQUIRETLS_NEEDS_TLS = SmtpReply(
    530, "5.7.10", "REQUIRETLS needs a TLS session: issue STARTTLS first"
)
S550_BARE_LINE_ENDING = SmtpReply(
    550, "5.5.2", "Message contains bare CR or LF; line endings must be CRLF"
)
S550_NUL_CHARACTER = SmtpReply(550, "5.6.0", "Message contains NUL characters")
S552_TOO_BIG = SmtpReply(552, "5.3.4", "Message size exceeds fixed limit")
S552_HEADER_TOO_BIG = SmtpReply(552, "5.3.4", "Message header too big")
S554_TOO_MANY_HOPS = SmtpReply(554, "5.4.6", "Too many hops")
S554_RELAY_DENIED = SmtpReply(554, "5.7.1", "Relay access denied")
