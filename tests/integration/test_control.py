"""The control socket answers every command, a failing one included."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mta import control
from mta.errors import KeyFileError


def test_a_command_that_fails_is_answered_with_its_error(tmp_path: Path) -> None:
    def broken() -> str:
        raise KeyFileError("/srv/keys: is not a regular file")

    async def scenario() -> tuple[str, str]:
        path = tmp_path / "control.sock"
        server = await control.start_control(path, {"reload-keys": broken, "ping": lambda: "ok"})
        try:
            failed = await control._ask(path, "reload-keys", 5)
            still_there = await control._ask(path, "ping", 5)
        finally:
            server.close()
            await server.wait_closed()
        return failed, still_there

    failed, still_there = asyncio.run(scenario())
    assert failed == "error KeyFileError: /srv/keys: is not a regular file"
    assert still_there == "ok"


def test_a_command_with_an_argument_gets_it_and_a_long_answer_comes_back(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        path = tmp_path / "control.sock"
        server = await control.start_control(
            path,
            {"ping": lambda: "ok"},
            {"echo": lambda argument: f"ok {argument} " + "x" * 200_000},
        )
        try:
            return [
                await control._ask(path, "echo 2026-12-02", 5),
                await control._ask(path, "echo", 5),
                await control._ask(path, "ping extra", 5),
            ]
        finally:
            server.close()
            await server.wait_closed()

    long, bare, unknown = asyncio.run(scenario())
    assert long == "ok 2026-12-02 " + "x" * 200_000
    assert bare.startswith("ok  x")
    assert unknown == "error unknown command 'ping extra'"
