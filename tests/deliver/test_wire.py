"""``data_payload_parts`` send exactly what aiosmtplib's DATA would have sent."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mta.deliver.wire import data_payload_parts


def data_payload(content: bytes) -> bytes:
    return b"".join(data_payload_parts(content))


def aiosmtplib_payload(content: bytes) -> bytes:
    """What ``SMTPProtocol.execute_data_command`` writes after ``DATA``."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"", b"\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.b\r\n..\r\n", b"a\r\n..b\r\n...\r\n.\r\n"),
        (b"no end", b"no end\r\n.\r\n"),
        (b"bare\nlf\r\n.x\rcr", b"bare\r\nlf\r\n..x\r\ncr\r\n.\r\n"),
    ],
)
def test_examples(content: bytes, wire: bytes) -> None:
    assert data_payload(content) == wire == aiosmtplib_payload(content)


@given(st.binary(max_size=64) | st.lists(st.sampled_from([b"\r", b"\n", b".", b"a"])).map(b"".join))
def test_agrees_with_aiosmtplib(content: bytes) -> None:
    assert data_payload(content) == aiosmtplib_payload(content)


def test_a_message_that_needs_no_change_is_sent_as_itself_not_copied() -> None:
    content = b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n"
    body, end = data_payload_parts(content)
    assert body is content
    assert end == b".\r\n"


crlf_lines = st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.b"])).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)
)


@given(crlf_lines)
def test_content_known_to_be_crlf_only_is_sent_the_same_without_the_scan(content: bytes) -> None:
    assert b"".join(data_payload_parts(content, crlf_only=True)) == data_payload(content)


def test_content_known_to_be_crlf_only_is_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    def scanned(data: bytes) -> bool:
        raise AssertionError("scanned for bare line endings")

    monkeypatch.setattr("mta.deliver.wire.has_bare_line_ending", scanned)
    assert data_payload_parts(b"a\r\n", crlf_only=True) == (b"a\r\n", b".\r\n")
    with pytest.raises(AssertionError, match="scanned"):
        data_payload_parts(b"a\r\n")


@given(crlf_lines.filter(lambda content: not content.startswith(b".") and b"\r\n." not in content))
def test_dot_free_content_is_sent_as_itself(content: bytes) -> None:
    body, end = data_payload_parts(content, crlf_only=True, dot_free=True)
    assert body is content
    assert body + end == data_payload(content)


def test_dot_free_means_nothing_once_bare_line_endings_were_mended() -> None:
    assert data_payload_parts(b"a\n.b\r\n", dot_free=True) == (b"a\r\n..b\r\n", b".\r\n")
