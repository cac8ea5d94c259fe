"""The immutable values that flow between stages: envelope, TLS level, delivery results.

Pure: no I/O. receive -> spool -> schedule -> deliver -> report hand each other these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, NewType

from mta.reply import SmtpReply

QueueId = NewType("QueueId", str)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the client said in MAIL FROM / RCPT TO, plus where it came from.

    ``mail_from`` is ``""`` for the null sender ``<>`` (bounces never go to it).
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    received_at: float
    client_address: str = ""
    helo: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    report: bool = False  # mail the relay wrote itself (a TLS report): never counted in one
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689): authenticated TLS hops only
    # The content has CRLF line endings only: our listener refused anything else, so
    # delivery need not scan a large message for bare CR or LF once more.
    crlf_only: bool = False
    # No line of the content begins with "." (our listener saw none): delivery has
    # nothing to dot-stuff and need not look for one.
    dot_free: bool = False


def domain_of(address: str) -> str:
    """The domain of an address: after the last ``@``, lower-cased ("" when none)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


class TlsLevel(enum.IntEnum):
    """Outbound TLS security levels, named as Postfix's ``smtp_tls_security_level``."""

    MAY = 0  # opportunistic: plaintext allowed (only where a policy says so)
    ENCRYPT = 1  # TLS with forward secrecy required, peer not authenticated
    DANE = 2  # DANE where usable TLSA exist, else encrypt
    DANE_ONLY = 3  # DANE required
    VERIFY = 4  # PKIX, certificate names the MX host
    SECURE = 5  # PKIX, certificate names the next-hop domain (or a subdomain)
    FINGERPRINT = 6  # pinned certificate or public-key digests

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> TlsLevel:
        """Parse ``"dane-only"`` etc.; raises ``ValueError`` for an unknown level."""
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            raise ValueError(label) from None


class Outcome(enum.Enum):
    """What happened to one recipient in one attempt."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class PolicySource(enum.Enum):
    """Which rule decided a requirement (``policy.source`` in ``mta check --json``)."""

    LOCAL = "local"
    DANE = "dane"
    MTA_STS = "mta-sts"
    MTA_STS_TESTING = "mta-sts-testing"
    DEFAULT = "default"


class PeerAuth(enum.Enum):
    """How a peer was authenticated; ``NONE`` when it was not (not asked, or a
    report-only check that failed)."""

    NONE = "none"
    DANE_EE = "dane-ee"
    DANE_TA = "dane-ta"
    PKIX = "pkix"
    FINGERPRINT = "fingerprint"


CheckKind = Literal["none", "pkix", "dane", "fingerprint"]


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """The requirement enforced on the host that got (or failed) the mail, and what the
    peer proved there. Per host, not per domain: DANE is decided for each MX host, so
    the domain's policy (often ``default``) says less. Receipts, TLS-RPT and metrics
    read this value; nothing re-parses logs (DESIGN.md: one typed event per attempt).
    """

    source: PolicySource
    level: TlsLevel
    check: CheckKind  # what the peer had to prove
    auth: PeerAuth = PeerAuth.NONE  # how it proved it
    report_only: bool = False  # MTA-STS testing: a failed check did not stop the mail
    reported_failure: str | None = None  # RFC 8460 type of a report-only check that failed
    policy_strings: tuple[str, ...] = ()  # TLSA records or MTA-STS lines (TLS-RPT)
    mx_patterns: tuple[str, ...] = ()  # the MTA-STS policy's mx patterns (TLS-RPT)

    @property
    def verified(self) -> bool:
        return self.auth is not PeerAuth.NONE

    @property
    def label(self) -> str:
        """``source/level``, as ``deliver.result`` logs it (``dane/dane``)."""
        return f"{self.source.value}/{self.level.label}"

    @property
    def rpt_policy_type(self) -> Literal["tlsa", "sts", "no-policy-found"]:
        """The RFC 8460 ``policy-type`` this attempt is reported under."""
        if self.check == "dane" or self.source is PolicySource.DANE:
            return "tlsa"
        if self.source in (PolicySource.MTA_STS, PolicySource.MTA_STS_TESTING):
            return "sts"
        return "no-policy-found"


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What was negotiated with a peer (logged with every result). ``peer_key`` is the
    leaf's public key (``RSA-2048``, ``EC-256``, ``Ed25519``) when it could be read."""

    version: str
    cipher: str
    peer_verified: bool = False
    peer_key: str | None = None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """One recipient's result: the reply that decided it and, for TLS failures,
    the RFC 8460 result type (``starttls-not-supported``, ``no-forward-secrecy``...)."""

    rcpt: str
    outcome: Outcome
    reply: SmtpReply
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One host tried in an attempt: a connection to one address, or a host the policy
    refused before connecting (``address`` empty). TLS-RPT counts these (RFC 8460 §4.3:
    sessions, not messages).

    ``result_type`` is the RFC 8460 result type when the TLS requirement was not met
    (``starttls-not-supported``, ``certificate-not-trusted``...), ``None`` otherwise;
    ``reply`` is what ended the session (the last reply, or our own 4xx).
    """

    mx: str
    address: str
    reply: SmtpReply
    result_type: str | None = None
    tls: TlsInfo | None = None
    policy: HostPolicy | None = None
    local_address: str = ""  # our end of the connection (TLS-RPT's sending-mta-ip)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The result of one delivery attempt for the recipients of one domain."""

    domain: str
    results: tuple[RecipientResult, ...]
    mx: str | None = None  # the host that decided (or failed last)
    tls: TlsInfo | None = None
    address: str | None = None  # its IP address
    policy: HostPolicy | None = None  # what it had to prove (None: no host was tried)
    sessions: tuple[SessionRecord, ...] = ()  # every host tried, in order (TLS-RPT, receipts)
