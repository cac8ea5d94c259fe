"""Policy file validation: defaults, one-line errors naming file and key, parsers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta import config
from mta.errors import ConfigError
from mta.model import TlsLevel
from mta.policy.dnssec import ProbeSpec
from mta.policy.local import Nexthop

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
    limits = cfg.limits
    assert (limits.idle_timeout, limits.data_timeout) == (300, 600)
    assert (limits.connections, limits.connections_per_client, limits.errors) == (1000, 50, 20)
    assert (limits.auth_failures, limits.auth_failure_window) == (5, 300)
    assert limits == config.LimitsConfig(message_size=10 * 1024 * 1024)  # shipped = built in


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
        ("[limits]\nerrors = 0", "test.toml: limits.errors: expected a positive number"),
        (
            "[limits]\nconnections_per_client = -1",
            "test.toml: limits.connections_per_client: expected a positive",
        ),
        ('[limits]\nconnections = "many"', "test.toml: limits.connections: expected an integer"),
        ('[limits]\ndata_timeout = "0s"', "test.toml: limits.data_timeout: expected a positive"),
        ("[limits]\nauth_failures = 1.5", "test.toml: limits.auth_failures: expected an integer"),
        (
            '[limits]\nauth_failure_window = "soon"',
            "test.toml: limits.auth_failure_window: expected a duration",
        ),
        ('[spool]\npath = ""', "test.toml: spool.path: expected a path"),
        ('[[listener]]\ntls_cert = "~nosuchuser/c.pem"', "test.toml: listener[0].tls_cert: cannot"),
        ('"a\\nb" = 1', 'test.toml: "a\\nb": unknown key'),
        ("a = " + "[" * 5000, "test.toml: (syntax): values nested too deeply"),
        ('[log]\nlevel = "LOUD"', "test.toml: log.level: expected DEBUG"),
        ("[spool", "test.toml: (syntax):"),
        ("[[listener]]\nport = true", "test.toml: listener[0].port: expected an integer, got True"),
        ("[server]\nworkers = 0", "test.toml: server.workers: expected 1 to 256 processes, got 0"),
        ("[server]\nworkers = 1000", "test.toml: server.workers: expected 1 to 256"),
        ('[server]\nworkers = "4"', "test.toml: server.workers: expected an integer"),
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
    assert config.parse_nexthop(text) == Nexthop(host, port, mx)


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


def test_domain_policies_from_the_file_and_its_includes(tmp_path: Path) -> None:
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "a.toml").write_text(
        '[[domain]]\nname = "Partner.Example"\nlevel = "fingerprint"\n'
        'fingerprints = ["SHA256:' + "AB:" * 31 + 'AB"]\n'
    )
    (tmp_path / "main.toml").write_text(
        'include = ["domains/*.toml"]\n[[domain]]\nname = ".example"\nlevel = "dane-only"\n'
        'client_cert = "c.pem"\nclient_key = "c.key"\nnexthop = "[relay.example]:2525"\n'
    )
    cfg = config.load(tmp_path / "main.toml", HOME)
    first, second = cfg.domains
    assert (first.name, first.level, first.client_cert) == (
        ".example",
        TlsLevel.DANE_ONLY,
        HOME / "c.pem",
    )
    assert first.nexthop == Nexthop("relay.example", 2525, False)
    assert (second.name, second.level) == ("partner.example", TlsLevel.FINGERPRINT)
    assert second.fingerprints == ("sha256:" + "ab" * 32,)
    assert second.source == str(tmp_path / "domains" / "a.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[domain]]\nlevel = "verify"', "domain[0].name: required"),
        ('[[domain]]\nname = "x.test"', "domain[0].level: required"),
        ('[[domain]]\nname = "*"\nlevel = "verify"', "domain[0].name: a domain policy names"),
        ('[[domain]]\nname = "x.test"\nlevel = "sometimes"', "domain[0].level: expected one of"),
        ('[[domain]]\nname = "x.test"\nlevel = "fingerprint"', "domain[0].fingerprints: required"),
        (
            '[[domain]]\nname = "x.test"\nlevel = "fingerprint"\nfingerprints = ["sha256:abc"]',
            "domain[0].fingerprints: expected sha256:<64 hex digits>",
        ),
        (
            '[[domain]]\nname = "x.test"\nlevel = "verify"\nfingerprints = ["' + "a" * 64 + '"]',
            "domain[0].fingerprints: only used with",
        ),
        (
            '[[domain]]\nname = "x.test"\nlevel = "verify"\nclient_cert = "c"',
            "domain[0].client_key",
        ),
        (
            '[[domain]]\nname = "x.test"\nlevel = "verify"\ncolour = 1',
            "domain[0].colour: unknown key",
        ),
        (
            '[[domain]]\nname = "x.test"\nlevel = "may"\n' * 2,
            "domain.name: x.test is already set in test.toml",
        ),
        ('include = ["a.toml"]', "include: only a policy file on disk"),
        ("[dns]\ntrusted = 1", "dns.trusted: expected true or false"),
        ('[dns]\ndnssec_probe = "ns"', "test.toml: dns.dnssec_probe: expected type:name"),
        ('[dns]\ndnssec_probe = "nope:."', "dns.dnssec_probe: unknown DNS record type"),
        ('[dns]\ndnssec_probe = "any:."', "dns.dnssec_probe: 'any' is not a record type"),
        ("[mta_sts]\nport = 0", "mta_sts.port: expected a port"),
    ],
)
def test_domain_policy_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message in str(caught.value)


def test_an_included_file_may_only_hold_domain_tables(tmp_path: Path) -> None:
    (tmp_path / "d.toml").write_text("[outbound]\nport = 25\n")
    (tmp_path / "main.toml").write_text('include = ["d.toml"]\n')
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "main.toml", HOME)
    assert str(caught.value) == f"{tmp_path / 'd.toml'}: outbound: unknown key"


def test_a_missing_include_without_wildcards_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "main.toml").write_text('include = ["nope.toml"]\n')
    with pytest.raises(ConfigError, match=r"include: no such file: nope\.toml"):
        config.load(tmp_path / "main.toml", HOME)


@pytest.mark.parametrize("pattern", ["", "/etc/mta/domains/*.toml"])
def test_an_empty_or_absolute_include_is_one_line_not_a_traceback(
    tmp_path: Path, pattern: str
) -> None:
    (tmp_path / "main.toml").write_text(f'include = ["{pattern}"]\n')
    with pytest.raises(ConfigError, match=r"include: .* must be a pattern relative to"):
        config.load(tmp_path / "main.toml", HOME)


def test_find_policy_exact_beats_longest_suffix() -> None:
    from mta.policy.local import find_policy

    cfg = parse(
        '[[domain]]\nname = ".example"\nlevel = "verify"\n'
        '[[domain]]\nname = ".b.example"\nlevel = "secure"\n'
        '[[domain]]\nname = "a.b.example"\nlevel = "may"\n'
    )

    def level(domain: str) -> str | None:
        found = find_policy(cfg.domains, domain)
        return found.level.label if found else None

    assert level("a.b.example") == "may"
    assert level("c.b.example") == "secure"
    assert level("b.example") == "verify"
    assert level("example") is None
    assert level("other.test") is None


def test_listener_client_certificates() -> None:
    cfg = parse(
        '[[listener]]\ntls_cert = "c.pem"\ntls_key = "c.key"\n'
        'tls_client_ca = "ca.pem"\nrequire_client_cert = true\n'
    )
    (listener,) = cfg.listeners
    assert listener.tls_client_ca == HOME / "ca.pem"
    assert listener.require_client_cert is True
    with pytest.raises(
        ConfigError, match=r"listener\[0\]\.require_client_cert: needs tls_client_ca"
    ):
        parse("[[listener]]\nrequire_client_cert = true\n")


@pytest.mark.parametrize(
    ("text", "probe"),
    [
        ("", ProbeSpec("NS", ".")),  # Postfix's dnssec_probe default: the root's NS RRset
        ('[dns]\ndnssec_probe = "soa:Test"', ProbeSpec("SOA", "test.")),
        ('[dns]\ndnssec_probe = ""', None),  # probing off
    ],
)
def test_dnssec_probe(text: str, probe: ProbeSpec | None) -> None:
    assert parse(text).dns.dnssec_probe == probe


def test_tlsrpt_defaults_and_values() -> None:
    assert parse("").tlsrpt == config.TlsRptConfig()
    assert parse("").tlsrpt.enabled is True
    got = parse(
        "[tlsrpt]\nenabled = false\norganization = 'Example'\ncontact = 'tls@example.org'\n"
        "from = 'reports@example.org'\ndkim_domain = 'Example.org.'\n"
        "dkim_selector = 'tlsrpt1'\ndkim_key = 'keys/dkim.pem'\n"
    ).tlsrpt
    assert got == config.TlsRptConfig(
        False,
        "Example",
        "tls@example.org",
        "reports@example.org",
        "example.org",
        "tlsrpt1",
        HOME / "keys/dkim.pem",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tlsrpt]\nenabled = 1", "test.toml: tlsrpt.enabled: expected true or false"),
        ("[tlsrpt]\nfrom = 'nobody'", "test.toml: tlsrpt.from: expected an address"),
        (
            "[tlsrpt]\ndkim_domain = 'example.org'\ndkim_key = 'k.pem'",
            "test.toml: tlsrpt.dkim_selector: required with tlsrpt.dkim_domain",
        ),
        (
            "[tlsrpt]\ndkim_selector = 's'",
            "test.toml: tlsrpt.dkim_domain: required with tlsrpt.dkim_selector",
        ),
        ("[tlsrpt]\ndkim_selector = 'a b'", "test.toml: tlsrpt.dkim_selector: expected a DNS"),
        ("[tlsrpt]\ndkim_domain = 'not a domain'", "test.toml: tlsrpt.dkim_domain: expected a"),
        ("[tlsrpt]\nrua = 'x'", "test.toml: tlsrpt.rua: unknown key"),
    ],
)
def test_tlsrpt_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert str(caught.value).startswith(message)


def test_workers_default_to_one_per_cpu_and_take_a_number() -> None:
    assert parse("").server.workers == (os.cpu_count() or 1)
    assert parse("[server]\nworkers = 3").server.workers == 3
    assert parse("[server]\nworkers = 1").server.workers == 1
