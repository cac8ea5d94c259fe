"""The receiver/manager link over a real SOCK_SEQPACKET socket pair."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mta.errors import ConfigError, MtaError
from mta.link import LinkClosed, ManagerEnd, ReceiverEnd, decode_failure, encode_failure, pair
from mta.model import QueueId


def ends() -> tuple[ManagerEnd, ReceiverEnd]:
    manager, receiver = pair()
    return ManagerEnd(manager), ReceiverEnd(receiver)


def test_a_config_failure_crosses_as_itself() -> None:
    err = decode_failure(encode_failure(ConfigError("/etc/mta.toml", "listener[0]", "in use")))
    assert isinstance(err, ConfigError)
    assert str(err) == "/etc/mta.toml: listener[0]: in use"


def test_any_other_failure_crosses_as_an_error_naming_the_receiver() -> None:
    err = decode_failure(encode_failure(OSError("no memory")))
    assert type(err) is MtaError
    assert str(err) == "receiving process: no memory"


def test_queued_messages_reach_the_manager_in_order() -> None:
    async def scenario() -> list[QueueId]:
        manager, receiver = ends()
        await receiver.send(b"ready")
        await manager.started()
        seen: list[QueueId] = []
        pump = asyncio.create_task(manager.pump(seen.append))
        for qid in ("aaa", "bbb", "ccc"):
            await receiver.queued(QueueId(qid))
        receiver.close()
        with pytest.raises(LinkClosed):
            await pump
        manager.close()
        return seen

    assert asyncio.run(scenario()) == ["aaa", "bbb", "ccc"]


def test_the_manager_asks_and_the_receiver_answers() -> None:
    async def scenario() -> tuple[str, str]:
        manager, receiver = ends()
        serving = asyncio.create_task(
            receiver.serve({"stats": lambda: "tasks=3", "reload-keys": lambda: "ok active=k2"})
        )
        pump = asyncio.create_task(manager.pump(lambda qid: None))
        answers = (await manager.ask("stats"), await manager.ask("nonsense"))
        manager.close()
        with pytest.raises(LinkClosed):
            await serving
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, LinkClosed):
            await pump
        receiver.close()
        return answers

    assert asyncio.run(scenario()) == ("tasks=3", "error unknown command 'nonsense'")


def test_a_queued_message_is_refused_once_the_manager_has_gone() -> None:
    """The receiver must then answer 451, not 250: its record may be missed by a new
    manager's recovery scan."""

    async def scenario() -> None:
        manager, receiver = ends()
        manager.close()
        with pytest.raises(LinkClosed):
            await receiver.queued(QueueId("aaa"))
        receiver.close()

    asyncio.run(scenario())


def test_a_receiver_that_fails_to_start_fails_the_manager_with_its_error() -> None:
    async def scenario() -> None:
        manager, receiver = ends()
        await receiver.send(encode_failure(ConfigError("p.toml", "listener[1]", "cannot listen")))
        with pytest.raises(ConfigError, match="listener\\[1\\]"):
            await manager.started()
        manager.close()
        receiver.close()

    asyncio.run(scenario())


def test_an_answer_pending_when_the_receiver_dies_fails_instead_of_hanging() -> None:
    async def scenario() -> None:
        manager, receiver = ends()
        pump = asyncio.create_task(manager.pump(lambda qid: None))
        asking = asyncio.create_task(manager.ask("stats"))
        await asyncio.sleep(0.01)
        receiver.close()
        with pytest.raises(LinkClosed):
            await asking
        with pytest.raises(LinkClosed):
            await pump
        manager.close()

    asyncio.run(scenario())
