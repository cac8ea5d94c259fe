"""``mta queue show|hold|release|delete|requeue``: through the running relay, else on the spool.

With the relay running, a change goes through its control socket to the scheduler,
which applies it under each message's lock, as it applies an attempt's result
(``Scheduler.change`` and ``delete``): a message held during an attempt stays held
when the attempt ends, and one deleted during an attempt is not written back by it.
With the relay stopped, the same rules (``queueops``) are applied to the spool files
under the spool's lock, as ``mta keys rewrap`` does, so no relay starts meanwhile.
Each change is logged per message (``queue.held qid=...``; ``queue.deleted``: no DSN).

``show`` reads the sealed records itself either way (a running relay replaces records
by rename, so reading beside it is safe). ``--body`` decrypts the content: this is
logged first, without the content (``queue.show.body qid=...``), by the running relay
in its log, or, when it is stopped, by this command on stderr in the policy's log
format. If a running relay does not confirm that it logged it, the body is not shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from mta import control, shards
from mta.clock import Clock
from mta.config import Config
from mta.control import ArgCommand
from mta.errors import MtaError
from mta.log import setup as setup_logging
from mta.model import Envelope, QueueId
from mta.queueops import (
    Action,
    Picked,
    Selection,
    SelectionError,
    altered,
    parse_picked,
    parse_selection,
    pick,
    picked_answer,
    show_doc,
    show_text,
)
from mta.queueview import stored_state, when_text
from mta.report.dsn import header_block
from mta.schedule.scheduler import Scheduler
from mta.schedule.state import MessageState, encode_state
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolStore

log = logging.getLogger(__name__)

SHOW_BODY = "queue-show-body"
_SEPARATOR = re.compile(rb"\r?\n\r?\n")


def command_name(action: Action) -> str:
    return f"queue-{action.value}"


# --- in the relay: the control commands ---


def control_commands(scheduler: Scheduler, clock: Clock) -> dict[str, ArgCommand]:
    """The relay's ``queue-hold|release|delete|requeue SELECTION`` and ``queue-show-body
    QID`` commands (``control.start_control``'s commands with an argument)."""

    def for_action(action: Action) -> ArgCommand:
        async def command(argument: str) -> str:
            try:
                selection = parse_selection(argument)
            except SelectionError as err:
                return f"error {err}"
            return picked_answer(await _apply_running(scheduler, clock, action, selection))

        return command

    def show_body(argument: str) -> str:
        try:
            (qid,) = parse_selection(argument).qids
        except (SelectionError, ValueError):
            return "error give one queue id"
        log.info("queue.show.body", extra={"qid": qid})
        return "ok"

    commands = {command_name(action): for_action(action) for action in Action}
    return {**commands, SHOW_BODY: show_body}


async def _apply_running(
    scheduler: Scheduler, clock: Clock, action: Action, selection: Selection
) -> Picked:
    picked = pick(action, selection, scheduler.states())
    now = clock.now()
    done: list[QueueId] = []
    gone: list[QueueId] = []
    for qid in picked.chosen:
        if action is Action.DELETE:
            found = await scheduler.delete(qid)
        else:
            found = await scheduler.change(qid, lambda s: altered(action, s, now)) is not None
        if found:
            done.append(qid)
            log.info(f"queue.{action.done}", extra={"qid": qid})
        else:
            gone.append(qid)  # finished (or deleted) since it was picked
    return Picked(tuple(done), picked.missing + tuple(gone), picked.skipped)


# --- relay stopped: on the spool files ---


async def _apply_offline(
    store: SpoolStore, action: Action, selection: Selection, now: float
) -> Picked:
    queued = store.queue_ids()  # oldest first
    candidates = [q for q in selection.qids if q in set(queued)] if selection.qids else queued
    states: dict[QueueId, MessageState] = {}
    for qid in candidates:
        state = await stored_state(store, qid)  # None: corrupt or gone, as if not queued
        if state is not None and not state.done:
            states[qid] = state
    picked = pick(action, selection, states.items())
    for qid in picked.chosen:
        if action is Action.DELETE:
            await store.remove(qid)
        elif (after := altered(action, states[qid], now)) != states[qid]:
            await store.write_state(qid, encode_state(after))
        log.info(f"queue.{action.done}", extra={"qid": qid, "relay": "stopped"})
    return picked


def _offline(config: Config, work: Callable[[SpoolStore], Picked]) -> Picked:
    """Run ``work`` on each spool directory (the root, a group's shards) under its lock
    (``SpoolError`` if a relay holds it); what each did, together. A queue id is
    missing only if no directory holds it."""
    keyring = KeyRing.load(config.spool.key_file)
    each: list[Picked] = []
    for path in shards.spool_dirs(config):
        store = SpoolStore(path, keyring)
        if not store.root.is_dir():
            each.append(work(store))  # nothing was ever queued: nothing to lock
            continue
        lock = store.lock()
        try:
            each.append(work(store))
        finally:
            os.close(lock)
    missing = tuple(n for n in each[0].missing if all(n in p.missing for p in each))
    chosen = tuple(q for p in each for q in p.chosen)
    return Picked(chosen, missing, tuple(q for p in each for q in p.skipped))


# --- the commands ---


def _lines(name: str, words: Sequence[str]) -> Iterator[str]:
    """``name`` plus as many words as fit one control line (``control.MAX_LINE``)."""
    line = name
    for word in words:
        if len(line) + 1 + len(word) > control.MAX_LINE and line != name:
            yield line
            line = name
        line += " " + word
    yield line


def change(config: Config, action: Action, selection: Selection) -> bool:
    """``mta queue hold|release|delete|requeue``: prints what was done; False when a named
    message is not queued or the relay refused."""
    setup_logging(config.log.level, config.log.format)
    done: list[QueueId] = []
    missing: list[str] = []
    skipped: list[QueueId] = []
    for line in _lines(command_name(action), selection.words()):
        answer = control.ask(config.control_socket, line)
        if answer is None:
            picked = _offline(
                config,
                lambda store: asyncio.run(_apply_offline(store, action, selection, time.time())),
            )
            print("relay not running; changed the spool in place")
        elif not answer.startswith("ok"):
            print(f"mta: relay answered: {answer}", file=sys.stderr)
            return False
        else:
            picked = parse_picked(answer)
        done += picked.chosen
        missing += picked.missing
        skipped += picked.skipped
        if answer is None:
            break  # the offline pass did the whole selection
    for qid in done:
        print(f"{action.done}: {qid}")
    for name in missing:
        print(f"mta: {name}: not in the queue", file=sys.stderr)
    for qid in skipped:
        print(
            f"mta: {qid}: has recipients in other domains too; not deleted (delete it by queue id)",
            file=sys.stderr,
        )
    print(f"-- {len(done)} message(s) {action.done}")
    return not missing


async def _read(store: SpoolStore, qid: QueueId) -> tuple[Envelope, bytes, MessageState | None]:
    envelope, content = await store.read(qid)
    return envelope, content, await stored_state(store, qid)


def show(config: Config, qid: QueueId, *, as_json: bool, body: bool) -> bool:
    """``mta queue show QID``; False (and says why) when it is not queued or the body's
    decryption could not be logged."""
    keyring = KeyRing.load(config.spool.key_file)
    holding = [
        store
        for store in (SpoolStore(path, keyring) for path in shards.spool_dirs(config))
        if qid in store.queue_ids()
    ]
    if not holding:
        print(f"mta: {qid}: not in the queue", file=sys.stderr)
        return False
    store = holding[0]
    try:
        envelope, content, state = asyncio.run(_read(store, qid))
    except MtaError as err:
        if isinstance(err.__cause__, FileNotFoundError):  # delivered meanwhile
            print(f"mta: {qid}: not in the queue", file=sys.stderr)
            return False
        raise
    if state is None:
        print(f"mta: {qid}: not in the queue", file=sys.stderr)
        return False
    headers = header_block(content)
    text: bytes | None = None
    if body:
        if not _log_body_shown(config, qid):
            return False
        rest = content[len(headers) :]
        separator = _SEPARATOR.match(rest)
        text = rest[separator.end() :] if separator else rest
    now = time.time()
    doc = show_doc(qid, envelope, state, headers, len(content), now, body=text)
    if as_json:
        print(json.dumps(doc, indent=2))
        return True
    print(show_text(doc, lambda moment: when_text(moment, now)))
    if text is not None:
        print("body:")
        sys.stdout.flush()
        sys.stdout.buffer.write(text)
        sys.stdout.buffer.flush()
    return True


def _log_body_shown(config: Config, qid: QueueId) -> bool:
    """Log that the operator decrypts ``qid``'s body: in the running relay's log, else here."""
    answer = control.ask(config.control_socket, f"{SHOW_BODY} {qid}")
    if answer is None:
        setup_logging(config.log.level, config.log.format)
        log.info("queue.show.body", extra={"qid": qid, "relay": "stopped"})
        return True
    if answer != "ok":
        print(f"mta: relay answered: {answer}; body not shown", file=sys.stderr)
        return False
    return True
