"""Message payloads: envelope + content round trip; malformed payloads are RecordErrors."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.model import Envelope
from mta.spool.envelope import (
    decode_message,
    decode_message_parts,
    encode_envelope,
    encode_message,
)
from mta.spool.record import RecordError

envelopes = st.builds(
    Envelope,
    mail_from=st.text(),
    rcpt_tos=st.lists(st.text(), max_size=5).map(tuple),
    received_at=st.floats(allow_nan=False, allow_infinity=False),
    client_address=st.text(),
    helo=st.text(),
    smtputf8=st.booleans(),
    body_8bit=st.booleans(),
    report=st.booleans(),
    requiretls=st.booleans(),
    crlf_only=st.booleans(),
    dot_free=st.booleans(),
)

ENVELOPE = Envelope("alice@example.org", ("bob@example.net",), 1_700_000_000.5, "192.0.2.1", "mx")


@settings(deadline=None)
@given(envelope=envelopes, content=st.binary())
def test_round_trip(envelope: Envelope, content: bytes) -> None:
    assert decode_message(encode_message(envelope, content)) == (envelope, content)


def test_integer_time_comes_back_as_float() -> None:
    envelope = Envelope("", ("x@example.net",), 1_700_000_000)
    decoded, _ = decode_message(encode_message(envelope, b""))
    assert decoded.received_at == 1_700_000_000.0
    assert isinstance(decoded.received_at, float)


def test_unicode_addresses_round_trip() -> None:
    envelope = Envelope("jörg@bücher.example", ("用户@例子.广告",), 1.0, smtputf8=True)
    assert decode_message(encode_message(envelope, b"body")) == (envelope, b"body")


def test_content_is_kept_byte_for_byte() -> None:
    content = b"Subject: x\r\n\r\n\x00\xff.\r\n"
    assert decode_message(encode_message(ENVELOPE, content))[1] == content


def payload_with(doc: object, content: bytes = b"") -> bytes:
    meta = json.dumps(doc).encode()
    return struct.pack(">I", len(meta)) + meta + content


def good_doc() -> dict[str, object]:
    meta = encode_message(ENVELOPE, b"")[4:]
    doc = json.loads(meta)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"v": 2}, "format"),
        ({"v": True}, "format"),
        ({"mail_from": 1}, "mail_from"),
        ({"rcpt_tos": "bob@example.net"}, "rcpt_tos"),
        ({"rcpt_tos": ["ok", 3]}, "rcpt_tos"),
        ({"received_at": "now"}, "received_at"),
        ({"received_at": True}, "received_at"),
        ({"received_at": 10**400}, "received_at"),
        ({"smtputf8": 1}, "smtputf8"),
        ({"report": 1}, "report"),
        ({"requiretls": "yes"}, "requiretls"),
        ({"crlf_only": 1}, "crlf_only"),
        ({"dot_free": "yes"}, "dot_free"),
        ({"unknown": 1}, "fields"),
    ],
)
def test_malformed_envelope(change: dict[str, object], problem: str) -> None:
    doc = {**good_doc(), **change}
    with pytest.raises(RecordError, match=problem):
        decode_message(payload_with(doc))


def test_a_report_envelope_round_trips_and_older_records_are_not_reports() -> None:
    report = Envelope("", ("tlsrpt@example.net",), 1.0, report=True)
    assert decode_message(encode_message(report, b"x")) == (report, b"x")
    assert "report" not in good_doc()  # records as they were before the flag existed
    decoded, _ = decode_message(payload_with(good_doc()))
    assert decoded.report is False


def test_the_requiretls_flag_is_sealed_and_older_records_lack_it() -> None:
    """RFC 8689: the sender's demand travels with the message through the spool."""
    demanding = Envelope("alice@example.org", ("bob@example.net",), 1.0, requiretls=True)
    meta = encode_message(demanding, b"x")[4:]
    assert json.loads(meta[: meta.index(b"}") + 1])["requiretls"] is True
    assert decode_message(encode_message(demanding, b"x")) == (demanding, b"x")
    assert "requiretls" not in good_doc()  # records as they were before the flag existed
    decoded, _ = decode_message(payload_with(good_doc()))
    assert decoded.requiretls is False


def test_the_wire_marks_are_sealed_and_older_records_lack_them() -> None:
    """Older records, whose content nobody marked, are scanned on delivery as before."""
    checked = Envelope("a@example.org", ("b@example.net",), 1.0, crlf_only=True, dot_free=True)
    assert decode_message(encode_message(checked, b"x\r\n")) == (checked, b"x\r\n")
    assert "crlf_only" not in good_doc()
    decoded, _ = decode_message(payload_with(good_doc()))
    assert (decoded.crlf_only, decoded.dot_free) == (False, False)


def test_missing_field() -> None:
    doc = good_doc()
    del doc["helo"]
    with pytest.raises(RecordError, match="fields"):
        decode_message(payload_with(doc))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x10{}",  # length beyond the payload
        b"\x00\x00\x00\x02[]",
        b"\x00\x00\x00\x03NaN",
        b"\x00\x00\x00\x051e999",
        b"\x00\x00\x00\x02\xff\xfe",
    ],
)
def test_malformed_payload(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode_message(payload)


def test_deeply_nested_json_is_a_record_error() -> None:
    meta = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecordError):
        decode_message(struct.pack(">I", len(meta)) + meta)


@settings(deadline=None)
@given(garbage=st.binary(max_size=300))
def test_garbage_raises_only_record_error(garbage: bytes) -> None:
    with contextlib.suppress(RecordError):  # anything else fails the test
        decode_message(garbage)


@given(cuts=st.lists(st.integers(0, 400), max_size=8), content=st.binary(max_size=200))
def test_decoding_parts_equals_decoding_the_whole(cuts: list[int], content: bytes) -> None:
    """The spool decodes a message from its opened chunks: cut anywhere, even inside
    the length or the JSON, they decode as the whole payload does."""
    payload = encode_envelope(ENVELOPE) + content
    assert payload == encode_message(ENVELOPE, content)
    points = sorted(min(c, len(payload)) for c in cuts)
    parts = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)], strict=True)]
    assert decode_message_parts(parts) == decode_message(payload) == (ENVELOPE, content)


@pytest.mark.parametrize("cut", [0, 2, 4, 20])
def test_short_parts_are_record_errors(cut: int) -> None:
    payload = encode_envelope(ENVELOPE)
    with pytest.raises(RecordError):
        decode_message_parts([payload[:cut]])
