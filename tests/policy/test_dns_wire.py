"""TLSA records read from the wire where dnspython refuses one (issue 8 §3; RFC 7672 §3.1).

Pure: the DNS messages are bytes built here, no sockets.
"""

from __future__ import annotations

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from mta.policy.dane import TlsaRecord, is_usable, parse_tlsa_rdata
from mta.policy.dns import _lenient_response, _rdata_from_wire, _RRset, answer_rdatas

OWNER = "_25._tcp.mx.example.test."
GOOD = bytes([3, 1, 1]) + b"\xaa" * 32
SHORT = bytes([3, 1, 1]) + b"\xee" * 31  # a SHA-256 digest one byte short


def response_wire(rdatas: list[bytes], qtype: str = "TLSA", *, secure: bool = True) -> bytes:
    """A resolver's response to ``qtype`` at OWNER holding these TLSA rdatas as published."""
    query = dns.message.make_query(OWNER, qtype, want_dnssec=True)
    response = dns.message.make_response(query)
    if secure:
        response.flags |= dns.flags.AD
    rrset = dns.rrset.RRset(dns.name.from_text(OWNER), dns.rdataclass.IN, dns.rdatatype.TLSA)
    for data in rdatas:
        rrset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, data), 300)
    response.answer.append(rrset)
    return response.to_wire()


def test_dnspython_refuses_the_whole_response() -> None:
    """The trigger: one inconsistent rdata fails the parse of every record."""
    with pytest.raises(dns.exception.FormError):
        dns.message.from_wire(response_wire([SHORT, GOOD]))


def test_every_record_is_read_as_published() -> None:
    found, ttl = answer_rdatas(
        response_wire([SHORT, GOOD]), dns.name.from_text(OWNER), dns.rdatatype.TLSA
    )
    assert sorted(found) == sorted([SHORT, GOOD])
    assert ttl == 300


@pytest.mark.parametrize(
    ("rdata", "record", "usable"),
    [
        (GOOD, TlsaRecord(3, 1, 1, b"\xaa" * 32), True),
        (SHORT, TlsaRecord(3, 1, 1, b"\xee" * 31), False),
        (bytes([2, 0, 2]) + b"\x01" * 65, TlsaRecord(2, 0, 2, b"\x01" * 65), False),
        (bytes([3, 1, 0]), TlsaRecord(3, 1, 0, b""), False),  # full, but empty
        (bytes([3, 1]), None, False),  # not even the three parameters
    ],
)
def test_parse_tlsa_rdata(rdata: bytes, record: TlsaRecord | None, usable: bool) -> None:
    parsed = parse_tlsa_rdata(rdata)
    assert parsed == record
    assert (parsed is not None and is_usable(parsed)) is usable


def test_a_tlsa_response_with_a_refused_record_is_kept_whole() -> None:
    wire = response_wire([SHORT, GOOD])
    query = dns.message.make_query(OWNER, "TLSA", want_dnssec=True)
    query.id = dns.message.from_wire(wire, question_only=True).id
    response = _lenient_response(wire, query, truncation=True)
    assert response is not None
    assert response.errors  # dnspython's refusal, recorded
    found, _ttl = _rdata_from_wire(OWNER, response)
    assert isinstance(found, _RRset)
    assert found.secure
    records = {parse_tlsa_rdata(r.data) for r in found.rdatas if hasattr(r, "data")}
    assert records == {parse_tlsa_rdata(SHORT), parse_tlsa_rdata(GOOD)}


def test_a_refused_record_in_another_answer_is_still_ignored() -> None:
    """Only TLSA is read leniently; for other questions dnspython's rule stays."""
    wire = response_wire([SHORT], qtype="A")
    query = dns.message.make_query(OWNER, "A")
    query.id = dns.message.from_wire(wire, question_only=True).id
    assert _lenient_response(wire, query, truncation=True) is None


def test_a_datagram_for_another_query_is_ignored() -> None:
    wire = response_wire([GOOD])
    query = dns.message.make_query(OWNER, "TLSA", want_dnssec=True)
    query.id = (dns.message.from_wire(wire, question_only=True).id + 1) % 65536
    assert _lenient_response(wire, query, truncation=True) is None
    assert _lenient_response(b"\x00garbage", query, truncation=True) is None
