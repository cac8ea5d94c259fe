"""A realistic week of events for the transparency report's tests and its screenshot.

Deterministic (a seeded generator): DANE, MTA-STS, local-policy, encrypted-only and
clear-text destinations, deferrals with RFC 8460 types and with plain enhanced codes,
the relay's own TLS reports (which the report leaves out), and inbound mail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from mta.events import DeliveryAttempt, Event, MessageReceived
from mta.model import (
    DeliveryResult,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    TlsInfo,
    TlsLevel,
)
from mta.reply import SmtpReply

DAY: Final = 86400.0
NOW: Final = 1_709_769_600.0 + 15 * 3600  # 2024-03-07T15:00:00Z
OK: Final = SmtpReply(250, "2.0.0", "OK")
TLS13: Final = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, "EC-256")
TLS12: Final = TlsInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", False, "RSA-2048")

DANE_EE = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)
DANE_TA = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_TA)
STS = HostPolicy(PolicySource.MTA_STS, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)
LOCAL = HostPolicy(PolicySource.LOCAL, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)
LOCAL_FP = HostPolicy(PolicySource.LOCAL, TlsLevel.VERIFY, "fingerprint", PeerAuth.FINGERPRINT)
ENCRYPT = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
MAY = HostPolicy(PolicySource.DEFAULT, TlsLevel.MAY, "none")


@dataclass(frozen=True)
class Destination:
    domain: str
    weight: float  # share of the traffic
    policy: HostPolicy
    tls: TlsInfo | None
    other: tuple[float, HostPolicy, TlsInfo | None] | None = None  # a second kind of MX


DESTINATIONS: Final = (
    Destination("mailbox.example", 0.20, DANE_EE, TLS13),
    Destination("posteo.example", 0.12, DANE_TA, TLS13),
    Destination("gmail.example", 0.22, STS, TLS13),
    Destination("outlook.example", 0.14, STS, TLS12, (0.25, DANE_EE, TLS13)),
    Destination("partner.example", 0.08, LOCAL, TLS13),
    Destination("bank.example", 0.04, LOCAL_FP, TLS13),
    Destination("oldcorp.example", 0.08, ENCRYPT, TLS12),
    Destination("smallbiz.example", 0.06, ENCRYPT, TLS12),
    Destination("school.example", 0.03, ENCRYPT, TLS13),
    Destination("legacy.example", 0.02, MAY, None, (0.5, ENCRYPT, TLS12)),
    Destination("club.example", 0.01, MAY, None),
)
DEFERRALS: Final = (  # (reason, reply, weight)
    ("starttls-not-supported", SmtpReply(451, "4.7.5", "STARTTLS not offered"), 4),
    ("certificate-expired", SmtpReply(451, "4.7.5", "certificate expired"), 2),
    ("validation-failure", SmtpReply(451, "4.7.5", "TLSA mismatch"), 1),
    (None, SmtpReply(451, "4.4.1", "connection timed out"), 5),
    (None, SmtpReply(452, "4.2.2", "mailbox full"), 2),
    (None, SmtpReply(451, "4.3.0", "try again later"), 1),
)


def week(now: float = NOW, seed: int = 10) -> list[Event]:
    """Seven UTC days up to ``now`` of mixed traffic, oldest first."""
    rng = random.Random(seed)
    midnight = now - now % DAY
    events: list[Event] = []
    number = 0
    for back in range(6, -1, -1):
        day = midnight - back * DAY
        hours = (now - day) / 3600 if back == 0 else 24.0
        messages = int(rng.randint(140, 200) * hours / 24) + 5
        for _ in range(messages):
            number += 1
            at = day + rng.random() * (hours * 3600 - 60)
            qid = QueueId(f"q{number:05d}")
            tls = "TLSv1.3" if rng.random() < 0.93 else None
            events.append(MessageReceived(at, qid, "0.0.0.0:25", tls, False, 5000, 2))
            for destination in rng.choices(DESTINATIONS, [d.weight for d in DESTINATIONS], k=2):
                events.append(_attempt(rng, at + 2, qid, destination))
        for index in range(3):  # the day's TLS reports: excluded from the figures
            qid = QueueId(f"r{back}{index}")
            events.append(_attempt(rng, day + 300 + index, qid, DESTINATIONS[2], True))
    events.sort(key=lambda event: event.at)
    return events


def _attempt(
    rng: random.Random,
    at: float,
    qid: QueueId,
    destination: Destination,
    report: bool = False,
) -> DeliveryAttempt:
    rcpt = f"user{rng.randint(1, 99)}@{destination.domain}"
    if not report and rng.random() < 0.06:
        reason, reply, _ = rng.choices(DEFERRALS, [w for *_, w in DEFERRALS])[0]
        result = RecipientResult(rcpt, Outcome.DEFERRED, reply, reason)
    else:
        result = RecipientResult(rcpt, Outcome.SENT, OK)
    policy, tls = destination.policy, destination.tls
    if destination.other is not None and rng.random() < destination.other[0]:
        _, policy, tls = destination.other
    return DeliveryAttempt(
        at=at,
        qid=qid,
        received_at=at - 2,
        result=DeliveryResult(
            destination.domain,
            (result,),
            f"mx.{destination.domain}",
            tls,
            "192.0.2.25",
            policy,
        ),
        report=report,
    )
