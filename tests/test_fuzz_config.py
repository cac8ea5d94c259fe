"""Fuzzing the policy files (mta/config.py): whatever the text, and whatever TOML values sit
under whatever keys, ``parse_text`` and ``validate`` either give a ``Config`` or raise a
one-line ``ConfigError`` naming the file; nothing else escapes."""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta import config
from mta.errors import ConfigError

HOME = Path("/data")
SOURCE = "fuzz.toml"

# Every table and key the policy knows, so that values land where they are read.
SECTIONS: dict[str, list[str]] = {
    "": ["hostname", "include"],
    "spool": ["path", "key_file", "max_age"],
    "relay": ["networks", "local_domains"],
    "dns": ["resolvers", "timeout", "trusted", "dnssec_probe"],
    "dane": ["enabled"],
    "mta_sts": ["enabled", "port", "timeout", "cache_file", "refresh_interval"],
    "tls": ["ca_file"],
    "outbound": [
        "port",
        "default_level",
        "max_connections",
        "max_per_destination",
        "connect_timeout",
        "command_timeout",
        "retry_min",
        "retry_max",
        "helo_name",
    ],
    "limits": [
        "message_size",
        "recipients",
        "idle_timeout",
        "data_timeout",
        "connections",
        "connections_per_client",
        "errors",
        "auth_failures",
        "auth_failure_window",
    ],
    "auth": ["password_file"],
    "log": ["level", "format"],
}
ARRAYS: dict[str, list[str]] = {
    "listener": [
        "address",
        "port",
        "mode",
        "require_tls",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "require_client_cert",
    ],
    "route": ["domain", "nexthop"],
    "domain": [
        "name",
        "level",
        "fingerprints",
        "client_cert",
        "client_key",
        "ca_file",
        "nexthop",
    ],
}

# Strings that are nearly right for some key: durations, sizes, hosts, levels, paths.
near_strings = st.one_of(
    st.sampled_from(
        [
            "",
            "5m",
            "0s",
            "1e9s",
            "10MiB",
            "-1",
            "999999999999999999999999G",
            "127.0.0.1",
            "[::1]:25",
            "[::1]:0",
            "host:99999",
            "::1:53",
            "encrypt",
            "dane-only",
            "fingerprint",
            "sha256:" + "ab" * 32,
            "~nosuchuser/key.pem",
            "~/x",
            "/dev/null",
            "relay",
            "smtps",
            "*",
            ".example",
            "a" * 300,
            "\x00",
            "\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # fullwidth "example"
        ]
    ),
    st.text(max_size=30),
)
scalars = st.one_of(
    near_strings,
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document with known sections and keys (and now and then an unknown one)."""
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=4, unique=True))
        table = {key: draw(values) for key in keys}
        if section:
            doc[section] = table if draw(st.integers(0, 9)) else draw(values)
        else:
            doc.update(table)
    for name in draw(st.lists(st.sampled_from(sorted(ARRAYS)), max_size=2, unique=True)):
        tables = []
        for _ in range(draw(st.integers(0, 2))):
            keys = draw(st.lists(st.sampled_from(ARRAYS[name]), max_size=5, unique=True))
            tables.append({key: draw(values) for key in keys})
        doc[name] = tables if draw(st.integers(0, 9)) else draw(values)
    if draw(st.integers(0, 19)) == 0:
        doc[draw(st.text(max_size=8))] = draw(values)
    return doc


def _only_config_error(run: Any) -> None:
    try:
        run()
    except ConfigError as err:
        message = str(err)
    else:
        return
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: ")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
@example({"limits": {"connections": 0}})
@example({"limits": {"data_timeout": "0s"}})
@example({"listener": [{"tls_cert": "~nosuchuser/c.pem", "tls_key": "k.pem"}]})
@example({"domain": [{"name": "x.example", "level": "verify", "ca_file": "~nosuchuser/ca"}]})
@example({"hostname": datetime.date(2026, 1, 1)})
@example({"spool": {"path": ""}})
@example({"\n": ""})
@example({"mta_sts": {"cache_file": ""}})
def test_validate_raises_only_config_error(doc: dict[str, Any]) -> None:
    _only_config_error(lambda: config.validate(doc, SOURCE, HOME))


@given(st.text(max_size=400))
@example("a = " + "[" * 5000)  # found by atheris: tomllib recurses once per level
@example("a = " + "{b = " * 5000)
def test_parse_text_raises_only_config_error(text: str) -> None:
    _only_config_error(lambda: config.parse_text(text, SOURCE, HOME))


@given(
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "[limits]",
                    "[[listener]]",
                    "[[domain]]",
                    "[outbound]",
                    'include = ["x"]',
                    "errors = -1",
                    'data_timeout = "1w"',
                    'level = "dane-only"',
                    'name = ".example"',
                    'nexthop = "[::1]:25"',
                    "port = 70000",
                    "a.b.c = 1",
                    "[limits.sub]",
                ]
            ),
            st.text(max_size=20),
        ),
        max_size=8,
    )
)
def test_parse_text_of_near_policies_raises_only_config_error(lines: list[str]) -> None:
    _only_config_error(lambda: config.parse_text("\n".join(lines), SOURCE, HOME))


@given(st.text(max_size=40))
def test_value_parsers_raise_only_value_error(text: str) -> None:
    for parse in (
        config.parse_duration,
        config.parse_size,
        config.parse_nexthop,
        config.parse_resolver,
    ):
        with contextlib.suppress(ValueError):
            parse(text)
