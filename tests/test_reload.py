"""``mta.reload``: what a reload may change, and what it changes. Pure tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.reload import ListenerPlan, changes, plan_listeners, refusal

HOME = Path("/srv/mta")
BASE = '[[listener]]\nport = 2525\n\n[[listener]]\nport = 465\nmode = "smtps"\n'


def _config(text: str = BASE, source: str = "/etc/mta/relay.toml") -> config.Config:
    return config.parse_text(text, source, HOME)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[spool]\npath = "/elsewhere"\n', "spool.path"),
        ('[spool]\nkey_file = "/elsewhere/spool.key"\n', "spool.key_file"),
        ('[server]\nuser = "mta"\n', "server.user"),
        ('hostname = "mx2.example.net"\n', "hostname"),
        ("[outbound]\nmax_connections = 7\n", "outbound.max_connections"),
        ('[log]\nformat = "json"\n', "log"),
        ('[receipts]\nmax_age = "3d"\n', "receipts"),
        ('[tlsrpt]\norganization = "Example"\n', "tlsrpt"),
        ('[metrics]\nlisten = ""\n', "metrics"),
    ],
)
def test_a_restart_only_change_is_refused_naming_file_and_key(extra: str, key: str) -> None:
    text = extra + BASE if not extra.startswith("[") else BASE + "\n" + extra
    refused = refusal(_config(), _config(text, "/etc/mta/new.toml"))
    assert refused is not None
    assert refused.source == "/etc/mta/new.toml"
    assert refused.key == key
    assert "restart" in refused.problem
    assert "\n" not in str(refused)


@pytest.mark.parametrize(
    "extra",
    [
        '[[domain]]\nname = "dest.test"\nlevel = "verify"\n',
        '[outbound]\nretry_min = "1m"\nmax_per_destination = 3\n',
        '[limits]\nmessage_size = "1M"\nconnections = 10\n',
        '[relay]\nnetworks = ["127.0.0.0/8", "10.0.0.0/8"]\n',
        "[dane]\nenabled = false\n",
        '[auth]\npassword_file = "/etc/mta/passwd"\n',
    ],
)
def test_what_may_change_live_is_not_refused(extra: str) -> None:
    assert refusal(_config(), _config(BASE + "\n" + extra)) is None


def test_the_spool_path_names_both_paths() -> None:
    refused = refusal(_config(), _config(BASE + '\n[spool]\npath = "/elsewhere"\n'))
    assert refused is not None
    assert str(refused) == (
        "/etc/mta/relay.toml: spool.path: changed from /srv/mta/spool to /elsewhere: "
        "restart the relay for that"
    )


def _listeners(*specs: str) -> tuple[config.ListenerConfig, ...]:
    return _config("\n".join(f"[[listener]]\n{spec}\n" for spec in specs)).listeners


@pytest.mark.parametrize(
    ("old", "new", "plan"),
    [
        # unchanged: kept, whatever else changed (certificates, require_tls)
        (("port = 25",), ("port = 25\nrequire_tls = true",), ListenerPlan(((0, 0),), (), ())),
        # one added, in front: the old one keeps its socket at its new position
        (("port = 25",), ("port = 587\nmode = 'smtps'", "port = 25"),
         ListenerPlan(((0, 1),), (0,), ())),
        # one removed
        (("port = 25", "port = 26"), ("port = 26",), ListenerPlan(((1, 0),), (), (0,))),
        # another mode on the same port: closed and bound again
        (("port = 25",), ("port = 25\nmode = 'smtps'",), ListenerPlan((), (0,), (0,))),
        # smtps: new client-certificate demands cannot be swapped into a handshake
        (("port = 465\nmode = 'smtps'",),
         ("port = 465\nmode = 'smtps'\ntls_client_ca = '/etc/ca.pem'",),
         ListenerPlan((), (0,), (0,))),
        # relay: they can (the whole TLS context is per session)
        (("port = 25",), ("port = 25\ntls_client_ca = '/etc/ca.pem'",),
         ListenerPlan(((0, 0),), (), ())),
        # another address on the same port is another listener
        (("port = 25",), ("port = 25\naddress = '127.0.0.2'",), ListenerPlan((), (0,), (0,))),
    ],
)  # fmt: skip
def test_listeners_are_matched_by_where_and_how_they_listen(
    old: tuple[str, ...], new: tuple[str, ...], plan: ListenerPlan
) -> None:
    assert plan_listeners(_listeners(*old), _listeners(*new)) == plan


def test_changes_count_listeners_and_domain_policies() -> None:
    old = _config(
        BASE
        + '\n[[domain]]\nname = "a.test"\nlevel = "verify"\n'
        + '\n[[domain]]\nname = "b.test"\nlevel = "encrypt"\n'
        + '\n[[domain]]\nname = "c.test"\nlevel = "encrypt"\n'
    )
    new = _config(
        "[[listener]]\nport = 2525\n\n[[listener]]\nport = 587\nmode = 'smtps'\n"
        + '\n[[domain]]\nname = "a.test"\nlevel = "secure"\n'
        + '\n[[domain]]\nname = "b.test"\nlevel = "encrypt"\n'
        + '\n[[domain]]\nname = "d.test"\nlevel = "encrypt"\n',
        source="/etc/mta/moved.toml",  # the same policies from another file: unchanged
    )
    assert changes(old, new).facts() == {
        "listeners_kept": 1,
        "listeners_added": 1,
        "listeners_removed": 1,
        "domains_added": 1,
        "domains_removed": 1,
        "domains_changed": 1,
    }
