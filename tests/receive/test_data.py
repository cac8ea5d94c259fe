"""The chunked DATA reader agrees with aiosmtpd's line-by-line rules, however the
stream is cut into chunks (hypothesis), including smuggling-shaped input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.receive.data import DataStream, Refusal, has_long_line, header_section_end, refusal


def reference(stream: bytes, size_limit: int, line_limit: int = 1001) -> tuple[str, bytes, bytes]:
    """aiosmtpd's loop: read CRLF-terminated lines until a lone '.', then judge."""
    lines, rest, size = [], stream, 0
    state = "ok"
    while True:
        cut = rest.find(b"\r\n")
        assert cut >= 0, "streams in these tests always hold an end"
        line, rest = rest[: cut + 2], rest[cut + 2 :]
        if line == b".\r\n":
            break
        size += len(line)
        if state == "ok" and size_limit and size > size_limit:
            state = "too_big"
        if state == "ok" and len(line) > line_limit:
            state = "too_long"
        lines.append(line[1:] if line.startswith(b".") else line)
    return state, b"".join(lines) if state == "ok" else b"", rest


def run(stream: bytes, cuts: list[int], size_limit: int) -> tuple[str, bytes, bytes]:
    reader = DataStream(size_limit)
    start, unread = 0, b""
    for cut in [*sorted(set(cuts)), len(stream)]:
        if reader.feed(stream[start:cut]):
            unread = stream[cut:]  # still in the socket's buffer, as in the server
            break
        start = cut
    state = "too_big" if reader.too_big else "too_long" if reader.too_long else "ok"
    return state, reader.content, reader.leftover + unread


pieces = st.sampled_from(
    [b"a", b"hello", b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.", b"\n.\r\n", b"x" * 600]
)


@settings(max_examples=300)
@given(
    body=st.lists(pieces, max_size=30).map(b"".join),
    after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    size_limit=st.sampled_from([0, 50, 5000]),
)
def test_same_outcome_as_line_by_line(
    body: bytes, after: bytes, cuts: list[int], size_limit: int
) -> None:
    stream = body + (b"" if body.endswith(b"\r\n") or not body else b"\r\n") + b".\r\n" + after
    expected = reference(stream, size_limit)
    got = run(stream, [c for c in cuts if c < len(stream)], size_limit)
    if expected[0] == "ok":
        assert got == expected
    else:  # past a limit: the same verdict and the same leftover, nothing kept
        assert (got[0] in ("too_big", "too_long"), got[1], got[2]) == (True, b"", expected[2])


@given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.", b"x" * 600]), max_size=8))
def test_dot_free_says_whether_a_line_of_the_content_begins_with_a_dot(lines: list[bytes]) -> None:
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    reader = DataStream(0)
    assert reader.feed(stuffed + b".\r\n")
    content = bytes(reader.content)
    assert content == b"".join(line + b"\r\n" for line in lines)
    assert reader.dot_free == (not any(line.startswith(b".") for line in lines))


@pytest.mark.parametrize(
    ("stream", "content", "leftover"),
    [
        (b".\r\n", b"", b""),
        (b"..\r\n.\r\n", b".\r\n", b""),
        (b"a\n.\nb\r\n.\r\nQUIT\r\n", b"a\n.\nb\r\n", b"QUIT\r\n"),  # bare LF ends nothing
        (b"a\r\n.\nMAIL\r\n.\r\n", b"a\r\n\nMAIL\r\n", b""),
    ],
)
def test_examples(stream: bytes, content: bytes, leftover: bytes) -> None:
    reader = DataStream(0)
    assert reader.feed(stream)
    assert (reader.content, reader.leftover) == (content, leftover)


@pytest.mark.parametrize("first", [b"..first", b"first"])
def test_take_hands_the_buffer_over_and_keeps_no_copy(first: bytes) -> None:
    """The content is the buffer the data arrived in (the handler makes the one copy,
    with its ``Received:`` in front), dot-stuffed or not."""
    reader = DataStream(0)
    assert not reader.feed(first + b"\r\n" + b"x" * 998)
    assert reader.feed(b"\r\n.\r\nQUIT\r\n")
    held = reader.content
    body = reader.take()
    assert body is held  # handed over, not copied
    assert type(body) is bytearray
    assert body == first[-6:] + b"\r\n" + b"x" * 998 + b"\r\n"
    assert reader.content == b""
    assert reader.leftover == b"QUIT\r\n"


@given(
    data=st.lists(st.sampled_from([b"a", b"bb", b"\r\n", b"\r", b"\n", b"x" * 7]), max_size=40).map(
        b"".join
    ),
    limit=st.integers(min_value=2, max_value=12),
)
def test_has_long_line_is_the_longest_split_line(data: bytes, limit: int) -> None:
    """The jumping search agrees with splitting at every CRLF and measuring each line."""
    longest = max(len(line) for line in data.split(b"\r\n")) + 2
    assert has_long_line(data, limit) == (longest > limit)


# --- refusal: NUL, header limits, hops (the header section only) ---

LIMITS = {"header_size": 100, "header_section_size": 1000, "hop_count": 5}


@pytest.mark.parametrize(
    ("body", "end"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", 12),
        (b"A: 1\r\n folded\r\n\tagain\r\n\r\nbody\r\n", 23),
        (b"A: 1\r\nnot a field\r\n", 6),  # a body that starts without an empty line
        (b"body first\r\nA: 1\r\n", 0),
        (b"\r\nA: 1\r\n", 0),
        (b" A: 1\r\n", 0),  # a continuation of nothing
        (b"A : 1\r\nB:2\r\n", 12),  # obsolete space before the colon; no body at all
        (b"", 0),
    ],
)
def test_header_section_end(body: bytes, end: int) -> None:
    assert header_section_end(body) == end


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"Subject: x\r\n\r\nbody\r\n", None),
        (b"Subject: x\r\n\r\n\x00.\r\nMAIL FROM:<a@b>\r\n", Refusal.NUL),
        (b"Subject: \x00\r\n\r\n", Refusal.NUL),
        (b"Received: a\r\n" * 3 + b"\r\nbody\r\n", None),  # 4 with ours
        (b"Received: a\r\n" * 4 + b"\r\nbody\r\n", Refusal.TOO_MANY_HOPS),
        (b"received : a\r\nDELIVERED-TO: b\r\n" * 2 + b"\r\n", Refusal.TOO_MANY_HOPS),
        (b"Received-SPF: a\r\nX-Received: b\r\n" * 4 + b"\r\n", None),  # other fields
        (b"Subject: x\r\n\r\n" + b"Received: a\r\n" * 9, None),  # the body is not read
        (b"Subject: " + b"x" * 91 + b"\r\n\r\n", None),  # 100 octets
        (b"Subject: " + b"x" * 92 + b"\r\n\r\n", Refusal.HEADER_TOO_BIG),
        (b"Subject: " + b"x" * 50 + b"\r\n " + b"x" * 50 + b"\r\n\r\n", Refusal.HEADER_TOO_BIG),
        (b"A: " + b"x" * 90 + b"\r\n" + b"B: " + b"x" * 90 + b"\r\n\r\n", None),
        (b"A: b\r\n" * 166 + b"\r\n", None),  # 996 octets
        (b"A: b\r\n" * 167 + b"\r\n", Refusal.HEADER_TOO_BIG),
        (b"Body only, no header, " + b"x" * 2000 + b"\r\n", None),
    ],
)
def test_refusal(body: bytes, why: Refusal | None) -> None:
    assert refusal(body, **LIMITS) is why
