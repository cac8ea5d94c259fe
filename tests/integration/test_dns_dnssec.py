"""DnsClient's DNSSEC status, TLSA and TXT lookups against a real validating resolver (DnsLab)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from mta.config import Resolver
from mta.policy.dane import TlsaRecord
from mta.policy.decide import TlsaFacts, TlsaStatus
from mta.policy.dns import (
    MAX_CNAME_CHAIN,
    AddressesFound,
    DnsClient,
    DnsTempFail,
    MxHosts,
    NoDomain,
    TlsaAnswer,
    TxtAnswer,
    resolver_is_trusted,
)
from mta.policy.dnssec import ProbeSpec, parse_probe
from mta.policy.mx import MxRecord
from tests.integration.dnslab import PROBE, DnsLab

EE_A = "3 1 1 " + "aa" * 32
EE_B = "3 1 1 " + "bb" * 32
TA_C = "2 0 2 " + "cc" * 64
PKIX_D = "1 1 1 " + "dd" * 32  # usage 1 (PKIX-EE): unusable for SMTP (RFC 7672 §3.1.3)
# "3 1 1" with a 31-byte digest: unusable (RFC 7672 §3.1), refused by dnspython's parser.
# RFC 3597 generic syntax, since zone tools may refuse it in presentation form.
SHORT_EE = r"\# 34 030101" + "ee" * 31


def record(text: str) -> TlsaRecord:
    usage, selector, mtype, data = text.split()
    return TlsaRecord(int(usage), int(selector), int(mtype), bytes.fromhex(data))


def chain(prefix: str, hops: int) -> list[str]:
    """``<prefix>0`` -> ... -> ``<prefix><hops>`` (an A record): ``hops`` CNAMEs."""
    links = [f"{prefix}{i} CNAME {prefix}{i + 1}" for i in range(hops)]
    return [*links, f"{prefix}{hops} A 127.0.0.1"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with DnsLab(tmp_path_factory.mktemp("dnssec")) as dns_lab:
        dns_lab.add_zone(
            "secure.test",
            [
                "@ MX 10 mx",
                "@ MX 20 alias",
                "mx A 127.0.0.1",
                "mx AAAA ::1",
                f"_25._tcp.mx TLSA {EE_A}",
                f"_25._tcp.mx TLSA {TA_C}",
                f"_25._tcp.mx TLSA {PKIX_D}",
                "notlsa A 127.0.0.1",
                "unusable A 127.0.0.1",
                f"_25._tcp.unusable TLSA {PKIX_D}",
                # CNAME'd hosts (RFC 7672 §2.2.2)
                "alias CNAME mx.target.test.",
                f"_25._tcp.alias TLSA {EE_A}",  # ignored: the expanded name has TLSA
                "fallback CNAME notlsa.target.test.",
                f"_25._tcp.fallback TLSA {EE_A}",  # used: the expanded name has none
                "toplain CNAME mx.plain.test.",
                f"_25._tcp.toplain TLSA {EE_A}",  # ignored: the address chain is insecure
                # a secure host whose TLSA owner leads into the bogus zone
                "mxb A 127.0.0.1",
                "_25._tcp.mxb CNAME _25._tcp.mx.bogus.test.",
                # one malformed record beside a good one; only malformed ones
                "badmix A 127.0.0.1",
                f"_25._tcp.badmix TLSA {SHORT_EE}",
                f"_25._tcp.badmix TLSA {EE_A}",
                "allbad A 127.0.0.1",
                f"_25._tcp.allbad TLSA {SHORT_EE}",
                '_mta-sts TXT "v=STSv1; id=20240101T000000"',
                'multi TXT "v=STSv1; " "id=abc"',
                'multi TXT "second record"',
                *chain("ok", MAX_CNAME_CHAIN),
                *chain("long", MAX_CNAME_CHAIN + 1),
            ],
        )
        dns_lab.add_zone(
            "target.test", ["mx A 127.0.0.2", f"_25._tcp.mx TLSA {EE_B}", "notlsa A 127.0.0.5"]
        )
        dns_lab.add_zone(
            "plain.test",
            ["@ MX 10 mx", "mx A 127.0.0.3", f"_25._tcp.mx TLSA {EE_A}", '@ TXT "plain text"'],
            signed=False,
        )
        dns_lab.add_zone(
            "bogus.test",
            ["@ MX 10 mx", "mx A 127.0.0.4", f"_25._tcp.mx TLSA {EE_A}", '@ TXT "bogus"'],
            bogus=True,
        )
        dns_lab.start()
        yield dns_lab


@pytest.fixture(scope="module")
def client(lab: DnsLab) -> DnsClient:
    host, port = lab.address
    return DnsClient([Resolver(host, port)], timeout=3.0)


def test_the_lab_resolver_is_trusted(client: DnsClient, lab: DnsLab) -> None:
    host, port = lab.address
    assert client.resolvers == (Resolver(host, port),)
    assert resolver_is_trusted(client.resolvers, trusted=False)


# --- MX and addresses ---


def test_signed_mx_is_secure(client: DnsClient) -> None:
    found = asyncio.run(client.mx("secure.test"))
    assert isinstance(found, MxHosts)
    assert sorted(found.records, key=lambda r: r.preference) == [
        MxRecord(10, "mx.secure.test"),
        MxRecord(20, "alias.secure.test"),
    ]
    assert found.secure


def test_unsigned_mx_is_insecure(client: DnsClient) -> None:
    assert asyncio.run(client.mx("plain.test")) == MxHosts((MxRecord(10, "mx.plain.test"),))


def test_bogus_mx_is_a_temporary_failure(client: DnsClient) -> None:
    found = asyncio.run(client.mx("bogus.test"))
    assert isinstance(found, DnsTempFail)
    assert "SERVFAIL" in found.reason


def test_secure_nodata_mx_is_a_secure_implicit_mx(client: DnsClient) -> None:
    assert asyncio.run(client.mx("target.test")) == MxHosts((), secure=True)


@pytest.mark.parametrize(("domain", "secure"), [("nx.secure.test", True), ("nx.plain.test", False)])
def test_nxdomain_says_whether_the_denial_is_secure(
    client: DnsClient, domain: str, secure: bool
) -> None:
    found = asyncio.run(client.mx(domain))
    assert isinstance(found, NoDomain)
    assert found.secure is secure


def test_secure_addresses(client: DnsClient) -> None:
    found = asyncio.run(client.addresses("mx.secure.test"))
    assert found == AddressesFound(("127.0.0.1", "::1"), secure=True)


def test_insecure_addresses(client: DnsClient) -> None:
    assert asyncio.run(client.addresses("mx.plain.test")) == AddressesFound(("127.0.0.3",))


def test_cname_addresses_carry_the_expanded_name(client: DnsClient) -> None:
    found = asyncio.run(client.addresses("alias.secure.test"))
    assert found == AddressesFound(("127.0.0.2",), secure=True, canonical="mx.target.test")


def test_cname_into_an_unsigned_zone_is_insecure(client: DnsClient) -> None:
    found = asyncio.run(client.addresses("toplain.secure.test"))
    assert found == AddressesFound(("127.0.0.3",), secure=False, canonical="mx.plain.test")


def test_cname_chain_is_bounded(client: DnsClient) -> None:
    ok = asyncio.run(client.addresses("ok0.secure.test"))
    assert isinstance(ok, AddressesFound)
    assert ok.canonical == f"ok{MAX_CNAME_CHAIN}.secure.test"
    too_long = asyncio.run(client.addresses("long0.secure.test"))
    assert isinstance(too_long, DnsTempFail)
    assert "CNAME chain" in too_long.reason


def test_secure_nxdomain_for_a_host(client: DnsClient) -> None:
    found = asyncio.run(client.addresses("nx.secure.test"))
    assert isinstance(found, NoDomain)
    assert found.secure


# --- TLSA ---


def test_tlsa_rrset_with_its_status(client: DnsClient) -> None:
    found = asyncio.run(client.tlsa("mx.secure.test"))
    assert isinstance(found, TlsaAnswer)
    assert found.secure
    assert found.name == "_25._tcp.mx.secure.test"
    assert sorted(found.records, key=str) == sorted(map(record, [EE_A, TA_C, PKIX_D]), key=str)


def test_tlsa_port_is_part_of_the_name(client: DnsClient) -> None:
    found = asyncio.run(client.tlsa("mx.secure.test", 465))
    assert isinstance(found, NoDomain)
    assert found.secure


def test_tlsa_in_insecure_zone_is_insecure(client: DnsClient) -> None:
    found = asyncio.run(client.tlsa("mx.plain.test"))
    assert found == TlsaAnswer((record(EE_A),), secure=False, name="_25._tcp.mx.plain.test")


def test_tlsa_in_bogus_zone_is_a_temporary_failure(client: DnsClient) -> None:
    assert isinstance(asyncio.run(client.tlsa("mx.bogus.test")), DnsTempFail)


def test_usable_tlsa_for_host(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("mx.secure.test"))
    assert facts.status is TlsaStatus.USABLE
    assert facts.base == "mx.secure.test"
    assert sorted(facts.records, key=str) == sorted(map(record, [EE_A, TA_C]), key=str)


def test_tlsa_for_host_takes_the_address_lookup_already_made(
    client: DnsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivery has just looked the host's addresses up: the TLSA step reuses that
    answer instead of asking again (the two could even disagree)."""
    found = asyncio.run(client.addresses("mx.secure.test"))
    assert isinstance(found, AddressesFound)

    async def no_second_lookup(host: str) -> AddressesFound:
        raise AssertionError(f"addresses of {host} looked up again")

    monkeypatch.setattr(client, "addresses", no_second_lookup)
    facts = asyncio.run(client.tlsa_for_host("mx.secure.test", addresses=found))
    assert facts.status is TlsaStatus.USABLE
    insecure = AddressesFound(found.addresses, secure=False)
    assert asyncio.run(client.tlsa_for_host("mx.secure.test", addresses=insecure)).status is (
        TlsaStatus.INSECURE
    )


def test_only_unusable_tlsa(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("unusable.secure.test"))
    assert facts.status is TlsaStatus.UNUSABLE
    assert facts.records == ()
    assert facts.base == "unusable.secure.test"


def test_secure_nxdomain_for_tlsa_name_is_absent(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("notlsa.secure.test"))
    assert facts.status is TlsaStatus.ABSENT


def test_insecure_zone_is_not_dane(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("mx.plain.test"))
    assert facts.status is TlsaStatus.INSECURE
    assert facts.records == ()


def test_bogus_zone_fails(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("mx.bogus.test"))
    assert facts.status is TlsaStatus.FAILED


def test_bogus_tlsa_behind_secure_addresses_fails(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("mxb.secure.test"))
    assert facts.status is TlsaStatus.FAILED
    assert facts.base == "mxb.secure.test"


def test_cname_host_uses_the_expanded_name_first(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("alias.secure.test"))
    assert facts == TlsaFacts(
        TlsaStatus.USABLE,
        (record(EE_B),),
        base="mx.target.test",
        detail=facts.detail,
        name="_25._tcp.mx.target.test",
    )


def test_cname_host_falls_back_to_the_original_name(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("fallback.secure.test"))
    assert facts.status is TlsaStatus.USABLE
    assert facts.records == (record(EE_A),)
    assert facts.base == "fallback.secure.test"


def test_cname_into_an_insecure_zone_is_not_dane(client: DnsClient) -> None:
    """The original name has secure TLSA, but the address chain is insecure: no TLSA lookup."""
    facts = asyncio.run(client.tlsa_for_host("toplain.secure.test"))
    assert facts.status is TlsaStatus.INSECURE


def test_too_long_cname_chain_fails(client: DnsClient) -> None:
    assert asyncio.run(client.tlsa_for_host("long0.secure.test")).status is TlsaStatus.FAILED


def test_host_name_is_normalised(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("MX.Secure.Test."))
    assert facts.status is TlsaStatus.USABLE
    assert facts.base == "mx.secure.test"


# --- TXT ---


def test_txt_returns_the_strings(client: DnsClient) -> None:
    found = asyncio.run(client.txt("_mta-sts.secure.test"))
    assert found == TxtAnswer(("v=STSv1; id=20240101T000000",))


def test_txt_joins_each_records_strings(client: DnsClient) -> None:
    found = asyncio.run(client.txt("multi.secure.test"))
    assert isinstance(found, TxtAnswer)
    assert sorted(found.strings) == ["second record", "v=STSv1; id=abc"]


def test_txt_from_an_insecure_zone(client: DnsClient) -> None:
    assert asyncio.run(client.txt("plain.test")) == TxtAnswer(("plain text",))


@pytest.mark.parametrize(("name", "secure"), [("mx.secure.test", True), ("nx.plain.test", False)])
def test_txt_absent(client: DnsClient, name: str, secure: bool) -> None:
    found = asyncio.run(client.txt(name))
    assert isinstance(found, NoDomain)
    assert found.secure is secure


def test_txt_bogus_is_a_temporary_failure(client: DnsClient) -> None:
    assert isinstance(asyncio.run(client.txt("bogus.test")), DnsTempFail)


# --- a malformed TLSA record among good ones (issue 8 §3; RFC 7672 §3.1) ---


def test_one_malformed_tlsa_record_does_not_hide_the_good_one(client: DnsClient) -> None:
    began = time.monotonic()
    answer = asyncio.run(client.tlsa("badmix.secure.test"))
    assert time.monotonic() - began < 1.0  # answered at once, no timeout waited out
    assert isinstance(answer, TlsaAnswer)
    assert answer.secure
    short = TlsaRecord(3, 1, 1, bytes.fromhex("ee" * 31))
    assert sorted(answer.records, key=str) == sorted([record(EE_A), short], key=str)
    facts = asyncio.run(client.tlsa_for_host("badmix.secure.test"))
    assert facts.status is TlsaStatus.USABLE
    assert facts.records == (record(EE_A),)
    assert "1 unusable record(s) ignored" in facts.detail


def test_only_malformed_tlsa_records_are_unusable_not_a_failure(client: DnsClient) -> None:
    facts = asyncio.run(client.tlsa_for_host("allbad.secure.test"))
    assert facts.status is TlsaStatus.UNUSABLE  # TLS mandatory, unauthenticated
    assert "1 TLSA record(s), none usable" in facts.detail


# --- the DNSSEC probe (issue 8 §2) ---


@pytest.fixture(scope="module")
def plain_client(lab: DnsLab) -> DnsClient:
    """Through a second unbound with validation off: the same answers, never AD."""
    host, port = lab.start_plain_resolver()
    return DnsClient([Resolver(host, port)], timeout=3.0)


def test_the_probe_passes_at_a_validating_resolver(client: DnsClient) -> None:
    spec = parse_probe(PROBE)
    assert spec is not None
    answer = asyncio.run(client.probe_dnssec(spec))
    assert answer.validated, answer.detail


def test_the_probe_fails_at_a_resolver_that_does_not_validate(plain_client: DnsClient) -> None:
    answer = asyncio.run(plain_client.probe_dnssec(ProbeSpec("NS", "test.")))
    assert not answer.validated
    assert "without the AD bit" in answer.detail
    # what the relay would otherwise believe: a signed zone looks insecure
    found = asyncio.run(plain_client.mx("secure.test"))
    assert isinstance(found, MxHosts)
    assert not found.secure


def test_the_probe_fails_when_the_name_is_refused(client: DnsClient) -> None:
    answer = asyncio.run(client.probe_dnssec(ProbeSpec("NS", ".")))  # the lab refuses "."
    assert not answer.validated
    assert "no answer to the probe ns:." in answer.detail


def test_unverified_tlsa_reports_what_is_published(plain_client: DnsClient) -> None:
    assert asyncio.run(plain_client.tlsa_for_host("mx.secure.test")).status is (TlsaStatus.INSECURE)
    facts = asyncio.run(plain_client.tlsa_for_host("mx.secure.test", unverified=True))
    assert facts.status is TlsaStatus.USABLE
    assert facts.name == "_25._tcp.mx.secure.test"
    assert "published (unverified)" in facts.detail
    absent = asyncio.run(plain_client.tlsa_for_host("notlsa.secure.test", unverified=True))
    assert absent.status is TlsaStatus.ABSENT
