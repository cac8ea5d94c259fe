"""Structured logs: stable dotted event names, facts as key=value (or JSON), addresses hashed.

Modules log ``log.info("deliver.result", extra={"qid": qid, ...})``. Only the keys in
``extra`` are printed; message content, keys and AUTH data are never passed in.
Addresses go through ``redact`` first, so INFO logs never hold a full address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from typing import Any, Final, TextIO

_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def redact(address: str) -> str:
    """An address as logs may show it: a short hash of the local part, the domain in clear.

    ``alice@example.com`` -> ``h:3f2a8c1d@example.com``; ``""`` (null sender) -> ``<>``.
    """
    if not address:
        return "<>"
    _local, at, domain = address.rpartition("@")
    digest = hashlib.sha256(address.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"h:{digest}@{domain}" if at else f"h:{digest}"


_ADDRESS_IN_TEXT: Final = re.compile(r"[^\s<>()\[\]\"',;:]+@[A-Za-z0-9.-]+")


def redact_text(text: str) -> str:
    """``text`` (a remote server's reply, say) with every address in it ``redact``-ed."""
    return _ADDRESS_IN_TEXT.sub(lambda found: redact(found.group()), text)


def _facts(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``2026-11-29T00:00:00Z INFO deliver.result qid=... mx=... tls=TLSv1.3``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [stamp, record.levelname, record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in _facts(record).items()]
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts":..., "level":..., "event":..., facts...}``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname,
            "event": record.getMessage(),
        }
        doc.update(
            {
                k: v if isinstance(v, int | float | bool) else str(v)
                for k, v in _facts(record).items()
            }
        )
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO = sys.stderr) -> None:
    """Route every ``mta.*`` logger to ``stream``; quieten the libraries' own chatter."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("mta")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd logs peers and, at DEBUG, whole lines: keep it at WARNING.
    for noisy in ("mail.log", "aiosmtpd", "aiosmtplib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
