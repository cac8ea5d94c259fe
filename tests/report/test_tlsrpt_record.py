"""RFC 8460 §3: the ``_smtp._tls`` TXT record, strictly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.report.tlsrpt_record import TlsRptRecord, parse_tlsrpt_txt


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # §3.1's examples
        (["v=TLSRPTv1;rua=mailto:reports@example.com"], TlsRptRecord(("reports@example.com",), ())),
        (
            ["v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt"],
            TlsRptRecord((), ("https://reporting.example.com/v1/tlsrpt",)),
        ),
        (
            ["v=TLSRPTv1; rua=mailto:a@example.com , https://r.example.com/x;"],
            TlsRptRecord(("a@example.com",), ("https://r.example.com/x",)),
        ),
        # other TXT records beside it are discarded; extensions are allowed
        (
            ["google-site-verification=abc", "v=TLSRPTv1; rua=mailto:a@example.com; ext=1"],
            TlsRptRecord(("a@example.com",), ()),
        ),
        (["v=TLSRPTv1 ; rua=mailto:a%40b@example.com"], None),  # a mailbox with two @
        (
            ["v=TLSRPTv1;rua=mailto:tls%2Brpt@example.com"],
            TlsRptRecord(("tls+rpt@example.com",), ()),
        ),
    ],
)
def test_valid_records(records: list[str], expected: TlsRptRecord | None) -> None:
    assert parse_tlsrpt_txt(records) == expected


@pytest.mark.parametrize(
    "records",
    [
        [],  # no record
        ["v=STSv1; id=1"],  # another protocol's record
        ["v=TLSRPTv1; rua=mailto:a@example.com", "v=TLSRPTv1; rua=mailto:b@example.com"],  # two
        ["v=TLSRPTv1"],  # no field
        ["v=TLSRPTv1;"],  # no rua
        ["v=TLSRPTv2; rua=mailto:a@example.com"],  # unknown version
        ["V=TLSRPTv1; rua=mailto:a@example.com"],  # %s: case-sensitive
        ["v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com"],  # rua twice
        ["v=TLSRPTv1; rua=http://r.example.com/x"],  # only https
        ["v=TLSRPTv1; rua=ftp://r.example.com/x"],
        ["v=TLSRPTv1; rua=mailto:a@example.com,"],  # empty URI
        ["v=TLSRPTv1; rua=mailto:not-an-address"],
        ["v=TLSRPTv1; rua=mailto:a@example.com?subject=x"],
        ["v=TLSRPTv1; rua=https://"],  # no host
        ["v=TLSRPTv1; rua=mailto:a@example.com; bad field"],  # not an extension
        ["v=TLSRPTv1; rua=mailto:a@example.com rua=x"],  # missing delimiter
    ],
)
def test_anything_else_means_no_reporting(records: list[str]) -> None:
    assert parse_tlsrpt_txt(records) is None


@given(st.lists(st.text(max_size=80), max_size=4))
def test_never_raises_and_only_returns_usable_destinations(records: list[str]) -> None:
    record = parse_tlsrpt_txt(records)
    if record is not None:
        assert record.mailto or record.https
        assert all("@" in address for address in record.mailto)
        assert all(url.lower().startswith("https://") for url in record.https)
