"""DeliveryAgent without sockets: fake DNS answers and fake sessions drive routing,
host iteration and the DNS outcomes. Real sessions are in tests/integration/test_deliver.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mta.config import Config, validate
from mta.deliver.agent import MAX_ADDRESSES, DeliveryAgent
from mta.deliver.session import HostFailed, SessionOutcome, Target, Transacted, Transaction
from mta.errors import ConfigError
from mta.model import (
    DeliveryResult,
    Envelope,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    TlsInfo,
    TlsLevel,
)
from mta.policy.decide import StsFacts, TlsaFacts
from mta.policy.dns import (
    AddressesFound,
    AddressLookup,
    DnsTempFail,
    MxHosts,
    MxLookup,
    NoDomain,
    NullMx,
)
from mta.policy.mta_sts import StsMode, StsPolicy
from mta.policy.mx import MxRecord
from mta.policy.resolver import DestinationResolver
from mta.reply import SmtpReply

QID = QueueId("q1")
RCPTS = ("bob@dest.test", "carol@dest.test")
ENVELOPE = Envelope("alice@sender.test", RCPTS, received_at=0.0)
REFUSED = HostFailed(SmtpReply(451, "4.4.1", "connect to x: refused"))
TLS_FAILED = HostFailed(
    SmtpReply(451, "4.7.5", "TLS is required, but was not offered"), "starttls-not-supported"
)
SENT_REPLY = SmtpReply(250, "2.0.0", "OK")


def config(raw: Mapping[str, Any] | None = None, level: TlsLevel | None = None) -> Config:
    base: dict[str, Any] = {"outbound": {"port": 2525}}
    base.update(raw or {})
    cfg = validate(base, "test.toml", Path("/nonexistent"))
    if level is not None:
        cfg = dataclasses.replace(
            cfg, outbound=dataclasses.replace(cfg.outbound, default_level=level)
        )
    return cfg


class FakeDns:
    def __init__(
        self,
        mx: Mapping[str, MxLookup] | None = None,
        addresses: Mapping[str, AddressLookup] | None = None,
    ) -> None:
        self._mx = dict(mx or {})
        self._addresses = dict(addresses or {})
        self.asked: list[str] = []

    async def mx(self, domain: str) -> MxLookup:
        self.asked.append(f"MX {domain}")
        return self._mx.get(domain, NoDomain(f"{domain}: NXDOMAIN"))

    async def addresses(self, host: str) -> AddressLookup:
        self.asked.append(f"A {host}")
        return self._addresses.get(host, NoDomain(f"{host}: NXDOMAIN"))

    async def tlsa_for_host(
        self, host: str, port: int = 25, *, addresses: AddressLookup | None = None
    ) -> TlsaFacts:
        raise AssertionError("DANE is not trusted here: no TLSA lookups")


class FakeSessions:
    """Answers by address; an address not listed delivers everything."""

    def __init__(self, outcomes: Mapping[str, SessionOutcome | Exception] | None = None) -> None:
        self.outcomes = dict(outcomes or {})
        self.targets: list[Target] = []

    async def __call__(self, target: Target, txn: Transaction) -> SessionOutcome:
        self.targets.append(target)
        outcome = self.outcomes.get(target.address)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is not None:
            return outcome
        tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        results = tuple(RecipientResult(r, Outcome.SENT, SENT_REPLY) for r in txn.rcpts)
        return Transacted(results, tls)


class FakeSts:
    def __init__(self, facts: StsFacts) -> None:
        self._facts = facts

    async def facts(self, domain: str) -> StsFacts:
        return self._facts


def deliver(
    cfg: Config,
    dns: FakeDns,
    sessions: FakeSessions,
    domain: str = "dest.test",
    sts: FakeSts | None = None,
) -> DeliveryResult:
    destinations = DestinationResolver(
        cfg, dns, sts, None, dane_trusted=False, rand=random.Random(0)
    )
    agent = DeliveryAgent(cfg, destinations, session=sessions)
    return asyncio.run(agent.deliver(QID, ENVELOPE, domain, RCPTS, b"Subject: x\r\n\r\nhi\r\n"))


def outcomes(result: DeliveryResult) -> set[Outcome]:
    return {r.outcome for r in result.results}


def test_mx_hosts_in_preference_order_first_failures_skipped() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(20, "mx2.dest.test"), MxRecord(10, "mx1.dest.test")))},
        addresses={
            "mx1.dest.test": AddressesFound(("127.0.0.21", "127.0.0.22")),
            "mx2.dest.test": AddressesFound(("127.0.0.23",)),
        },
    )
    sessions = FakeSessions({"127.0.0.21": REFUSED, "127.0.0.22": TLS_FAILED})
    result = deliver(config(), dns, sessions)
    assert [t.address for t in sessions.targets] == ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    assert [t.mx for t in sessions.targets] == ["mx1.dest.test", "mx1.dest.test", "mx2.dest.test"]
    assert all(t.port == 2525 and t.level is TlsLevel.ENCRYPT for t in sessions.targets)
    assert outcomes(result) == {Outcome.SENT}
    assert result.mx == "mx2.dest.test"
    assert result.tls is not None
    assert [r.rcpt for r in result.results] == list(RCPTS)


def test_all_hosts_failing_defers_with_the_last_failure() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx1.dest.test"), MxRecord(20, "mx2.dest.test")))},
        addresses={
            "mx1.dest.test": AddressesFound(("127.0.0.21",)),
            "mx2.dest.test": AddressesFound(("127.0.0.22",)),
        },
    )
    sessions = FakeSessions({"127.0.0.21": REFUSED, "127.0.0.22": TLS_FAILED})
    result = deliver(config(), dns, sessions)
    assert outcomes(result) == {Outcome.DEFERRED}
    assert {r.reply for r in result.results} == {TLS_FAILED.reply}
    assert {r.reason for r in result.results} == {"starttls-not-supported"}
    assert result.mx == "mx2.dest.test"


def test_connection_failures_only_defer_with_4_4_1() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx1.dest.test"),))},
        addresses={"mx1.dest.test": AddressesFound(("127.0.0.21",))},
    )
    result = deliver(config(), dns, FakeSessions({"127.0.0.21": REFUSED}))
    assert {(r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in result.results} == {
        (Outcome.DEFERRED, 451, "4.4.1", None)
    }


def test_the_deciding_session_is_final_even_when_it_bounces() -> None:
    bounced = tuple(
        RecipientResult(r, Outcome.BOUNCED, SmtpReply(550, "5.7.1", "sender refused"))
        for r in RCPTS
    )
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx1.dest.test"), MxRecord(20, "mx2.dest.test")))},
        addresses={
            "mx1.dest.test": AddressesFound(("127.0.0.21",)),
            "mx2.dest.test": AddressesFound(("127.0.0.22",)),
        },
    )
    sessions = FakeSessions({"127.0.0.21": Transacted(bounced, None)})
    result = deliver(config(), dns, sessions)
    assert result.results == bounced
    assert len(sessions.targets) == 1


def test_null_mx_bounces_without_connecting() -> None:
    sessions = FakeSessions()
    result = deliver(config(), FakeDns(mx={"dest.test": NullMx()}), sessions)
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.BOUNCED, 556, "5.1.10")
    }
    assert sessions.targets == []


def test_nxdomain_bounces() -> None:
    result = deliver(config(), FakeDns(), FakeSessions())
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.BOUNCED, 550, "5.4.4")
    }


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (DnsTempFail("dest.test: SERVFAIL"), "dnssec-invalid"),  # may be a forged answer
        (DnsTempFail("dest.test: DNS timeout (type=MX)", timed_out=True), None),
    ],
)
def test_dns_temporary_failure_defers(failure: DnsTempFail, reason: str | None) -> None:
    dns = FakeDns(mx={"dest.test": failure})
    result = deliver(config(), dns, FakeSessions())
    assert {(r.outcome, r.reply.code, r.reply.enhanced, r.reason) for r in result.results} == {
        (Outcome.DEFERRED, 451, "4.4.3", reason)
    }


def test_implicit_mx_uses_the_domain_itself() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts(())},
        addresses={"dest.test": AddressesFound(("127.0.0.24",))},
    )
    sessions = FakeSessions()
    result = deliver(config(), dns, sessions)
    assert outcomes(result) == {Outcome.SENT}
    assert [(t.address, t.mx) for t in sessions.targets] == [("127.0.0.24", "dest.test")]


def test_no_address_for_any_host_bounces_but_a_temporary_failure_defers() -> None:
    mx = {"dest.test": MxHosts((MxRecord(10, "mx1.dest.test"), MxRecord(20, "mx2.dest.test")))}
    result = deliver(config(), FakeDns(mx=mx), FakeSessions())
    assert {(r.outcome, r.reply.enhanced) for r in result.results} == {(Outcome.BOUNCED, "5.4.4")}

    dns = FakeDns(mx=mx, addresses={"mx2.dest.test": DnsTempFail("mx2.dest.test: timeout")})
    result = deliver(config(), dns, FakeSessions())
    assert {(r.outcome, r.reply.enhanced) for r in result.results} == {(Outcome.DEFERRED, "4.4.3")}


def test_route_to_an_ip_literal_skips_dns() -> None:
    cfg = config({"route": [{"domain": "dest.test", "nexthop": "[127.0.0.30]:2600"}]})
    dns = FakeDns()
    sessions = FakeSessions()
    result = deliver(cfg, dns, sessions)
    assert outcomes(result) == {Outcome.SENT}
    assert [(t.address, t.port) for t in sessions.targets] == [("127.0.0.30", 2600)]
    assert dns.asked == []


def test_route_without_port_uses_outbound_port_and_mx_lookup_of_the_nexthop() -> None:
    cfg = config({"route": [{"domain": ".dest.test", "nexthop": "relay.hub.test"}]})
    dns = FakeDns(
        mx={"relay.hub.test": MxHosts((MxRecord(10, "in.hub.test"),))},
        addresses={"in.hub.test": AddressesFound(("127.0.0.31",))},
    )
    sessions = FakeSessions()
    result = deliver(cfg, dns, sessions, domain="sub.dest.test")
    assert outcomes(result) == {Outcome.SENT}
    assert dns.asked == ["MX relay.hub.test", "A in.hub.test"]
    assert [(t.address, t.port, t.mx) for t in sessions.targets] == [
        ("127.0.0.31", 2525, "in.hub.test")
    ]


def test_secure_requires_pkix_names_of_the_domain() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.hoster.test"), MxRecord(20, "mx.dest.test")))},
        addresses={
            "mx.hoster.test": AddressesFound(("127.0.0.32",)),
            "mx.dest.test": AddressesFound(("127.0.0.33",)),
        },
    )
    sessions = FakeSessions()
    result = deliver(config(level=TlsLevel.SECURE), dns, sessions)
    assert outcomes(result) == {Outcome.SENT}
    (target,) = sessions.targets
    assert target.mx == "mx.hoster.test"
    assert target.requirement.check.kind == "pkix"
    assert "dest.test" in target.requirement.check.names
    assert "mx.hoster.test" not in target.requirement.check.names  # not within dest.test


def test_mta_sts_enforce_skips_hosts_outside_the_policy() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.evil.test"), MxRecord(20, "mx.dest.test")))},
        addresses={
            "mx.evil.test": AddressesFound(("127.0.0.34",)),
            "mx.dest.test": AddressesFound(("127.0.0.35",)),
        },
    )
    policy = StsPolicy(StsMode.ENFORCE, ("*.dest.test",), 86400)
    sessions = FakeSessions()
    result = deliver(config(), dns, sessions, sts=FakeSts(StsFacts(policy, "id1", "fresh")))
    assert outcomes(result) == {Outcome.SENT}
    assert [t.mx for t in sessions.targets] == ["mx.dest.test"]
    assert sessions.targets[0].requirement.check.kind == "pkix"
    assert "A mx.evil.test" not in dns.asked


def test_mta_sts_enforce_with_no_matching_mx_defers() -> None:
    dns = FakeDns(mx={"dest.test": MxHosts((MxRecord(10, "mx.evil.test"),))})
    policy = StsPolicy(StsMode.ENFORCE, ("mx.dest.test",), 86400)
    sessions = FakeSessions()
    result = deliver(config(), dns, sessions, sts=FakeSts(StsFacts(policy, "id1", "fresh")))
    assert {(r.outcome, r.reply.enhanced, r.reason) for r in result.results} == {
        (Outcome.DEFERRED, "4.7.5", "validation-failure")
    }
    assert sessions.targets == []


def test_connections_per_attempt_are_capped() -> None:
    addresses = tuple(f"127.0.1.{i}" for i in range(1, 9))
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.dest.test"),))},
        addresses={"mx.dest.test": AddressesFound(addresses)},
    )
    sessions = FakeSessions(dict.fromkeys(addresses, REFUSED))
    result = deliver(config(), dns, sessions)
    assert len(sessions.targets) == MAX_ADDRESSES
    assert outcomes(result) == {Outcome.DEFERRED}


def test_a_bug_in_one_attempt_defers_that_message_only(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.dest.test"),))},
        addresses={"mx.dest.test": AddressesFound(("127.0.0.21",))},
    )
    sessions = FakeSessions({"127.0.0.21": RuntimeError("boom")})
    with caplog.at_level(logging.INFO, logger="mta.deliver"):
        result = deliver(config(), dns, sessions)
    assert {(r.outcome, r.reply.enhanced) for r in result.results} == {(Outcome.DEFERRED, "4.3.0")}
    assert any(rec.getMessage() == "deliver.error" for rec in caplog.records)


def test_one_result_line_per_attempt_without_addresses(caplog: pytest.LogCaptureFixture) -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.dest.test"),))},
        addresses={"mx.dest.test": AddressesFound(("127.0.0.21", "127.0.0.22"))},
    )
    refused_one = Transacted(
        (
            RecipientResult(RCPTS[0], Outcome.SENT, SENT_REPLY),
            RecipientResult(RCPTS[1], Outcome.BOUNCED, SmtpReply(550, "5.1.1", "no such user")),
        ),
        TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
    )
    sessions = FakeSessions({"127.0.0.21": REFUSED, "127.0.0.22": refused_one})
    with caplog.at_level(logging.INFO, logger="mta.deliver"):
        deliver(config(), dns, sessions)
    lines = [rec for rec in caplog.records if rec.getMessage() == "deliver.result"]
    assert len(lines) == 1
    facts: dict[str, Any] = lines[0].__dict__
    assert facts["qid"] == QID
    assert facts["domain"] == "dest.test"
    assert facts["mx"] == "mx.dest.test"
    assert facts["tls"] == "TLSv1.3"
    assert facts["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert (facts["sent"], facts["deferred"], facts["bounced"]) == (1, 0, 1)
    assert facts["reply"] == "550 5.1.1"
    assert facts["rcpt"].startswith("h:")
    for rec in caplog.records:
        text = " ".join(str(v) for v in rec.__dict__.values())
        for address in (*RCPTS, ENVELOPE.mail_from):
            assert address not in text


def test_a_client_certificate_that_cannot_be_loaded_stops_start_up(tmp_path: Path) -> None:
    """Loaded with the agent, not at the first delivery to that domain: the relay does
    not start with it (and no DSN ever quotes its path)."""
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    cfg = config(
        {
            "domain": [
                {
                    "name": "dc2.example",
                    "level": "encrypt",
                    "client_cert": str(cert),
                    "client_key": str(key),
                }
            ]
        }
    )
    destinations = DestinationResolver(
        cfg, FakeDns(), None, None, dane_trusted=False, rand=random.Random(0)
    )
    with pytest.raises(ConfigError, match=r"domain\.client_cert: cannot load"):
        DeliveryAgent(cfg, destinations)


def test_the_result_carries_the_requirement_of_the_host_that_decided(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 8 §4: the host's requirement (here DANE, as a session reports it), not the
    domain's default, is in the result and in the ``deliver.result`` line; a host that
    failed first does not lend it its own."""
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.dest.test"),))},
        addresses={"mx.dest.test": AddressesFound(("127.0.0.21", "127.0.0.22"))},
    )
    dane = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)
    tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, "EC-256")
    sent = tuple(RecipientResult(r, Outcome.SENT, SENT_REPLY) for r in RCPTS)
    failed_policy = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
    sessions = FakeSessions(
        {
            "127.0.0.21": dataclasses.replace(TLS_FAILED, policy=failed_policy),
            "127.0.0.22": Transacted(sent, tls, dane),
        }
    )
    with caplog.at_level(logging.INFO, logger="mta.deliver"):
        result = deliver(config(), dns, sessions)
    assert (result.mx, result.address, result.policy, result.tls) == (
        "mx.dest.test",
        "127.0.0.22",
        dane,
        tls,
    )
    (line,) = [rec for rec in caplog.records if rec.getMessage() == "deliver.result"]
    facts: dict[str, Any] = line.__dict__
    assert (facts["policy"], facts["verified"], facts["key"]) == ("dane/dane", "dane-ee", "EC-256")
    assert facts["address"] == "127.0.0.22"


def test_a_deferral_carries_the_requirement_of_the_last_host_tried() -> None:
    dns = FakeDns(
        mx={"dest.test": MxHosts((MxRecord(10, "mx.dest.test"),))},
        addresses={"mx.dest.test": AddressesFound(("127.0.0.21",))},
    )
    policy = HostPolicy(PolicySource.MTA_STS, TlsLevel.VERIFY, "pkix")
    sessions = FakeSessions({"127.0.0.21": dataclasses.replace(TLS_FAILED, policy=policy)})
    result = deliver(config(), dns, sessions)
    assert outcomes(result) == {Outcome.DEFERRED}
    assert (result.address, result.policy) == ("127.0.0.21", policy)
    assert result.policy is not None
    assert result.policy.rpt_policy_type == "sts"


def test_every_host_tried_is_one_session_record_in_order() -> None:
    """TLS-RPT counts sessions, not messages (RFC 8460 §4.3): a host the MTA-STS policy
    refused, a TLS failure and the host that took the mail are three records."""
    dns = FakeDns(
        mx={
            "dest.test": MxHosts(
                (
                    MxRecord(5, "mx.evil.test"),
                    MxRecord(10, "mx1.dest.test"),
                    MxRecord(20, "mx2.dest.test"),
                )
            )
        },
        addresses={
            "mx1.dest.test": AddressesFound(("127.0.0.21",)),
            "mx2.dest.test": AddressesFound(("127.0.0.22",)),
        },
    )
    policy = StsPolicy(StsMode.TESTING, ("*.dest.test",), 86400)
    sessions = FakeSessions({"127.0.0.21": TLS_FAILED})
    result = deliver(config(), dns, sessions, sts=FakeSts(StsFacts(policy, "id1", "fresh")))
    assert outcomes(result) == {Outcome.SENT}
    assert [(s.mx, s.address, s.result_type) for s in result.sessions] == [
        ("mx1.dest.test", "127.0.0.21", "starttls-not-supported"),
        ("mx2.dest.test", "127.0.0.22", None),
    ]
    assert result.sessions[0].reply == TLS_FAILED.reply
    assert result.sessions[1].tls == TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")


def test_a_host_refused_by_the_policy_is_a_session_without_an_address() -> None:
    dns = FakeDns(mx={"dest.test": MxHosts((MxRecord(10, "mx.evil.test"),))})
    policy = StsPolicy(StsMode.ENFORCE, ("mx.dest.test",), 86400)
    result = deliver(config(), dns, FakeSessions(), sts=FakeSts(StsFacts(policy, "id1", "fresh")))
    assert [(s.mx, s.address, s.result_type) for s in result.sessions] == [
        ("mx.evil.test", "", "validation-failure")
    ]


# --- REQUIRETLS (RFC 8689 §4.2.1) and TLS-Required: No (§4.2.2) ---

NO_REQUIRETLS = HostFailed(
    SmtpReply(550, "5.7.30", "REQUIRETLS support required: host mx: REQUIRETLS not offered"),
    requiretls=True,
)
TWO_MX = FakeDns(
    mx={"dest.test": MxHosts((MxRecord(10, "mx1.dest.test"), MxRecord(20, "mx2.dest.test")))},
    addresses={
        "mx1.dest.test": AddressesFound(("127.0.0.21",)),
        "mx2.dest.test": AddressesFound(("127.0.0.22",)),
    },
)


def deliver_message(
    cfg: Config, sessions: FakeSessions, envelope: Envelope, content: bytes
) -> DeliveryResult:
    destinations = DestinationResolver(
        cfg, TWO_MX, None, None, dane_trusted=False, rand=random.Random(0)
    )
    agent = DeliveryAgent(cfg, destinations, session=sessions)
    return asyncio.run(agent.deliver(QID, envelope, "dest.test", RCPTS, content))


class RecordingSessions(FakeSessions):
    def __init__(self, outcomes: Mapping[str, SessionOutcome | Exception] | None = None) -> None:
        super().__init__(outcomes)
        self.txns: list[Transaction] = []

    async def __call__(self, target: Target, txn: Transaction) -> SessionOutcome:
        self.txns.append(txn)
        return await super().__call__(target, txn)


REQUIRING = dataclasses.replace(ENVELOPE, requiretls=True)
BODY = b"Subject: x\r\n\r\nhi\r\n"


def test_requiretls_tries_every_mx_then_bounces_with_5_7_30() -> None:
    sessions = RecordingSessions({"127.0.0.21": NO_REQUIRETLS, "127.0.0.22": NO_REQUIRETLS})
    result = deliver_message(config(), sessions, REQUIRING, BODY)
    assert [t.address for t in sessions.targets] == ["127.0.0.21", "127.0.0.22"]
    assert all(txn.requiretls for txn in sessions.txns)
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.BOUNCED, 550, "5.7.30")
    }


def test_requiretls_goes_to_the_mx_that_can_take_it() -> None:
    sessions = RecordingSessions({"127.0.0.21": NO_REQUIRETLS})
    result = deliver_message(config(), sessions, REQUIRING, BODY)
    assert outcomes(result) == {Outcome.SENT}
    assert result.mx == "mx2.dest.test"


def test_requiretls_waits_while_another_mx_failed_for_another_reason() -> None:
    sessions = RecordingSessions({"127.0.0.21": REFUSED, "127.0.0.22": NO_REQUIRETLS})
    result = deliver_message(config(), sessions, REQUIRING, BODY)
    assert {(r.outcome, r.reply.code, r.reply.enhanced) for r in result.results} == {
        (Outcome.DEFERRED, 451, "4.7.30")
    }


NO_HEADER = b"Subject: x\r\nTLS-Required: No\r\n\r\nhi\r\n"


@pytest.mark.parametrize(
    ("honour", "envelope", "relaxed"),
    [
        (False, ENVELOPE, False),  # the default: the header changes nothing
        (True, ENVELOPE, True),
        (True, REQUIRING, False),  # §4.1: REQUIRETLS on MAIL FROM wins, header ignored
    ],
)
def test_tls_required_no_is_honoured_only_when_configured(
    honour: bool, envelope: Envelope, relaxed: bool
) -> None:
    sessions = RecordingSessions()
    cfg = config({"outbound": {"port": 2525, "honour_tls_required_no": honour}})
    deliver_message(cfg, sessions, envelope, NO_HEADER)
    assert {t.tls_required_no for t in sessions.targets} == {relaxed}
