"""The error tree. Each error knows the SMTP reply it stands for.

Pure: no I/O. ``TempFail`` means defer (4xx); ``PermFail`` means bounce (5xx).
Third-party errors (ssl, dns, aiosmtplib, OSError) are translated into these once,
at the I/O edge; nothing deeper catches library exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mta.reply import S451_LOCAL_ERROR, S452_SPOOL_FULL, SmtpReply


class MtaError(Exception):
    """Base of every error the relay raises on purpose."""

    reply: ClassVar[SmtpReply] = S451_LOCAL_ERROR


class ConfigError(MtaError):
    """A policy file is wrong. ``str()`` is the one line an operator reads."""

    def __init__(self, source: Path | str, key: str, problem: str) -> None:
        self.source = str(source)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: {key}: {problem}")


class KeyFileError(MtaError):
    """A spool key file is missing, unsafe (loose mode, a link) or malformed."""


class SpoolError(MtaError):
    """The spool could not store or read a message (an I/O error, a bad record).

    ``451 4.3.0``: only a lack of space is "insufficient storage" (``SpoolFull``).
    """


class SpoolFull(SpoolError):
    """The spool's file system is full or over quota (ENOSPC, EDQUOT): ``452 4.3.1``."""

    reply = S452_SPOOL_FULL


class SpoolCorrupt(SpoolError):
    """A spool record failed to parse or authenticate: it goes to quarantine."""


class TempFail(MtaError):
    """Try again later (4xx)."""


class PermFail(MtaError):
    """Give up and bounce (5xx)."""

    reply = SmtpReply(550, "5.7.1", "Delivery not authorized")


class TlsPolicyFailure(TempFail):
    """The destination's TLS requirement cannot be met: defer, never downgrade.

    ``reason`` is the RFC 8460 result type (or one of ours, DESIGN.md), e.g.
    ``starttls-not-supported`` or ``validation-failure``.
    """

    reply = SmtpReply(451, "4.7.5", "TLS policy not satisfied")

    def __init__(self, message: str, reason: str = "validation-failure") -> None:
        super().__init__(message)
        self.reason = reason
