"""The socketmap codec without sockets: netstrings fed in fragments, typed errors."""

from __future__ import annotations

import pytest

from mta.postfix.socketmap import (
    MAX_REPLY,
    BadLength,
    BadRequest,
    BadTerminator,
    NetstringReader,
    ParseError,
    Reply,
    Request,
    TooLong,
    encode,
    parse_request,
)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(data[at : at + size])
        at += size
    return [*out, data[at:]]


def read_all(chunks: list[bytes], max_length: int = 1024) -> list[bytes]:
    reader = NetstringReader(max_length)
    found: list[bytes] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (payload := reader.next_payload()) is not None:
            found.append(payload)
    return found


STREAM = b"15:mta example.com,0:,3:a b,"


@pytest.mark.parametrize(
    "sizes",
    [[], [1], [2], [3], [15], [16], [17], [1] * 27, [5, 5, 5, 5], [20, 1, 1]],
)
def test_fragments_give_the_same_payloads(sizes: list[int]) -> None:
    assert read_all(split(STREAM, sizes)) == [b"mta example.com", b"", b"a b"]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"x:abc,", BadLength),
        (b":abc,", BadLength),
        (b"01:a,", BadLength),
        (b"-1:a,", BadLength),
        (b" 3:abc,", BadLength),
        (b"3:abc;", BadTerminator),
        (b"3:abcd,", BadTerminator),
        (b"1025:", TooLong),
        (b"99999", TooLong),  # more digits than any allowed length: no colon needed
        (b"100000000000000000000:", TooLong),
    ],
)
def test_malformed_streams_raise_typed_errors(data: bytes, error: type[ParseError]) -> None:
    reader = NetstringReader(1024)
    reader.feed(data)
    with pytest.raises(error):
        reader.next_payload()
    with pytest.raises(error):  # stays broken: the stream cannot be re-synchronised
        reader.next_payload()


def test_a_too_long_request_is_refused_before_its_payload_arrives() -> None:
    reader = NetstringReader(16)
    reader.feed(b"17:")
    with pytest.raises(TooLong):
        reader.next_payload()


def test_incomplete_input_needs_more_data() -> None:
    for partial in (b"", b"1", b"15", b"15:", b"15:mta example.co", b"15:mta example.com"):
        reader = NetstringReader()
        reader.feed(partial)
        assert reader.next_payload() is None


@pytest.mark.parametrize(
    ("payload", "request_"),
    [
        (b"mta example.com", Request("mta", "example.com")),
        (b"mta [mx.example]:25", Request("mta", "[mx.example]:25")),
        (b"m k with space", Request("m", "k with space")),
    ],
)
def test_requests(payload: bytes, request_: Request) -> None:
    assert parse_request(payload) == request_


@pytest.mark.parametrize("payload", [b"", b"mta", b" example.com", b"mta ", b"mta a\nb", b"\xff x"])
def test_bad_requests(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(payload)


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply.ok("dane-only"), b"12:OK dane-only,"),
        (Reply.notfound(), b"9:NOTFOUND ,"),
        (Reply.temp("a\nb"), b"8:TEMP a b,"),
        (Reply.perm("unknown map"), b"16:PERM unknown map,"),
    ],
)
def test_replies_on_the_wire(reply: Reply, wire: bytes) -> None:
    assert encode(reply.payload()) == wire
    assert read_all([wire]) == [reply.payload()]


def test_a_reply_postfix_would_refuse_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode(b"x" * (MAX_REPLY + 1))
