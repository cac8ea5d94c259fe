"""``mta tlsrpt show|send``: the day's TLS reports, asked of the running relay.

Both go through the control socket: the relay holds the counts, its DNS cache, the
sealed sent-state, and its queue (``mailto:`` reports leave through it). With no relay
running there is nothing to send them with, so both say so in one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from typing import Any

from mta import control
from mta.config import Config

EXIT_OK = 0
EXIT_FAILURE = 1
SEND_WAIT = 300.0  # seconds: DNS lookups and HTTPS POSTs for every domain


def date_arg(text: str) -> str:
    """``--date``: checked by argparse (a usage line on a typo), kept as ``YYYY-MM-DD``."""
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def _ask(cfg: Config, command: str, timeout: float) -> str | None:
    answer = control.ask(cfg.control_socket, command, timeout=timeout)
    if answer is None:
        print("mta: relay not running (TLS reports are built and sent by it)", file=sys.stderr)
        return None
    if not answer.startswith("ok"):
        print(f"mta: relay answered: {answer}", file=sys.stderr)
        return None
    return answer.removeprefix("ok").strip()


def show(cfg: Config, day: str, as_json: bool) -> int:
    answer = _ask(cfg, f"tlsrpt-show {day}".strip(), SEND_WAIT)
    if answer is None:
        return EXIT_FAILURE
    reports: list[dict[str, Any]] = json.loads(answer)
    if as_json:
        print(json.dumps(reports, indent=2))
        return EXIT_OK
    if not reports:
        print("no TLS sessions to report for that day")
    for entry in reports:
        print(render_text(entry))
    return EXIT_OK


def render_text(entry: dict[str, Any]) -> str:
    """One domain's report for a person: counts per policy, failures, destinations."""
    report = entry["report"]
    where = ", ".join(entry["destinations"]) or "nowhere (no valid _smtp._tls record)"
    lines = [f"{entry['policy-domain']}  [{entry['status']}] -> {where}"]
    for policy in report["policies"]:
        summary = policy["summary"]
        lines.append(
            f"  {policy['policy']['policy-type']:<16} "
            f"{summary['total-successful-session-count']} ok, "
            f"{summary['total-failure-session-count']} failed"
        )
        for detail in policy["failure-details"]:
            lines.append(
                f"    {detail['failed-session-count']:>5} x {detail['result-type']}  "
                f"{detail.get('receiving-mx-hostname', '-')} "
                f"[{detail.get('receiving-ip', '-')}]"
            )
    return "\n".join(lines)


def send(cfg: Config, day: str) -> int:
    answer = _ask(cfg, f"tlsrpt-send {day}".strip(), SEND_WAIT)
    if answer is None:
        return EXIT_FAILURE
    print(f"tlsrpt: {answer}")
    return EXIT_OK
