"""``[server]``: whom the relay runs as. Pure decisions, with a user table for ``getpwnam``.

The switch itself (setuid) is tested as root on a real process in
``tests/integration/test_privileges.py``.
"""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from mta import config, privileges
from mta.errors import ConfigError

HOME = Path("/data")
USERS = {
    "mta": pwd.struct_passwd(("mta", "x", 120, 121, "", "/var/lib/mta", "/usr/sbin/nologin")),
    "toor": pwd.struct_passwd(("toor", "x", 0, 0, "", "/root", "/bin/sh")),
}


def lookup(name: str) -> pwd.struct_passwd:
    return USERS[name]


def parse(text: str) -> config.Config:
    return config.parse_text(text, "test.toml", HOME)


def test_server_defaults_run_as_whoever_started_it() -> None:
    default = config.ServerConfig(user="", allow_root=False, workers=config.default_workers())
    assert config.load_default(HOME).server == default
    cfg = parse('[server]\nuser = "mta"\nallow_root = true\nworkers = 1\n')
    assert cfg.server == config.ServerConfig(user="mta", allow_root=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[server]\nuser = "-r"',
            "test.toml: server.user: expected a user name like mta, got '-r'",
        ),
        ('[server]\nuser = "a:b"', "server.user: expected a user name like mta"),
        ('[server]\nuser = "../x"', "server.user: expected a user name like mta"),
        ("[server]\nuser = 7", "test.toml: server.user: expected a string, got 7"),
        ('[server]\nallow_root = "yes"', "server.allow_root: expected true or false"),
        ("[server]\ngroup = 1", "test.toml: server.group: unknown key"),
    ],
)
def test_bad_server_keys_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_root_without_user_is_refused_in_one_line() -> None:
    refusal = privileges.root_refusal(parse(""), euid=0)
    assert refusal is not None
    assert str(refusal) == (
        'test.toml: server.user: refusing to run as root: set user = "mta" (an unprivileged '
        "user to switch to after binding) or allow_root = true in [server]"
    )


@pytest.mark.parametrize(
    ("text", "euid"),
    [
        ("", 1000),  # not root: nothing to refuse
        ('[server]\nuser = "mta"', 0),
        ("[server]\nallow_root = true", 0),
    ],
)
def test_what_is_not_refused(text: str, euid: int) -> None:
    assert privileges.root_refusal(parse(text), euid) is None


def test_root_with_user_switches_to_its_uid_and_primary_group() -> None:
    account = privileges.account_for(parse('[server]\nuser = "mta"'), 0, lookup)
    assert account == privileges.Account("mta", 120, 121)


@pytest.mark.parametrize(
    ("text", "euid"),
    [
        ("", 0),  # no user: nothing to switch (allow_root decides elsewhere)
        ('[server]\nuser = "mta"', 120),  # systemd User=mta started us as mta already
    ],
)
def test_nothing_to_switch(text: str, euid: int) -> None:
    assert privileges.account_for(parse(text), euid, lookup) is None


@pytest.mark.parametrize(
    ("user", "euid", "problem"),
    [
        ("nosuch", 0, "test.toml: server.user: no such user: nosuch"),
        ("toor", 0, "toor is root (uid 0): name an unprivileged user"),
        ("mta", 1000, "cannot switch to mta (uid 120): running as uid 1000, not root"),
    ],
)
def test_accounts_that_cannot_be_used(user: str, euid: int, problem: str) -> None:
    cfg = parse(f'[server]\nuser = "{user}"')
    with pytest.raises(ConfigError) as caught:
        privileges.account_for(cfg, euid, lookup)
    assert problem in str(caught.value)
