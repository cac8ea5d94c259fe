"""TLS reports leave the relay: an HTTPS collector on loopback (trustme certificate)
receives the gzip POST; mailto reports go into our spool; a report is never sent twice,
and a destination that failed is retried, a few times only."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import pytest
import trustme

from mta.events import DeliveryAttempt, Event
from mta.model import (
    DeliveryResult,
    Envelope,
    HostPolicy,
    PolicySource,
    QueueId,
    SessionRecord,
    TlsInfo,
    TlsLevel,
)
from mta.policy.dns import NoDomain, TxtAnswer, TxtLookup
from mta.reply import SmtpReply
from mta.report.tlsrpt_mail import ReportSender
from mta.report.tlsrpt_send import (
    MAX_TRIES,
    HttpsPoster,
    Progress,
    SentState,
    TlsReporter,
)
from mta.spool.keys import KeyRing
from tests.integration.stsserver import Route, StsServer
from tests.report.tlsrpt_checks import check_report_json, parse_report_mail

DAY = date(2026, 12, 2)
NOON = 1_796_212_800.0
COLLECTOR = "127.0.0.61"
DEFAULT = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
TLS = TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256")


def _attempt(domain: str, result_type: str | None) -> DeliveryAttempt:
    session = SessionRecord(
        f"mx.{domain}",
        "127.0.0.25",
        SmtpReply(250, "2.0.0", "ok"),
        result_type,
        None if result_type else TLS,
        DEFAULT,
        "127.0.0.1",
    )
    result = DeliveryResult(domain, (), sessions=(session,))
    return DeliveryAttempt(NOON, QueueId("q"), NOON, result)


EVENTS: list[Event] = [
    _attempt("https.test", None),
    _attempt("https.test", "starttls-not-supported"),
    _attempt("mail.test", None),
    _attempt("silent.test", None),  # publishes no _smtp._tls record
]


class Dns:
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records

    async def txt(self, name: str) -> TxtLookup:
        if name in self.records:
            return TxtAnswer((self.records[name],))
        return NoDomain(f"{name}: NXDOMAIN")

    async def addresses(self, host: str) -> list[str]:
        return [COLLECTOR] if host == "collector.test" else []


class Clock:
    def now(self) -> float:
        return NOON + 86400


def _reporter(
    tmp_path: Path, ca_file: Path, collector_port: int, mailed: list[tuple[Envelope, bytes]]
) -> TlsReporter:
    dns = Dns(
        {
            "_smtp._tls.https.test": f"v=TLSRPTv1; rua=https://collector.test:{collector_port}/r",
            "_smtp._tls.mail.test": "v=TLSRPTv1;rua=mailto:tlsrpt@mail.test",
        }
    )
    context = ssl.create_default_context(cafile=str(ca_file))

    async def mail(envelope: Envelope, content: bytes) -> QueueId:
        mailed.append((envelope, content))
        return QueueId(f"r{len(mailed)}")

    def source(start: float, end: float) -> Iterable[Event]:
        return [e for e in EVENTS if start <= e.at < end]

    key_file = tmp_path / "keys" / "spool.key"
    keyring = KeyRing.load(key_file) if key_file.exists() else KeyRing.create(key_file)
    return TlsReporter(
        sender=ReportSender("Relay", "tls@relay.test", "tlsrpt-noreply@relay.test"),
        dkim_key=None,
        source=source,
        dns=dns,
        post=HttpsPoster(context, dns.addresses, timeout=10),
        mail=mail,
        state=SentState(tmp_path / "spool", keyring, os.urandom),
        clock=Clock(),
        rand=lambda: 0.5,
        hostname="relay.test",
    )


@pytest.fixture
def collector_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    return tls_ca.issue_cert("collector.test")


def test_reports_go_by_https_and_mail_once_and_failures_are_retried(
    tmp_path: Path, ca_file: Path, collector_cert: trustme.LeafCert
) -> None:
    mailed: list[tuple[Envelope, bytes]] = []
    with StsServer(
        COLLECTOR, cert=collector_cert, routes={"/r": Route(503, "text/plain", "")}
    ) as srv:
        reporter = _reporter(tmp_path, ca_file, srv.port, mailed)
        first = asyncio.run(reporter.send_day(DAY))
        srv.set_route("/r", Route(201, "text/plain", ""))
        second = asyncio.run(reporter.send_day(DAY))
        third = asyncio.run(reporter.send_day(DAY))
        posts = srv.posts

    # https failed at first (503), mail went at once; the second run retried the POST only
    assert (first.sent, first.failed, first.nowhere) == (1, 1, 1)
    assert (second.sent, second.failed, second.already) == (1, 0, 1)
    assert (third.sent, third.failed, third.already) == (0, 0, 2)
    assert len(posts) == 2
    path, content_type, body = posts[-1]
    assert (path, content_type) == ("/r", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    check_report_json(report)
    assert report["policies"][0]["policy"] == {
        "policy-type": "no-policy-found",
        "policy-domain": "https.test",
    }
    assert report["policies"][0]["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert report["policies"][0]["failure-details"] == [
        {
            "result-type": "starttls-not-supported",
            "sending-mta-ip": "127.0.0.1",
            "receiving-mx-hostname": "mx.https.test",
            "receiving-ip": "127.0.0.25",
            "failed-session-count": 1,
        }
    ]

    ((envelope, content),) = mailed  # never twice
    assert envelope.report is True
    assert envelope.mail_from == ""
    assert envelope.rcpt_tos == ("tlsrpt@mail.test",)
    message, mailed_report = parse_report_mail(content)
    assert message["TLS-Report-Domain"] == "mail.test"
    assert mailed_report["report-id"] == "20261202.mail.test@relay.test"


def test_the_sent_state_survives_a_new_reporter_and_tries_are_bounded(
    tmp_path: Path, ca_file: Path, collector_cert: trustme.LeafCert
) -> None:
    mailed: list[tuple[Envelope, bytes]] = []
    with StsServer(
        COLLECTOR, cert=collector_cert, routes={"/r": Route(500, "text/plain", "")}
    ) as srv:
        for _ in range(MAX_TRIES + 2):
            asyncio.run(_reporter(tmp_path, ca_file, srv.port, mailed).send_day(DAY))
        count = len(srv.posts)
    assert count == MAX_TRIES  # then the report is given up, not retried forever
    assert len(mailed) == 1  # a new reporter (a restart) reads the sealed state


def test_the_group_reads_the_sent_state_an_earlier_group_kept_in_a_shard(
    tmp_path: Path,
) -> None:
    """Groups once kept it under ``shards/0``: still read (merged), written at the root."""
    keyring = KeyRing.create(tmp_path / "keys" / "spool.key")
    spool, shard = tmp_path / "spool", tmp_path / "spool" / "shards" / "0"
    SentState(shard, keyring, os.urandom).save(DAY, "a.test", Progress(frozenset({"x"}), {"x": 1}))
    SentState(spool, keyring, os.urandom).save(DAY, "a.test", Progress(frozenset(), {"y": 2}))
    group = SentState(spool, keyring, os.urandom, also=[spool, shard])
    assert group.load(DAY, "a.test") == Progress(frozenset({"x"}), {"x": 1, "y": 2})
    assert group.load(DAY, "b.test") is None
    group.expire(date(2026, 12, 31))  # every copy of an old day goes
    assert not (shard / "tlsrpt" / DAY.isoformat()).exists()
    assert not (spool / "tlsrpt" / DAY.isoformat()).exists()


def test_a_redirect_is_not_followed_and_an_untrusted_collector_gets_nothing(
    tmp_path: Path, ca_file: Path, tls_ca: trustme.CA
) -> None:
    redirect = Route(307, "text/plain", "", {"Location": "https://collector.test/elsewhere"})
    with StsServer(
        COLLECTOR, cert=tls_ca.issue_cert("collector.test"), routes={"/r": redirect}
    ) as srv:
        reporter = _reporter(tmp_path, ca_file, srv.port, [])
        summary = asyncio.run(reporter.send_day(DAY))
        assert srv.requests == ["/r"]
    assert summary.failed == 1
    stranger = trustme.CA().issue_cert("collector.test")
    with StsServer(COLLECTOR, cert=stranger, routes={"/r": Route(200, "text/plain", "")}) as srv:
        problem = asyncio.run(
            HttpsPoster(ssl.create_default_context(cafile=str(ca_file)), Dns({}).addresses)(
                f"https://collector.test:{srv.port}/r", b"x"
            )
        )
        assert srv.posts == []
    assert problem is not None
    assert "certificate" in problem.lower()
