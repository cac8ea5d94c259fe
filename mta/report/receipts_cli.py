"""``mta receipts show|verify``: the story of one message, and the check of the chain.

Both read the day files with the key file, relay running or not; a running relay is
asked to write out what it holds first (``receipts-flush``), so nothing is missing.
``show`` prints full addresses: it is the operator's tool and the operator holds the
keys that sealed them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from mta.config import Config
from mta.events import DeliveryAttempt, Event, MessageReceived, encode_event
from mta.model import HostPolicy, SessionRecord, TlsInfo
from mta.reply import SmtpReply
from mta.report.receipt_log import events_for, flush_running, receipt_dirs, verify
from mta.spool.keys import KeyRing

EXIT_OK = 0
EXIT_FAILURE = 1


def show(cfg: Config, qid: str, *, as_json: bool) -> int:
    flush_running(cfg)
    events = list(events_for(receipt_dirs(cfg), KeyRing.load(cfg.spool.key_file), qid))
    if as_json:
        print(json.dumps({"qid": qid, "events": [encode_event(e) for e in events]}, indent=2))
        return EXIT_OK
    if not events:
        print(f"mta: no receipts for {qid}", file=sys.stderr)
        return EXIT_FAILURE
    print(render_text(qid, events))
    return EXIT_OK


def check(cfg: Config) -> int:
    flush_running(cfg)
    keyring = KeyRing.load(cfg.spool.key_file)
    entries = files = 0
    for directory in receipt_dirs(cfg):  # one chain per shard of a relay group
        verdict = verify(directory, keyring, now=time.time(), max_age=cfg.receipts.max_age)
        if verdict.bad is not None:
            bad = verdict.bad
            print(f"mta: {directory / bad.file}: entry {bad.entry}: {bad.problem}", file=sys.stderr)
            return EXIT_FAILURE
        entries, files = entries + verdict.entries, files + verdict.files
    print(f"ok: {entries} entries in {files} files")
    return EXIT_OK


# --- text ---


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _reply(reply: SmtpReply) -> str:
    return " ".join(part for part in (str(reply.code), reply.enhanced, reply.text) if part)


def render_text(qid: str, events: Sequence[Event]) -> str:
    """Received, then attempt by attempt: each host tried and each recipient's outcome."""
    lines = [f"message {qid}"]
    attempt = 0
    for event in events:
        if isinstance(event, MessageReceived):
            tls = event.tls or "no TLS"
            auth = ", authenticated" if event.authenticated else ""
            lines.append(
                f"{_when(event.at)}  received on {event.listener} ({tls}{auth}), "
                f"{event.size} bytes, {event.recipients} recipient(s)"
            )
            continue
        attempt += 1
        lines.extend(_attempt(attempt, event))
    return "\n".join(lines)


def _attempt(number: int, event: DeliveryAttempt) -> list[str]:
    result = event.result
    report = " (a TLS report)" if event.report else ""
    lines = [f"{_when(event.at)}  attempt {number} to {result.domain}{report}"]
    for index, session in enumerate(result.sessions, start=1):
        lines.extend(_session(index, session))
    width = max((len(r.rcpt) for r in result.results), default=0)
    for recipient in result.results:
        reason = f" ({recipient.reason})" if recipient.reason else ""
        lines.append(
            f"    {recipient.rcpt:<{width}}  {recipient.outcome.value:<8}  "
            f"{_reply(recipient.reply)}{reason}"
        )
    return lines


def _session(index: int, session: SessionRecord) -> list[str]:
    where = f"{session.mx} [{session.address or 'no address'}]"
    origin = f" from {session.local_address}" if session.local_address else ""
    lines = [f"  host {index}: {where}{origin}"]
    if session.policy is not None:
        lines.extend(_policy(session.policy))
    lines.append(f"      tls      {_tls(session.tls)}")
    verdict = session.result_type or "TLS requirement met"
    lines.append(f"      result   {verdict}: {_reply(session.reply)}")
    return lines


def _policy(policy: HostPolicy) -> list[str]:
    testing = ", report only" if policy.report_only else ""
    failed = f", check failed: {policy.reported_failure}" if policy.reported_failure else ""
    lines = [
        f"      policy   {policy.source.value}, level {policy.level.label}, "
        f"check {policy.check}, authenticated: {policy.auth.value}{testing}{failed}"
    ]
    label = "tlsa" if policy.check == "dane" else "sts"
    for text in policy.policy_strings:
        lines.append(f"      {label:<8} {text}")
    return lines


def _tls(tls: TlsInfo | None) -> str:
    if tls is None:
        return "none"
    key = f", peer key {tls.peer_key}" if tls.peer_key else ""
    verified = ", certificate verified" if tls.peer_verified else ""
    return f"{tls.version} {tls.cipher}{key}{verified}"
