"""The relay group's control socket: one face for the operator over N relays.

The supervisor (``mta.group``) serves ``config.control_socket`` (in the spool root)
and hands each command to every worker's own socket (in its shard), then combines
the answers, so ``mta stats``, ``queue``, ``keys``, ``reload`` and ``tlsrpt`` speak for
the whole group with the CLI unchanged. A worker that does not answer (it is being
restarted) makes a command that needs every shard fail, one line saying which; only
``stats`` answers without it (``workerK=down``). Combining is pure (``combine_*``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from mta import control
from mta.control import ArgCommand, Command
from mta.model import QueueId
from mta.queueops import (
    Action,
    Picked,
    SelectionError,
    parse_picked,
    parse_selection,
    picked_answer,
)
from mta.queuetools import SHOW_BODY, command_name
from mta.spool.store import SpoolDirectory

Answers = Sequence[str | None]  # one per worker, in shard order; None: not running

REWRAP_WAIT: Final = 3600.0
RELOAD_WAIT: Final = 120.0
REPORT_WAIT: Final = 300.0
TOTALS: Final = ("queued", "in_flight", "tasks", "rss_kb", "fds", "py_blocks")


def first_failure(answers: Answers) -> str | None:
    """The group's ``error ...`` answer when some worker did not say ``ok``."""
    for index, answer in enumerate(answers):
        if answer is None:
            return f"error worker {index} is not running (it is being restarted); try again"
        if not answer.startswith("ok"):
            return f"error worker {index}: {answer.removeprefix('error').strip()}"
    return None


def figures(answer: str) -> dict[str, str]:
    """``ok a=1 b=2`` -> {a: 1, b: 2}."""
    words = answer.removeprefix("ok").split()
    return dict(word.split("=", 1) for word in words if "=" in word)


def combine_stats(answers: Answers) -> str:
    """Totals over the workers that answered, ``workers=N``, then each one's figures."""
    totals = dict.fromkeys(TOTALS, 0)
    each: list[str] = []
    for index, answer in enumerate(answers):
        if answer is None or not answer.startswith("ok"):
            each.append(f"worker{index}=down")
            continue
        for name, value in figures(answer).items():
            if name in totals and value.lstrip("-").isdigit():
                totals[name] += int(value)
            each.append(f"worker{index}.{name}={value}")
    head = [f"{name}={value}" for name, value in totals.items()]
    return " ".join(["ok", *head, f"workers={len(answers)}", *each])


def combine_counts(answers: Answers) -> str:
    """``ok N`` from each (``flush``, ``receipts-flush``): ``ok`` and their sum."""
    failed = first_failure(answers)
    if failed is not None:
        return failed
    words = [a.removeprefix("ok").strip() for a in answers if a is not None]
    return f"ok {sum(int(w) for w in words if w.isdigit())}"


def combine_figures(answers: Answers) -> str:
    """``ok a=1 b=2`` from each (``rewrap``): the numbers summed, the rest as worker 0's."""
    failed = first_failure(answers)
    if failed is not None:
        return failed
    merged: dict[str, str] = {}
    for answer in answers:
        for name, value in figures(answer or "").items():
            before = merged.setdefault(name, value)
            if before is not value and before.isdigit() and value.isdigit():
                merged[name] = str(int(before) + int(value))
    return " ".join(["ok", *(f"{name}={value}" for name, value in merged.items())])


def combine_picked(answers: Answers) -> str:
    """A queue change done by each shard: what any did; missing only if missing in all."""
    failed = first_failure(answers)
    if failed is not None:
        return failed
    try:
        each = [parse_picked(a) for a in answers if a is not None]
    except ValueError as err:
        return f"error a worker's answer did not parse: {err}"
    done = tuple(q for p in each for q in p.chosen)
    skipped = tuple(q for p in each for q in p.skipped)
    missing = tuple(n for n in each[0].missing if all(n in p.missing for p in each))
    return picked_answer(Picked(done, missing, skipped))


class GroupControl:
    """The group socket's commands, asking the workers' sockets ``sockets``.

    ``reload``: the supervisor's check of the policy (one line, or None when it may
    be reloaded) before any worker is asked.
    """

    def __init__(
        self,
        sockets: Sequence[Path],
        shards: Sequence[Path],
        *,
        check_reload: Callable[[], Awaitable[str | None]],
    ) -> None:
        self.sockets = list(sockets)
        self.shards = list(shards)
        self.check_reload = check_reload

    async def ask_all(self, line: str, wait: float = 10.0) -> list[str | None]:
        asks = (control.ask_async(path, line, wait) for path in self.sockets)
        return list(await asyncio.gather(*asks))

    async def start(self, path: Path) -> asyncio.Server:
        async def each(line: str, combine: Callable[[Answers], str], wait: float) -> str:
            return combine(await self.ask_all(line, wait))

        def fan(line: str, combine: Callable[[Answers], str], wait: float = 10.0) -> Command:
            return lambda: each(line, combine, wait)

        commands: dict[str, Command] = {
            "ping": lambda: "ok",
            "stats": fan("stats", combine_stats),
            "flush": fan("flush", combine_counts),
            "receipts-flush": fan("receipts-flush", combine_counts, 30.0),
            "rewrap": fan("rewrap", combine_figures, REWRAP_WAIT),
            "reload-keys": self._reload_keys,
            "reload": self.reload,
        }
        with_argument: dict[str, ArgCommand] = {
            "tlsrpt-show": self._reporter("tlsrpt-show"),
            "tlsrpt-send": self._reporter("tlsrpt-send"),
            SHOW_BODY: self._show_body,
        }
        for action in Action:
            name = command_name(action)
            with_argument[name] = self._change(name)
        return await control.start_control(path, commands, with_argument)

    async def _reload_keys(self) -> str:
        answers = await self.ask_all("reload-keys", RELOAD_WAIT)
        return first_failure(answers) or str(answers[0])

    async def reload(self) -> str:
        """The policy checked here, then reloaded by every worker (``mta reload``)."""
        refused = await self.check_reload()
        if refused is not None:
            return f"error {refused}"
        answers = await self.ask_all("reload", RELOAD_WAIT)
        return first_failure(answers) or f"{answers[0]} workers={len(answers)}"

    def _reporter(self, name: str) -> ArgCommand:
        """TLS reports: worker 0 sends them, from every shard's receipts (flushed first)."""

        async def command(argument: str) -> str:
            failed = first_failure(await self.ask_all("receipts-flush", 30.0))
            if failed is not None:
                return failed
            line = f"{name} {argument}".strip()
            answer = await control.ask_async(self.sockets[0], line, REPORT_WAIT)
            return answer if answer is not None else "error worker 0 is not running; try again"

        return command

    async def report_page(self, days: int) -> str:
        """``GET /report``: worker 0's page, made from every shard's receipts once each
        worker has written out what it buffers."""
        await self.ask_all("receipts-flush", 30.0)
        answer = await control.ask_async(self.sockets[0], f"report-page {days}", REPORT_WAIT)
        if answer is None or not answer.startswith("ok "):
            raise RuntimeError(f"worker 0 made no report page: {answer}")
        page = json.loads(answer[3:])
        if not isinstance(page, str):
            raise RuntimeError("worker 0 answered no page")
        return page

    def _change(self, name: str) -> ArgCommand:
        async def command(argument: str) -> str:
            return combine_picked(await self.ask_all(f"{name} {argument}"))

        return command

    async def _show_body(self, argument: str) -> str:
        """Logged by the worker whose shard holds the message (worker 0 if none does)."""
        try:
            (qid,) = parse_selection(argument).qids
        except (SelectionError, ValueError):
            return "error give one queue id"
        index = self._holder(qid)
        answer = await control.ask_async(self.sockets[index], f"{SHOW_BODY} {qid}")
        return answer if answer is not None else f"error worker {index} is not running"

    def _holder(self, qid: QueueId) -> int:
        for index, shard in enumerate(self.shards):
            if os.path.lexists(SpoolDirectory(shard).msg_dir / qid):
                return index
        return 0
