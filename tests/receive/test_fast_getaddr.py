"""``RelaySMTP._getaddr`` takes plain ``<local@domain>`` as it is and leaves everything
else to aiosmtpd's parser: for every argument both must agree."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from mta.receive.server import _PLAIN_ANGLE_ADDR, RelaySMTP


def aiosmtpd_outcome(parser: SMTP, arg: str) -> object:
    """aiosmtpd's parse; where it crashes (``<``, ``1@[``), ours must say "bad syntax"."""
    try:
        return parser._getaddr(arg)
    except Exception:  # aiosmtpd's only: ours is called bare, and must not raise
        return None, None


def parsers(limit: int = 0) -> tuple[RelaySMTP, SMTP]:
    ours, theirs = RelaySMTP.__new__(RelaySMTP), SMTP.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = limit
    return ours, theirs


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.c>",
        "<a.b+c@d-e.f>  BODY=8BITMIME",
        "<a@b> SIZE=10",
        "<a@b> ",
        " <a@b>",
        "<>",
        '<"x y"@b>',
        "a@b",
        "<@x,@y:a@b>",
        "<a@b",
        "<a(c)@b>",
        "<a@b> (comment) SIZE=1",
        "<a@[1.2.3.4]>",
        "<a@b>x",
        "<a..b@c>",
        "<.a@b>",
        "<a@b>\tSIZE=1",
        "",
    ],
)
def test_agrees_with_aiosmtpd(arg: str) -> None:
    ours, theirs = parsers()
    assert ours._getaddr(arg) == aiosmtpd_outcome(theirs, arg)


@pytest.mark.parametrize("arg", ["<", " <", "< ", "1@[", "<1@[>"])
def test_input_that_crashes_the_email_parser_is_bad_syntax(arg: str) -> None:
    """aiosmtpd raises IndexError or AttributeError here: the client would get 451 and
    the log a traceback."""
    ours, _ = parsers()
    assert ours._getaddr(arg) == (None, None)


@pytest.mark.parametrize(
    ("arg", "parsed"),
    [
        ("<x@OURS.EXAMPLE.>", ("x@OURS.EXAMPLE", "")),
        ("<a@b.> SIZE=10", ("a@b", "SIZE=10")),
    ],
)
def test_a_final_dot_is_dropped(arg: str, parsed: tuple[str, str]) -> None:
    """Where aiosmtpd's parser refuses a fully qualified domain (issue 8: 501 even from
    trusted clients), ours takes the address without the dot."""
    ours, theirs = parsers()
    assert aiosmtpd_outcome(theirs, arg) == (None, None)
    assert ours._getaddr(arg) == parsed


def test_the_local_part_limit_still_applies() -> None:
    ours, theirs = parsers(limit=3)
    assert ours._getaddr("<abcd@b.c>") == theirs._getaddr("<abcd@b.c>") == (None, None)
    assert ours._getaddr("<abc@b.c>") == ("abc@b.c", "")


@given(st.text(alphabet='<>@. ab1-+"()[]:,\\\t=', max_size=24))
def test_agrees_with_aiosmtpd_on_any_argument(arg: str) -> None:
    """Except on a final dot, which aiosmtpd refuses: then as without the dot."""
    ours, theirs = parsers()
    theirs_arg = arg
    plain = _PLAIN_ANGLE_ADDR.match(arg)
    if plain is not None and arg[plain.end(1)] == ".":
        theirs_arg = arg[: plain.end(1)] + arg[plain.end(1) + 1 :]
    assert ours._getaddr(arg) == aiosmtpd_outcome(theirs, theirs_arg)
