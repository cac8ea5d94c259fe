"""Pieces of the listener that need no socket: the command-line reader, command limits,
and how aiosmtpd's stock replies are reworded (mta/receive/server.py)."""

from __future__ import annotations

import asyncio

import pytest

from mta.receive.handler import RelayHandler
from mta.receive.server import (
    BareLineEnding,
    NulInCommand,
    RelaySMTP,
    _CommandLineReader,
    _CommandSizeLimits,
    enhance,
)

LIMIT = 1001  # aiosmtpd's line_length_limit


def lines(data: bytes, *, separator: bytes = b"\n", chunks: int = 1) -> list[bytes]:
    """Feed ``data`` (in ``chunks`` pieces) and read lines as aiosmtpd does."""

    async def read() -> list[bytes]:
        reader = _CommandLineReader(limit=LIMIT)
        size = -(-len(data) // chunks)
        for start in range(0, len(data), size):
            reader.feed_data(data[start : start + size])
        reader.feed_eof()
        out = []
        while True:
            try:
                out.append(await reader.readuntil(separator))
            except asyncio.IncompleteReadError:
                return out

    return asyncio.run(read())


def test_crlf_command_lines_pass() -> None:
    assert lines(b"EHLO a\r\nNOOP\r\n") == [b"EHLO a\r\n", b"NOOP\r\n"]


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"EHLO a\n", "<LF>"),
        (b"NOOP\r\nEHLO a\n", "<LF>"),
        (b"MAIL FROM:<a@b>\rRCPT TO:<c@d>\r\n", "<CR>"),
        (b"NOOP\r\r\n", "<CR>"),
    ],
)
def test_bare_line_endings_in_command_lines_raise(data: bytes, what: str) -> None:
    with pytest.raises(BareLineEnding) as caught:
        lines(data)
    assert caught.value.what == what


def test_data_lines_are_not_checked() -> None:
    """DATA reads with CRLF as separator; bare LF there is the handler's to refuse."""
    assert lines(b"a\nb\r\n.\r\n", separator=b"\r\n") == [b"a\nb\r\n", b".\r\n"]


def test_a_crlf_split_while_draining_a_too_long_line_is_not_bare() -> None:
    async def drain() -> bytes:
        reader = _CommandLineReader(limit=LIMIT)
        reader.feed_data(b"x" * 1200 + b"\r")
        with pytest.raises(asyncio.LimitOverrunError) as caught:
            await reader.readuntil()
        assert (await reader.read(caught.value.consumed)).endswith(b"\r")
        reader.feed_data(b"\nNOOP\r\n")
        assert await reader.readuntil() == b"\n"
        return await reader.readuntil()

    assert asyncio.run(drain()) == b"NOOP\r\n"


def test_command_size_limits_ignore_aiosmtpds_writes() -> None:
    limits = _CommandSizeLimits()
    for _ in range(5):
        limits["MAIL"] += 26  # what aiosmtpd does on every EHLO
    limits.clear()  # ...and on every new session
    assert (limits["MAIL"], limits["RCPT"], limits["NOOP"]) == (549, 512, 512)


@pytest.mark.parametrize(
    ("stock", "ours"),
    [
        ("500 Command line too long", "500 5.5.2 Command line too long"),
        (
            "500 Line too long (see RFC5321 4.5.3.1.6)",
            "500 5.5.2 Line too long (1000 octets at most)",
        ),
        ("552 Error: Too much mail data", "552 5.3.4 Message size exceeds fixed limit"),
        ("421 4.7.0 MAIL sent too many times", "421 4.7.0 MAIL sent too many times"),
        ("250 mx.test", "250 mx.test"),
    ],
)
def test_stock_replies_get_enhanced_codes(stock: str, ours: str) -> None:
    assert enhance(stock, hostname="mx.test") == ours


@pytest.mark.parametrize(
    ("cls", "prefixes"),
    [(RelaySMTP, ("smtp_", "auth_")), (RelayHandler, ("handle_", "auth_"))],
)
def test_dir_lists_every_method_aiosmtpd_looks_up(cls: type, prefixes: tuple[str, ...]) -> None:
    """aiosmtpd finds commands, hooks and AUTH mechanisms by ``dir()``: the short
    listing must hold every one of them (and nothing else, or it would not be short)."""
    instance = cls.__new__(cls)
    everything = object.__dir__(instance)
    assert sorted(dir(instance)) == sorted(n for n in everything if n.startswith(prefixes))
    assert any(name.startswith(prefixes[0]) for name in dir(instance))


@pytest.mark.parametrize("data", [b"NOOP\x00\r\n", b"MAIL FROM:<a@b>\x00x\r\n", b"\x00\r\n"])
def test_nul_in_command_lines_raises(data: bytes) -> None:
    with pytest.raises(NulInCommand) as caught:
        lines(data)
    assert caught.value.said == "<NUL>"
