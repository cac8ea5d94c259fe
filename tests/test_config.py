"""Policy file validation: defaults, one-line errors naming file and key, parsers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta import config
from mta.errors import ConfigError
from mta.model import TlsLevel

ROOT = Path(__file__).parent.parent
HOME = Path("/data")


def parse(text: str) -> config.Config:
    return config.parse_text(text, "test.toml", HOME)


def test_embedded_default_is_the_shipped_policy_file() -> None:
    assert config.default_policy_text() == (ROOT / "policies" / "relay.toml").read_text()


def test_default_policy_values() -> None:
    cfg = config.load_default(HOME)
    (listener,) = cfg.listeners
    assert (listener.address, listener.port, listener.mode) == ("127.0.0.1", 2525, "relay")
    assert cfg.spool.path == HOME / "spool"
    assert cfg.spool.key_file == HOME / "keys" / "spool.key"
    assert cfg.spool.max_age == 5 * 86400
    assert cfg.outbound.default_level is TlsLevel.ENCRYPT
    assert cfg.outbound.port == 25
    assert cfg.routes == ()


def test_every_shipped_policy_validates() -> None:
    for path in (ROOT / "policies").glob("*.toml"):
        config.load(path, HOME)


def test_empty_file_gives_defaults() -> None:
    assert parse("") == config.validate({}, "test.toml", HOME)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "test.toml: colour: unknown key"),
        ("[spool]\nmax_age = 5", "test.toml: spool.max_age: expected a string, got 5"),
        ('[spool]\nmax_age = "5 fortnights"', "test.toml: spool.max_age: expected a duration"),
        (
            '[outbound]\ndefault_level = "dane-only"',
            "test.toml: outbound.default_level: expected one of",
        ),
        ("[outbound]\nport = 0", "test.toml: outbound.port: expected a port"),
        (
            "[outbound]\nmax_connections = 0",
            "test.toml: outbound.max_connections: expected a positive",
        ),
        (
            '[outbound]\nretry_min = "2h"\nretry_max = "1h"',
            "test.toml: outbound.retry_max: must not be",
        ),
        ('[[listener]]\nmode = "lmtp"', "test.toml: listener[0].mode: expected one of"),
        ('[[listener]]\naddress = "localhost"', "test.toml: listener[0].address: expected an IP"),
        (
            '[[listener]]\ntls_cert = "a.pem"',
            "test.toml: listener[0].tls_key: tls_cert and tls_key",
        ),
        ('[[listener]]\nmode = "submission"', "test.toml: auth.password_file: required"),
        (
            '[relay]\nnetworks = ["10.0.0.0/33"]',
            "test.toml: relay.networks: expected an IP network",
        ),
        ("[relay]\nnetworks = [1]", "test.toml: relay.networks: expected a list of strings"),
        ('[[route]]\ndomain = "x.test"', "test.toml: route[0].nexthop: required"),
        (
            '[[route]]\ndomain = "x.test"\nnexthop = "[::1"',
            "test.toml: route[0].nexthop: expected [host]",
        ),
        ('[dns]\nresolvers = ["ns.example"]', "test.toml: dns.resolvers: expected an IP address"),
        ('[limits]\nmessage_size = "big"', "test.toml: limits.message_size: expected a size"),
        ('[log]\nlevel = "LOUD"', "test.toml: log.level: expected DEBUG"),
        ("[spool", "test.toml: (syntax):"),
        ("[[listener]]\nport = true", "test.toml: listener[0].port: expected an integer, got True"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "host", "port", "mx"),
    [
        ("mail.example.net", "mail.example.net", None, True),
        ("mail.example.net:2525", "mail.example.net", 2525, True),
        ("[mail.example.net]", "mail.example.net", None, False),
        ("[mail.example.net]:587", "mail.example.net", 587, False),
        ("127.0.0.5:2526", "127.0.0.5", 2526, False),
        ("[127.0.0.5]:2526", "127.0.0.5", 2526, False),
        ("[::1]:25", "::1", 25, False),
        ("::1", "::1", None, False),
    ],
)
def test_parse_nexthop(text: str, host: str, port: int | None, mx: bool) -> None:
    assert config.parse_nexthop(text) == config.Nexthop(host, port, mx)


@pytest.mark.parametrize("text", ["", "[x", "host:0", "host:99999", "[a]b", "bad host"])
def test_parse_nexthop_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        config.parse_nexthop(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), ("1w", 604800)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@given(st.text(max_size=20))
def test_parse_duration_only_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert config.parse_duration(text) >= 0


def test_route_for_prefers_the_most_specific() -> None:
    cfg = parse(
        '[[route]]\ndomain = "*"\nnexthop = "[127.0.0.1]:1"\n'
        '[[route]]\ndomain = ".example.net"\nnexthop = "[127.0.0.1]:2"\n'
        '[[route]]\ndomain = "a.example.net"\nnexthop = "[127.0.0.1]:3"\n'
    )

    def port(domain: str) -> int | None:
        route = cfg.route_for(domain)
        assert route is not None
        return route.nexthop.port

    assert port("a.example.net") == 3
    assert port("b.example.net") == 2
    assert port("example.net") == 1
    assert port("other.test") == 1


def test_relative_paths_resolve_against_the_data_directory() -> None:
    cfg = parse('[spool]\npath = "q"\nkey_file = "/etc/mta/k"\n')
    assert cfg.spool.path == HOME / "q"
    assert cfg.spool.key_file == Path("/etc/mta/k")


def test_data_home_from_environment() -> None:
    assert config.data_home({"MTA_HOME": "/srv/mta"}) == Path("/srv/mta")
    assert config.data_home({}) == Path("var").absolute()
