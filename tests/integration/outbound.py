"""One delivery attempt through a real ``DeliveryAgent``, as the scheduler makes it: the
policy side built from the config as ``mta run`` builds it, cached connections closed
after."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mta.app import build_destinations
from mta.clock import SystemClock
from mta.config import Config
from mta.deliver.agent import DeliveryAgent
from mta.model import DeliveryResult, Envelope, QueueId

SENDER = "alice@sender.test"


async def attempt(
    cfg: Config,
    domain: str,
    rcpts: Sequence[str],
    content: bytes,
    *,
    sender: str = SENDER,
    smtputf8: bool = False,
) -> DeliveryResult:
    """Deliver ``content`` to ``rcpts`` (all in ``domain``) once."""
    agent = DeliveryAgent(cfg, build_destinations(cfg, SystemClock()).resolver)
    envelope = Envelope(sender, tuple(rcpts), received_at=0.0, smtputf8=smtputf8)
    try:
        return await agent.deliver(QueueId("q1"), envelope, domain, tuple(rcpts), content)
    finally:
        await agent.close()  # its cached connections


def deliver(
    cfg: Config, domain: str, rcpts: Sequence[str], content: bytes, *, sender: str = SENDER
) -> DeliveryResult:
    """``attempt`` on an event loop of its own."""
    return asyncio.run(attempt(cfg, domain, rcpts, content, sender=sender))
