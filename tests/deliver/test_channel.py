"""``channel.split_reply``: replies taken one at a time off the front of a buffer, as
pipelined replies arrive (several in one read, or one split over reads). Pure."""

from __future__ import annotations

import aiosmtplib
import pytest

from mta.deliver.channel import MAX_REPLY, MAX_UNREAD, Channel, split_reply


def test_replies_in_one_read_come_out_one_at_a_time() -> None:
    buffer = bytearray(b"250 2.1.0 Ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n354 go\r\n")
    got = [split_reply(buffer) for _ in range(3)]
    assert [(r.code, r.message) for r in got if r is not None] == [
        (250, "2.1.0 Ok"),
        (550, "5.1.1 no\n5.1.1 such user"),
        (354, "go"),
    ]
    assert buffer == b""
    assert split_reply(buffer) is None


@pytest.mark.parametrize("partial", [b"250 2.1.0 O", b"250-first\r\n", b"250-first\r\n250 la"])
def test_a_reply_not_all_here_waits_and_is_left_untouched(partial: bytes) -> None:
    buffer = bytearray(partial)
    assert split_reply(buffer) is None
    assert buffer == partial


def test_a_bare_code_line_is_a_reply() -> None:
    reply = split_reply(bytearray(b"250\r\n"))
    assert reply is not None
    assert (reply.code, reply.message) == (250, "")


@pytest.mark.parametrize("junk", [b"hello\r\n", b"25 short\r\n", b"250x\r\n"])
def test_a_line_without_a_code_is_an_error(junk: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException):
        split_reply(bytearray(junk))


def test_an_endless_reply_is_an_error() -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException):
        split_reply(bytearray(b"250-" + b"x" * MAX_REPLY))


class _Transport:
    """Just enough of a transport to see whether the channel dropped it."""

    aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_a_flood_of_unread_bytes_drops_the_connection() -> None:
    transport = _Transport()
    channel = Channel(transport, None, 1.0)  # type: ignore[arg-type]
    channel.data_received(b"250 ok\r\n" * (MAX_UNREAD // 8))
    assert not transport.aborted
    channel.data_received(b"250 ok\r\n")
    assert transport.aborted
