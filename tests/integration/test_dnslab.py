"""The DNSSEC lab: AD for secure data, none for insecure data, SERVFAIL for bogus data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration.dnslab import DnsLab, free_port

KEY_A = "3 1 1 " + "aa" * 32
KEY_B = "3 1 1 " + "bb" * 32


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsLab]:
    with DnsLab(tmp_path_factory.mktemp("dnslab")) as dns_lab:
        dns_lab.add_zone(
            "secure.test",
            [
                "@ MX 10 mx",
                "@ MX 20 alias",
                "mx A 127.0.0.1",
                f"_25._tcp.mx TLSA {KEY_A}",
                "alias CNAME mx.target.test.",
            ],
        )
        dns_lab.add_zone("target.test", ["mx A 127.0.0.2", f"_25._tcp.mx TLSA {KEY_B}"])
        dns_lab.add_zone(
            "plain.test",
            ["@ MX 10 mx", "mx A 127.0.0.3", f"_25._tcp.mx TLSA {KEY_A}"],
            signed=False,
        )
        dns_lab.add_zone(
            "bogus.test", ["@ MX 10 mx", "mx A 127.0.0.4", f"_25._tcp.mx TLSA {KEY_A}"], bogus=True
        )
        dns_lab.start()
        yield dns_lab


def ask(lab: DnsLab, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    query.flags |= dns.flags.AD
    host, port = lab.address
    return dns.query.udp(query, host, port=port, timeout=3)


def answers(reply: dns.message.Message, rdtype: str) -> list[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return sorted(
        rdata.to_text() for rrset in reply.answer if rrset.rdtype == wanted for rdata in rrset
    )


def is_secure(reply: dns.message.Message) -> bool:
    return bool(reply.flags & dns.flags.AD)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("secure.test", "MX", ["10 mx.secure.test.", "20 alias.secure.test."]),
        ("mx.secure.test", "A", ["127.0.0.1"]),
        ("_25._tcp.mx.secure.test", "TLSA", [KEY_A]),
        ("alias.secure.test", "A", ["127.0.0.2"]),  # through the CNAME into target.test
        ("_25._tcp.mx.target.test", "TLSA", [KEY_B]),
    ],
)
def test_secure_answers_carry_ad(lab: DnsLab, name: str, rdtype: str, expected: list[str]) -> None:
    reply = ask(lab, name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR
    assert answers(reply, rdtype) == expected
    assert is_secure(reply)


def test_cname_chain_is_in_the_answer(lab: DnsLab) -> None:
    reply = ask(lab, "alias.secure.test", "A")
    assert answers(reply, "CNAME") == ["mx.target.test."]


@pytest.mark.parametrize(
    ("name", "rcode"),
    [("nothing.secure.test", dns.rcode.NXDOMAIN), ("mx.secure.test", dns.rcode.NOERROR)],
)
def test_secure_denial_carries_ad(lab: DnsLab, name: str, rcode: dns.rcode.Rcode) -> None:
    reply = ask(lab, name, "AAAA")  # NXDOMAIN, or NODATA for a name that exists
    assert reply.rcode() == rcode
    assert reply.answer == []
    assert is_secure(reply)


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [("plain.test", "MX"), ("mx.plain.test", "A"), ("_25._tcp.mx.plain.test", "TLSA")],
)
def test_insecure_answers_have_no_ad(lab: DnsLab, name: str, rdtype: str) -> None:
    reply = ask(lab, name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR
    assert answers(reply, rdtype)
    assert not is_secure(reply)


def test_insecure_denial_has_no_ad(lab: DnsLab) -> None:
    reply = ask(lab, "nothing.plain.test", "A")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert not is_secure(reply)


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("bogus.test", "MX"),
        ("mx.bogus.test", "A"),
        ("_25._tcp.mx.bogus.test", "TLSA"),
        ("nothing.bogus.test", "A"),
    ],
)
def test_bogus_names_are_servfail(lab: DnsLab, name: str, rdtype: str) -> None:
    reply = ask(lab, name, rdtype)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert reply.answer == []


def test_bogus_data_is_there_without_validation(lab: DnsLab) -> None:
    """The SERVFAIL is the validator's verdict: with CD set, the data comes through."""
    query = dns.message.make_query("mx.bogus.test", "A", want_dnssec=True)
    query.flags |= dns.flags.CD
    host, port = lab.address
    reply = dns.query.udp(query, host, port=port, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR
    assert answers(reply, "A") == ["127.0.0.4"]


def test_names_outside_the_lab_are_refused(lab: DnsLab) -> None:
    assert ask(lab, "example.com", "A").rcode() == dns.rcode.REFUSED


def test_the_trust_anchor_is_the_parent_ds(lab: DnsLab) -> None:
    assert lab.trust_anchor.split()[:3] == ["test.", "IN", "DS"]


def test_start_stop_is_quick_and_leaves_nothing_running(tmp_path: Path) -> None:
    lab = DnsLab(tmp_path)
    lab.add_zone("quick.test", ["@ A 127.0.0.9"])
    with lab:
        host, port = lab.start()
        assert host.startswith("127.")
        assert lab.startup_seconds < 5
        assert answers(ask(lab, "quick.test", "A"), "A") == ["127.0.0.9"]
        procs = list(lab._procs)
        assert len(procs) == 2
    assert all(proc.poll() is not None for proc in procs)
    query = dns.message.make_query("quick.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, host, port=port, timeout=0.3)


def test_ports_are_never_handed_out_twice() -> None:
    ports = [free_port("127.0.0.1") for _ in range(20)]
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("example.com", {}), ("x.test", {"signed": False, "bogus": True}), ("test", {"bogus": True})],
)
def test_bad_zones_are_refused(tmp_path: Path, name: str, kwargs: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match=r"test|bogus"):
        DnsLab(tmp_path).add_zone(name, [], **kwargs)


@pytest.mark.parametrize("signed", [True, False])
def test_zone_syntax_errors_are_reported(tmp_path: Path, signed: bool) -> None:
    lab = DnsLab(tmp_path)
    lab.add_zone("broken.test", ["@ MX not-a-number mx"], signed=signed)
    with lab, pytest.raises(RuntimeError, match="could not parse"):
        lab.start()
    assert lab._procs == []
