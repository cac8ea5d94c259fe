"""Fuzzing the parsers of what SMTP clients send (mta/receive/addresses.py, handler.py).

Only ``AddressError`` may escape the path parsers, whatever the text; what they accept
is well-formed enough to be parsed again to the same path; a HELO name never breaks out
of the ``Received:`` line it is written into.
"""

from __future__ import annotations

import re
import string

from hypothesis import example, given
from hypothesis import strategies as st

from mta.crlf import has_bare_line_ending
from mta.receive.addresses import (
    MAX_PATH,
    AddressError,
    is_local,
    parse_path,
    path_argument,
    relay_tricks,
)
from mta.receive.handler import received_header

# Text shaped like a path: the characters the grammar cares about, and a few it does not.
_PATH_CHARS = string.ascii_letters + string.digits + '<>@:,."\\[]%!-_+ \t\r\n\x00\x7f' + "é"
path_like = st.text(alphabet=_PATH_CHARS, max_size=80)
any_text = st.text(max_size=300)


@given(st.one_of(path_like, any_text), st.booleans())
@example("<@a,@b,@c:user@example.com>", False)
@example('<"\\\\"@x>', False)
@example("<" + "a" * MAX_PATH + "@x>", False)
def test_parse_path_raises_only_address_error(text: str, allow_null: bool) -> None:
    try:
        path = parse_path(text, allow_null=allow_null)
    except AddressError:
        return
    relay_tricks(path)  # never raises either
    if path.is_null:
        assert allow_null
        return
    # What was accepted is a mailbox that parses again to the same one.
    again = parse_path(f"<{path.address}>")
    assert (again.local_part, again.domain) == (path.local_part, path.domain)
    assert "\r" not in path.address
    assert "\n" not in path.address
    assert path.domain == path.domain.lower()


@given(st.one_of(path_like, any_text), st.sampled_from(["FROM:", "TO:"]))
def test_path_argument_raises_only_address_error(text: str, keyword: str) -> None:
    try:
        path = path_argument(text, keyword)
    except AddressError:
        return
    assert len(path) <= len(text)


@given(st.text(max_size=60), st.lists(st.text(max_size=30), max_size=5))
def test_is_local_never_raises_and_never_matches_a_literal(
    domain: str, local_domains: list[str]
) -> None:
    local = is_local(domain, local_domains)
    if domain.lower().rstrip(".").startswith("["):
        assert not local
    assert not is_local(domain, ["*"])  # never an open relay


@given(st.binary(max_size=200))
def test_bare_line_ending_detection_agrees_with_a_plain_definition(data: bytes) -> None:
    normal = data.replace(b"\r\n", b"")
    assert has_bare_line_ending(data) == (b"\r" in normal or b"\n" in normal)


@given(helo=st.text(max_size=400), ip=st.sampled_from(["", "192.0.2.1", "2001:db8::1"]))
@example(helo="evil\r\nBcc: victim@example.com", ip="192.0.2.1")
def test_helo_cannot_inject_header_lines(helo: str, ip: str) -> None:
    header = received_header(
        helo=helo, ip=ip, hostname="mx.test", protocol="ESMTP", tls="(no TLS)", now=0.0
    )
    assert header.isascii()
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert len(lines) == 5  # Received: + three continuation lines, then the final CRLF
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", header.replace(b"\r\n", b""))
    assert all(len(line) <= 998 for line in lines)
