"""Remote replies -> SmtpReply (the pure part of the session; the rest is in integration)."""

from __future__ import annotations

import pytest

from mta.deliver.session import MAX_REPLY_TEXT, reply_from
from mta.reply import SmtpReply


@pytest.mark.parametrize(
    ("code", "message", "reply"),
    [
        (250, "2.0.0 Ok: queued as ABC", SmtpReply(250, "2.0.0", "Ok: queued as ABC")),
        (
            550,
            "5.1.1 <bob@x.test>: no such user",
            SmtpReply(550, "5.1.1", "<bob@x.test>: no such user"),
        ),
        (550, "no such user", SmtpReply(550, "5.0.0", "no such user")),  # no RFC 2034 code
        (451, "5.1.1 mismatched class", SmtpReply(451, "4.0.0", "5.1.1 mismatched class")),
        (452, "4.5.3", SmtpReply(452, "4.5.3", "")),
        (
            554,
            "5.7.1 first line\n5.7.1 second line",
            SmtpReply(554, "5.7.1", "first line second line"),
        ),
        (421, "4.3.2 bye\x00\x1b[31m", SmtpReply(421, "4.3.2", "bye  [31m")),
        (250, "", SmtpReply(250, "2.0.0", "")),
    ],
)
def test_reply_from(code: int, message: str, reply: SmtpReply) -> None:
    assert reply_from(code, message) == reply


def test_long_replies_are_capped() -> None:
    reply = reply_from(550, "5.7.1 " + "x" * 5000)
    assert len(reply.text) == MAX_REPLY_TEXT
    assert reply.text.endswith("...")
