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
