"""Our decision as Postfix ``smtp_tls_policy_maps`` answers: a table driven through the
real ``DestinationResolver`` (fake DNS and MTA-STS facts, no sockets) and ``translate``,
and the server's request handling (``PolicyService.answer``) on the same fakes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mta.config import Config, validate
from mta.policy.dane import TlsaRecord
from mta.policy.decide import StsFacts, TlsaFacts, TlsaStatus
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
from mta.policy.resolver import DestinationResolver, DomainPlan, HostPlan
from mta.postfix.server import PolicyService
from mta.postfix.socketmap import Reply, Request, Status
from mta.postfix.tlspolicy import FLOORS, Options, lookup_domain, translate

FLOOR = " ".join(FLOORS)
RECORD = TlsaRecord(3, 1, 1, b"\x01" * 32)
FP = "sha256:" + "ab" * 32
MX2 = MxHosts((MxRecord(10, "mx1.dest.test"), MxRecord(20, "mx2.dest.test")), secure=True)
ADDR = AddressesFound(("192.0.2.1",), secure=True)


def usable() -> TlsaFacts:
    return TlsaFacts(TlsaStatus.USABLE, (RECORD,), "mx", name="_25._tcp.mx")


class FakeDns:
    def __init__(
        self,
        mx: MxLookup = MX2,
        tlsa: Mapping[str, TlsaFacts] | None = None,
        addresses: Mapping[str, AddressLookup] | None = None,
    ) -> None:
        self._mx, self._tlsa, self._addresses = mx, dict(tlsa or {}), dict(addresses or {})

    async def mx(self, domain: str) -> MxLookup:
        return self._mx

    async def addresses(self, host: str) -> AddressLookup:
        return self._addresses.get(host, ADDR)

    async def tlsa_for_host(
        self,
        host: str,
        port: int = 25,
        *,
        addresses: AddressLookup | None = None,
        unverified: bool = False,
    ) -> TlsaFacts:
        return self._tlsa.get(host, TlsaFacts(TlsaStatus.ABSENT))


class FakeSts:
    def __init__(self, facts: StsFacts) -> None:
        self._facts = facts

    async def facts(self, domain: str) -> StsFacts:
        return self._facts


def sts(mode: StsMode, *mx: str) -> FakeSts:
    return FakeSts(StsFacts(StsPolicy(mode, mx, 86400), "id1", state="fresh"))


def config(raw: Mapping[str, Any] | None = None) -> Config:
    return validate(dict(raw or {}), "test.toml", Path("/nonexistent"))


def resolver(cfg: Config, dns: FakeDns, sts_: FakeSts | None = None) -> DestinationResolver:
    return DestinationResolver(cfg, dns, sts_, None, dane_trusted=True, rand=random.Random(0))


async def decide(res: DestinationResolver, domain: str) -> tuple[DomainPlan, list[HostPlan]]:
    plan = await res.domain(domain)
    return plan, [await res.host(plan, h) for h in plan.hosts]


def answer(
    dns: FakeDns, sts_: FakeSts | None = None, raw: Mapping[str, Any] | None = None, **opts: bool
) -> Reply:
    plan, hosts = asyncio.run(decide(resolver(config(raw), dns, sts_), "dest.test"))
    return translate(plan, hosts, Options(**opts))


def local(level: str, **extra: Any) -> dict[str, Any]:
    return {"domain": [{"name": "dest.test", "level": level, **extra}]}


CASES: list[tuple[str, FakeDns, FakeSts | None, Mapping[str, Any] | None, str]] = [
    ("plain domain: our default", FakeDns(), None, None, f"OK encrypt servername=hostname {FLOOR}"),
    (
        "default may",
        FakeDns(),
        None,
        {"outbound": {"default_level": "may"}},
        f"OK may servername=hostname {FLOOR}",
    ),
    (
        "DANE on every host",
        FakeDns(tlsa={"mx1.dest.test": usable(), "mx2.dest.test": usable()}),
        None,
        None,
        f"OK dane-only {FLOOR}",
    ),
    (  # Postfix's dane would allow plaintext on mx2: only DANE hosts, never weaker
        "DANE on one host of two",
        FakeDns(tlsa={"mx2.dest.test": usable()}),
        None,
        None,
        f"OK dane-only {FLOOR}",
    ),
    (  # RFC 8461 §2: DANE beats MTA-STS
        "DANE and MTA-STS enforce",
        FakeDns(tlsa={"mx1.dest.test": usable()}),
        sts(StsMode.ENFORCE, "*.dest.test"),
        None,
        f"OK dane-only {FLOOR}",
    ),
    (
        "secure TLSA RRset, none usable: TLS mandatory even under default may",
        FakeDns(tlsa={"mx1.dest.test": TlsaFacts(TlsaStatus.UNUSABLE)}),
        None,
        {"outbound": {"default_level": "may"}},
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    (
        "TLSA lookup failed on a host: TEMP",
        FakeDns(tlsa={"mx2.dest.test": TlsaFacts(TlsaStatus.FAILED, detail="SERVFAIL")}),
        None,
        None,
        "TEMP dest.test: TLSA lookup for mx2.dest.test failed: SERVFAIL",
    ),
    (
        "MTA-STS enforce",
        FakeDns(),
        sts(StsMode.ENFORCE, "mx1.dest.test", "*.dest.test"),
        None,
        f"OK secure match=mx1.dest.test:.dest.test servername=hostname {FLOOR}",
    ),
    (
        "MTA-STS enforce, no MX host in the policy: TEMP",
        FakeDns(),
        sts(StsMode.ENFORCE, "mx.elsewhere.test"),
        None,
        "TEMP dest.test: 451 4.7.5 no MX host of dest.test matches its MTA-STS policy (RFC 8461)",
    ),
    (
        "MTA-STS testing: the default level",
        FakeDns(),
        sts(StsMode.TESTING, "*.dest.test"),
        None,
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    (
        "MTA-STS fetch failed, nothing cached: no policy (RFC 8461 §5), as delivery does",
        FakeDns(),
        FakeSts(StsFacts(None, state="fetch-error", error="sts-policy-fetch-error")),
        None,
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    (
        "MX lookup failed: TEMP",
        FakeDns(mx=DnsTempFail("SERVFAIL")),
        None,
        None,
        "TEMP dest.test: 451 4.4.3 Host or domain name lookup failed: SERVFAIL",
    ),
    (
        "an MX host's address lookup failed: TEMP (its TLSA are unknown)",
        FakeDns(addresses={"mx2.dest.test": DnsTempFail("timeout", timed_out=True)}),
        None,
        None,
        "TEMP dest.test: address lookup for mx2.dest.test failed",
    ),
    (
        "an MX host that does not exist is Postfix's to skip",
        FakeDns(addresses={"mx2.dest.test": NoDomain("NXDOMAIN")}),
        None,
        None,
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    (
        "null MX: Postfix bounces on its own",
        FakeDns(mx=NullMx()),
        None,
        None,
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    ("local may", FakeDns(), None, local("may"), f"OK may servername=hostname {FLOOR}"),
    (
        "local may outranks DANE",
        FakeDns(tlsa={"mx1.dest.test": usable()}),
        None,
        local("may"),
        f"OK may servername=hostname {FLOOR}",
    ),
    (
        "local dane, no TLSA: encrypt",
        FakeDns(),
        None,
        local("dane"),
        f"OK encrypt servername=hostname {FLOOR}",
    ),
    (
        "local dane with TLSA",
        FakeDns(tlsa={"mx1.dest.test": usable()}),
        None,
        local("dane"),
        f"OK dane-only {FLOOR}",
    ),
    ("local dane-only", FakeDns(), None, local("dane-only"), f"OK dane-only {FLOOR}"),
    (
        "local verify",
        FakeDns(),
        sts(StsMode.ENFORCE, "mx.elsewhere.test"),  # not consulted: local outranks it
        local("verify"),
        f"OK verify match=hostname servername=hostname {FLOOR}",
    ),
    (
        "local verify with its own CA",
        FakeDns(),
        None,
        local("verify", ca_file="/etc/mta/partner-ca.pem"),
        f"OK verify match=hostname servername=hostname tafile=/etc/mta/partner-ca.pem {FLOOR}",
    ),
    (
        "local secure",
        FakeDns(),
        None,
        local("secure"),
        f"OK secure match=dest.test:mx1.dest.test:mx2.dest.test servername=hostname {FLOOR}",
    ),
    (
        "local fingerprint",
        FakeDns(),
        None,
        local("fingerprint", fingerprints=[FP]),
        f"OK fingerprint match={':'.join(['AB'] * 32)} {FLOOR}",
    ),
]


@pytest.mark.parametrize(
    ("dns", "sts_", "raw", "wire"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_translation(
    dns: FakeDns, sts_: FakeSts | None, raw: Mapping[str, Any] | None, wire: str
) -> None:
    assert answer(dns, sts_, raw).payload().decode() == wire


def test_tlsrpt_attributes_only_when_asked_for() -> None:
    enforce = sts(StsMode.ENFORCE, "mx1.dest.test", "*.dest.test")
    reply = answer(FakeDns(), enforce, tlsrpt=True)
    assert reply.data == (
        "secure match=mx1.dest.test:.dest.test servername=hostname policy_type=sts "
        "policy_domain=dest.test policy_ttl=86400 mx_host_pattern=mx1.dest.test "
        "mx_host_pattern=*.dest.test { policy_string = version: STSv1 } "
        "{ policy_string = mode: enforce } { policy_string = mx: mx1.dest.test } "
        "{ policy_string = mx: *.dest.test } { policy_string = max_age: 86400 } " + FLOOR
    )
    assert "policy_type" not in answer(FakeDns(), enforce).data
    # DANE is Postfix's own TLSRPT business: a built-in level takes no policy_* attribute
    dane = answer(FakeDns(tlsa={"mx1.dest.test": usable()}), enforce, tlsrpt=True)
    assert dane.data == f"dane-only {FLOOR}"


@pytest.mark.parametrize(
    ("key", "domain"),
    [
        ("Example.COM.", "example.com"),
        ("mx_1.example", "mx_1.example"),
        (".example.com", None),  # Postfix's parent-domain probe
        ("[mx.example.com]:25", None),
        ("mx.example.com:25", None),
        ("192.0.2.1", None),
        ("[2001:db8::1]", None),
        ("a b", None),
        ("", None),
    ],
)
def test_lookup_keys(key: str, domain: str | None) -> None:
    assert lookup_domain(key) == domain


class SlowDns(FakeDns):
    async def mx(self, domain: str) -> MxLookup:
        await asyncio.sleep(10)
        raise AssertionError("not reached")


class BrokenDns(FakeDns):
    async def mx(self, domain: str) -> MxLookup:
        raise RuntimeError("boom")


def serve(dns: FakeDns, request: Request, raw: Mapping[str, Any] | None = None) -> Reply:
    cfg = config(raw)
    return asyncio.run(PolicyService(resolver(cfg, dns), cfg.policy_server).answer(request))


@pytest.mark.parametrize(
    ("dns", "request_", "raw", "status", "data"),
    [
        (
            FakeDns(),
            Request("mta", "dest.test"),
            None,
            Status.OK,
            f"encrypt servername=hostname {FLOOR}",
        ),
        (FakeDns(), Request("other", "dest.test"), None, Status.PERM, "unknown map name 'other'"),
        (
            FakeDns(),
            Request("tls", "dest.test"),
            {"policy_server": {"map_name": "tls"}},
            Status.OK,
            f"encrypt servername=hostname {FLOOR}",
        ),
        (FakeDns(), Request("mta", "[dest.test]:25"), None, Status.NOTFOUND, ""),
        (
            SlowDns(),
            Request("mta", "dest.test"),
            {"policy_server": {"lookup_timeout": "0.05s"}},
            Status.TEMP,
            "dest.test: policy lookup timed out",
        ),
        (
            BrokenDns(),
            Request("mta", "dest.test"),
            None,
            Status.TEMP,
            "dest.test: policy lookup failed",
        ),
    ],
)
def test_service_answers(
    dns: FakeDns,
    request_: Request,
    raw: Mapping[str, Any] | None,
    status: Status,
    data: str,
) -> None:
    assert serve(dns, request_, raw) == Reply(status, data)
