"""The scrypt password file and the AUTH authenticator (mta/receive/auth.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiosmtpd.smtp import LoginPassword

from mta.errors import ConfigError
from mta.receive.auth import PasswordFile, add_user, hash_password, parse_line


class _Session:
    peer = ("192.0.2.7", 12345)


def _authenticate(passwords: PasswordFile, login: bytes, password: bytes) -> bool:
    result = passwords.authenticator(
        None,  # type: ignore[arg-type]
        _Session(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "PLAIN",
        LoginPassword(login, password),
    )
    return bool(result.success)


def test_add_user_then_verify(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "passwd"
    add_user(path, "alice", "correct horse")
    add_user(path, "bob", "battery staple")
    assert os.stat(path).st_mode & 0o777 == 0o600
    passwords = PasswordFile.load(path)
    assert len(passwords) == 2
    assert passwords.verify("alice", "correct horse")
    assert passwords.verify("bob", "battery staple")
    assert not passwords.verify("alice", "battery staple")
    assert not passwords.verify("carol", "correct horse")
    assert not passwords.verify("alice", "")


def test_add_user_replaces_existing_entry(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "old")
    add_user(path, "alice", "new")
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("alice:$scrypt$n=16384,r=8,p=1$")
    passwords = PasswordFile.load(path)
    assert passwords.verify("alice", "new")
    assert not passwords.verify("alice", "old")


def test_file_holds_no_password(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "s3cret-passphrase")
    assert b"s3cret" not in path.read_bytes()


def test_salt_is_fresh_each_time() -> None:
    assert hash_password("same").encode() != hash_password("same").encode()


def test_injected_random_makes_hash_deterministic() -> None:
    def fixed(n: int) -> bytes:
        return b"\x01" * n

    first = hash_password("pw", random=fixed)
    assert first == hash_password("pw", random=fixed)
    assert first.matches(b"pw")
    assert not first.matches(b"pw ")


@pytest.mark.parametrize("user", ["", "a:b", "a b", "tab\tuser"])
def test_add_user_rejects_bad_names(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError, match="user names"):
        add_user(tmp_path / "passwd", user, "pw")


def test_add_user_rejects_empty_password(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        add_user(tmp_path / "passwd", "alice", "")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice", "expected user:"),
        ("alice:$bcrypt$x$y", "expected user:"),
        ("alice:$scrypt$n=1000,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA", "out of range"),
        ("alice:$scrypt$n=4194304,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA", "out of range"),
        ("alice:$scrypt$n=16384,r=0,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA", "out of range"),
        ("alice:$scrypt$n=16384,r=8,p=1$AAAA$AAAA", "too short"),
        ("alice:$scrypt$n=16384,r=8,p=1$A$AAAAAAAAAAAAAAAAAAAAAA", "not base64"),
    ],
)
def test_parse_line_errors(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_line(line)


def test_load_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    with path.open("a") as file:
        file.write("# a comment\n\nbroken line\n")
    with pytest.raises(ConfigError) as caught:
        PasswordFile.load(path)
    assert str(caught.value).startswith(f"{path}: line 4: ")


def test_load_refuses_duplicate_user(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    line = path.read_text()
    path.write_text(line + line)
    with pytest.raises(ConfigError, match="appears twice"):
        PasswordFile.load(path)


@pytest.mark.parametrize("mode", [0o666, 0o604, 0o620])
def test_load_refuses_loose_modes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"):
        PasswordFile.load(path)


def test_load_accepts_group_read(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    path.chmod(0o640)
    assert PasswordFile.load(path).verify("alice", "pw")


def test_load_refuses_symlink_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symbolic link"):
        PasswordFile.load(link)
    with pytest.raises(ConfigError, match="does not exist"):
        PasswordFile.load(tmp_path / "absent")


def test_authenticator(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pässword")
    passwords = PasswordFile.load(path)
    assert _authenticate(passwords, b"alice", "pässword".encode())
    assert not _authenticate(passwords, b"alice", b"wrong")
    assert not _authenticate(passwords, b"mallory", "pässword".encode())
    assert not _authenticate(passwords, b"\xff\xfe", b"x")


def test_authenticator_keeps_user_not_password(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    result = PasswordFile.load(path).authenticator(
        None,  # type: ignore[arg-type]
        _Session(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "LOGIN",
        LoginPassword(b"alice", b"pw"),
    )
    assert result.success
    assert result.auth_data == "alice"
