"""Fuzzing the password file parser (mta/receive/auth.py): a hostile or damaged file gives
``ConfigError`` naming the file and line, never another exception and never a slow
scrypt run at load (the parameters are bounded before any hashing)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mta.errors import ConfigError
from mta.receive.auth import PasswordFile, parse_line

_B64 = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=60
)
near_lines = st.builds(
    lambda user, n, r, p, salt, digest: f"{user}:$scrypt$n={n},r={r},p={p}${salt}${digest}",
    st.text(max_size=10),
    st.integers(-1, 2**40),
    st.integers(-1, 100),
    st.integers(-1, 100),
    _B64,
    _B64,
)


@given(st.one_of(near_lines, st.text(max_size=200)))
@example("u:$scrypt$n=1099511627776,r=8,p=1$AAAA$" + "A" * 43)
@example("u:$scrypt$n=16384,r=8,p=1$AAAA$A")  # hash too short
def test_parse_line_raises_only_value_error_and_is_quick(line: str) -> None:
    started = time.monotonic()
    with contextlib.suppress(ValueError):
        parse_line(line)
    assert time.monotonic() - started < 1.0


@settings(deadline=None, max_examples=60)
@given(st.lists(st.one_of(near_lines.map(str.encode), st.binary(max_size=80)), max_size=6))
def test_load_raises_only_config_error(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "passwd"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(b"\n".join(lines))
        try:
            users = PasswordFile.load(path)
        except ConfigError as err:
            message = str(err)
        else:
            assert len(users) <= len(lines)
            return
        assert message.startswith(str(path))
