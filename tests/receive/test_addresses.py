"""RFC 5321 path parsing and relay-trick detection (mta/receive/addresses.py)."""

from __future__ import annotations

import pytest

from mta.receive.addresses import (
    AddressError,
    MailPath,
    is_bare_postmaster,
    is_local,
    parse_path,
    path_argument,
    quote_local_part,
    relay_tricks,
)


@pytest.mark.parametrize(
    ("text", "address", "domain"),
    [
        ("<user@example.com>", "user@example.com", "example.com"),
        ("user@example.com", "user@example.com", "example.com"),
        ("<User.Name+tag@Example.COM>", "User.Name+tag@example.com", "example.com"),
        ("<user@example.com.>", "user@example.com", "example.com"),
        ('<"john doe"@example.com>', '"john doe"@example.com', "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com', "example.com"),
        ('<"plain"@example.com>', "plain@example.com", "example.com"),
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]", "[192.0.2.1]"),
        ("<user@[IPv6:2001:DB8::1]>", "user@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("<@relay.example:user@example.com>", "user@example.com", "example.com"),
    ],
)
def test_parse_valid(text: str, address: str, domain: str) -> None:
    path = parse_path(text)
    assert path.address == address
    assert path.domain == domain


@pytest.mark.parametrize(
    "text",
    [
        "<user>",
        "<user@>",
        "<@example.com>",
        "<a@b@example.com>",
        "<.user@example.com>",
        "<us..er@example.com>",
        "<user.@example.com>",
        "<user@-example.com>",
        "<user@exa_mple.com>",
        "<user@example..com>",
        "<user@[300.1.1.1]>",
        "<user@[IPv6:zz::1]>",
        '<"unterminated@example.com>',
        '<"bad\x01char"@example.com>',
        "<user@example.com",
        "user@example.com>",
        "<@relay.example user@example.com>",
        "<relay.example:user@example.com>",
        "<us er@example.com>",
        "<usér@example.com>",
        "<" + "a" * 250 + "@example.com>",
        "<user@" + "a" * 64 + ".com>",
        "<>",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_null_path_only_where_allowed() -> None:
    null = parse_path("<>", allow_null=True)
    assert null.is_null
    assert null.address == ""
    assert not parse_path('<""@example.com>').is_null


def test_source_route_is_kept_for_inspection() -> None:
    path = parse_path("<@a.example,@b.example:user@c.example>")
    assert path.route == ("a.example", "b.example")
    assert path.domain == "c.example"


@pytest.mark.parametrize(
    ("text", "tricks"),
    [
        ("<user@local.test>", ()),
        ("<first.last+tag@local.test>", ()),
        ("<user%other.example@local.test>", ("percent-hack",)),
        ("<other.example!user@local.test>", ("bang-path",)),
        ("<@other.example:user@local.test>", ("source-route",)),
        ('<"user@other.example"@local.test>', ("quoted-at",)),
        ('<"user%other.example"@local.test>', ("percent-hack",)),
        ('<"other!user"@local.test>', ("bang-path",)),
        ('<"a b"@local.test>', ()),
    ],
)
def test_relay_tricks(text: str, tricks: tuple[str, ...]) -> None:
    assert relay_tricks(parse_path(text)) == tricks


@pytest.mark.parametrize(
    ("domain", "local_domains", "expected"),
    [
        ("local.test", ("local.test",), True),
        ("LOCAL.test.", ("local.test",), True),
        ("sub.local.test", ("local.test",), False),
        ("sub.local.test", (".local.test",), True),
        ("local.test", (".local.test",), False),
        ("evillocal.test", (".local.test",), False),
        ("other.test", ("local.test",), False),
        ("anything.test", ("*",), False),
        ("[192.0.2.1]", ("local.test",), False),
        ("", ("local.test",), False),
        ("local.test", (), False),
    ],
)
def test_is_local(domain: str, local_domains: tuple[str, ...], expected: bool) -> None:
    assert is_local(domain, local_domains) is expected


@pytest.mark.parametrize(
    ("argument", "keyword", "path"),
    [
        ("TO:<a@b.test>", "TO:", "<a@b.test>"),
        ("to: <a@b.test> NOTIFY=NEVER", "TO:", "<a@b.test>"),
        ('TO:<"x>y"@b.test> X=1', "TO:", '<"x>y"@b.test>'),
        ('TO:<"x\\">y"@b.test>', "TO:", '<"x\\">y"@b.test>'),
        ("FROM:<> BODY=8BITMIME", "FROM:", "<>"),
        ("TO:a@b.test SIZE=1", "TO:", "a@b.test"),
        ("TO:<@r.test:a@b.test>", "TO:", "<@r.test:a@b.test>"),
    ],
)
def test_path_argument(argument: str, keyword: str, path: str) -> None:
    assert path_argument(argument, keyword) == path


@pytest.mark.parametrize("argument", ["FROM:<a@b.test>", "TO:<a@b.test", 'TO:<"a>'])
def test_path_argument_invalid(argument: str) -> None:
    with pytest.raises(AddressError):
        path_argument(argument, "TO:")


@pytest.mark.parametrize(
    ("local", "quoted"),
    [("plain", "plain"), ("a.b", "a.b"), ("a b", '"a b"'), ('a"b', '"a\\"b"'), ("a..b", '"a..b"')],
)
def test_quote_local_part(local: str, quoted: str) -> None:
    assert quote_local_part(local) == quoted
    assert parse_path(f"<{quoted}@x.test>") == MailPath(local, "x.test", (), quoted != local)


@pytest.mark.parametrize(
    ("text", "bare"),
    [
        ("<postmaster>", True),
        ("<PostMaster>", True),
        ("postmaster", True),
        ("<postmaster@ours.example>", False),
        ('<"postmaster">', False),
        ("<postmasters>", False),
    ],
)
def test_is_bare_postmaster(text: str, bare: bool) -> None:
    assert is_bare_postmaster(text) is bare
