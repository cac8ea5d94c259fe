"""The fleet key: sealing round-trips and binds a value to its key name; key names hide
the domain and differ per fleet; the key file must be private and 32 bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mta.errors import KeyFileError
from mta.shared.fleet_key import FleetKey, Unsealable, create

KEY = bytes(range(32))


def test_seal_round_trip_and_no_clear_text() -> None:
    key = FleetKey(KEY)
    name = key.name("sts", "example.org")
    sealed = key.seal(name, b'{"domain": "example.org"}')
    assert b"example.org" not in sealed
    assert key.unseal(name, sealed) == b'{"domain": "example.org"}'
    assert key.seal(name, b"x") != key.seal(name, b"x")  # a fresh nonce each time


def test_a_value_moved_to_another_key_or_altered_does_not_open() -> None:
    key = FleetKey(KEY)
    a, b = key.name("sts", "a.example"), key.name("sts", "b.example")
    sealed = key.seal(a, b"policy of a")
    with pytest.raises(Unsealable):
        key.unseal(b, sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(Unsealable):
        key.unseal(a, tampered)
    with pytest.raises(Unsealable):
        key.unseal(a, b"short")
    with pytest.raises(Unsealable):
        FleetKey(bytes(32)).unseal(a, sealed)  # another fleet's key


def test_key_names_hide_the_domain_and_depend_on_the_key() -> None:
    key = FleetKey(KEY)
    name = key.name("sts", "example.org")
    assert name.startswith("mta:sts:")
    assert "example" not in name
    assert len(name) == len("mta:sts:") + 32
    assert name == key.name("sts", "example.org")  # every relay computes the same
    assert name != key.name("sts", "example.net")
    assert name != key.name("tlsrpt", "example.org")
    assert name != FleetKey(bytes(32)).name("sts", "example.org")
    # parts are separated: ("a", "bc") is not ("ab", "c")
    assert key.name("k", "a", "bc") != key.name("k", "ab", "c")


def test_the_key_is_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        FleetKey(b"short")


def test_create_and_load(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "shared.key"
    create(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len(path.read_bytes()) == 32
    key = FleetKey.load(path)
    assert FleetKey.load(path).unseal("n", key.seal("n", b"v")) == b"v"
    with pytest.raises(FileExistsError):
        create(path)  # never over an existing key


def test_load_refuses_a_readable_or_wrong_sized_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        FleetKey.load(path)
    path.chmod(0o600)
    path.write_bytes(os.urandom(31))
    with pytest.raises(KeyFileError, match="32 bytes, this has 31"):
        FleetKey.load(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        FleetKey.load(tmp_path / "missing.key")


def test_mta_keys_shared_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mta import cli

    policy = tmp_path / "relay.toml"
    path = tmp_path / "keys" / "shared.key"
    policy.write_text(f'[shared]\nkey_file = "{path}"\n')
    args = ["keys", "shared-create", "--config", str(policy)]
    assert cli.main(args) == cli.EXIT_OK
    assert "copy it to every relay" in capsys.readouterr().out
    first = path.read_bytes()
    assert cli.main(args) == cli.EXIT_FAILURE  # never replaced
    assert path.read_bytes() == first
    assert "exists" in capsys.readouterr().err
    policy.write_text("")
    assert cli.main(args) == cli.EXIT_FAILURE
    assert "shared.key_file: not set" in capsys.readouterr().err
