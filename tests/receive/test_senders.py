"""Which senders a logged-in user may use (mta/receive/senders.py), the config tables that
grant them, and the pure pieces of the handler around them (issue 8 §6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import parse_text
from mta.errors import ConfigError
from mta.receive.addresses import AddressError, parse_path
from mta.receive.handler import postmaster_address, received_header, sender_not_owned
from mta.receive.senders import SenderLogin, SenderLogins, login_address, parse_grant

LOGINS = SenderLogins(
    [
        SenderLogin("alice", ("alice@ours.example", "@shop.example")),
        SenderLogin("bob@ours.example", ("sales@ours.example",)),
    ]
)


@pytest.mark.parametrize(
    ("user", "sender", "allowed"),
    [
        ("alice", "<alice@ours.example>", True),
        ("alice", "<Alice@OURS.example.>", True),  # case and a final dot do not matter
        ("alice", "<ceo@ours.example>", False),
        ("alice", "<anyone@shop.example>", True),  # a domain grant
        ("alice", "<x@sub.shop.example>", False),  # ...is that domain only
        ("alice", "<alice@ours.example.evil>", False),
        ("alice", "<>", True),  # the null sender, as Postfix allows
        ("bob@ours.example", "<bob@ours.example>", True),  # the login is an address
        ("bob@ours.example", "<BOB@ours.example>", True),
        ("bob@ours.example", "<sales@ours.example>", True),  # ...plus its grants
        ("bob@ours.example", "<alice@ours.example>", False),
        ("carol@ours.example", "<carol@ours.example>", True),  # no table: itself only
        ("carol@ours.example", "<carol2@ours.example>", False),
        ("carol", "<carol@ours.example>", False),  # not an address, no table: nothing
        ("carol", "<>", True),
        ("", "<a@ours.example>", False),  # an authenticator that kept no name
        ('"a b"@ours.example', '<"A B"@ours.example>', True),
    ],
)
def test_allows(user: str, sender: str, allowed: bool) -> None:
    assert LOGINS.allows(user, parse_path(sender, allow_null=True)) is allowed


@pytest.mark.parametrize(
    ("text", "grant"),
    [
        ("ops@Example.COM.", "ops@example.com"),
        ("<ops@example.com>", "ops@example.com"),
        ("@Example.com", "@example.com"),
        ("@[192.0.2.1]", "@[192.0.2.1]"),
    ],
)
def test_parse_grant(text: str, grant: str) -> None:
    assert parse_grant(text) == grant


@pytest.mark.parametrize("text", ["", "@", "alice", "@-bad.example", "a@", "@a:b@c.example"])
def test_parse_grant_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_grant(text)


@pytest.mark.parametrize(
    ("user", "address"),
    [
        ("alice", None),
        ("@ours.example", None),
        ("a@@b", None),
        ("Al@Ours.Example", "al@ours.example"),
    ],
)
def test_login_address(user: str, address: str | None) -> None:
    assert login_address(user) == address


def test_mismatch_reply_has_postfix_wording() -> None:
    reply = sender_not_owned(parse_path("<ceo@ours.example>"), "alice")
    assert str(reply) == (
        "553 5.7.1 <ceo@ours.example>: Sender address rejected: not owned by user alice"
    )
    # a name the client cannot use to break the reply or a header comment
    assert "\r" not in str(sender_not_owned(parse_path("<a@b.example>"), "x\r\n250 ok"))


def test_received_names_the_user_and_nothing_else() -> None:
    def header(user: str | None) -> bytes:
        return received_header(
            helo="client.test",
            ip="127.0.0.1",
            hostname="mx.test",
            protocol="ESMTPSA",
            tls="(no TLS)",
            now=0.0,
            user=user,
        )

    assert header("alice") == (
        b"Received: from client.test ([127.0.0.1])\r\n\t(no TLS)\r\n"
        b"\t(Authenticated sender: alice)\r\n"
        b"\tby mx.test (mta) with ESMTPSA;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
    )
    assert b"Authenticated" not in header(None)
    assert b"(Authenticated sender: a?b??)\r\n" in header("a(b)\n")


@pytest.mark.parametrize(
    ("configured", "hostname", "address"),
    [
        ("", "mx.ours.example", "postmaster@mx.ours.example"),
        ("", "MX.Ours.Example.", "postmaster@mx.ours.example"),
        ("", "127.0.0.1", "postmaster@[127.0.0.1]"),
        ("", "::1", "postmaster@[IPv6:::1]"),
        ("hostmaster@ours.example", "mx.ours.example", "hostmaster@ours.example"),
    ],
)
def test_postmaster_address(configured: str, hostname: str, address: str) -> None:
    assert postmaster_address(configured, hostname) == address
    parse_path(address)  # what RCPT then parses


# --- the config keys ---


def test_sender_login_tables(tmp_path: Path) -> None:
    config = parse_text(
        'postmaster = "Admin@Ours.Example."\n'
        '[[sender_login]]\nuser = "alice"\nsenders = ["ceo@Ours.Example", "@shop.example."]\n'
        '[[sender_login]]\nuser = "bob@ours.example"\n',
        "test.toml",
        tmp_path,
    )
    assert config.postmaster == "Admin@ours.example"
    assert config.sender_logins == (
        SenderLogin("alice", ("ceo@ours.example", "@shop.example")),
        SenderLogin("bob@ours.example", ()),
    )
    assert parse_text("", "test.toml", tmp_path).postmaster == ""


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[sender_login]]\nsenders = []", "test.toml: sender_login[0].user: required"),
        (
            '[[sender_login]]\nuser = "a b"',
            "test.toml: sender_login[0].user: expected a user name",
        ),
        (
            '[[sender_login]]\nuser = "a"\n[[sender_login]]\nuser = "a"',
            "test.toml: sender_login[1].user: 'a' already has",
        ),
        (
            '[[sender_login]]\nuser = "a"\nsenders = ["nobody"]',
            "test.toml: sender_login[0].senders: expected an address or @domain",
        ),
        ('[[sender_login]]\nuser = "a"\nsender = []', "test.toml: sender_login[0].sender: unknown"),
        ('postmaster = "postmaster"', "test.toml: postmaster: expected an address"),
        ('postmaster = "<@a.example:b@c.example>"', "test.toml: postmaster: expected an address"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "test.toml", tmp_path)
    assert str(caught.value).startswith(error)
