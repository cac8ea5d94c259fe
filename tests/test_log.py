"""Log lines: stable event names, key=value facts, and no full addresses."""

from __future__ import annotations

import io
import json
import logging

from mta.log import redact, redact_text, setup


def test_redact_keeps_domain_hides_local_part() -> None:
    redacted = redact("alice.secret@example.com")
    assert redacted.endswith("@example.com")
    assert "alice" not in redacted
    assert redact("alice.secret@example.com") == redacted  # stable, so lines can be correlated
    assert redact("bob@example.com") != redacted
    assert redact("") == "<>"


def test_redact_text_hides_every_address_a_reply_quotes() -> None:
    reply = "550 5.1.1 <bob.secret@dest.test>: Recipient unknown (was alice@src.test)"
    shown = redact_text(reply)
    assert "bob.secret" not in shown
    assert "alice" not in shown
    assert f"<{redact('bob.secret@dest.test')}>" in shown
    assert redact("alice@src.test") in shown
    assert redact_text("451 4.7.5 TLS policy not satisfied") == "451 4.7.5 TLS policy not satisfied"


def test_key_value_and_json_formats() -> None:
    for fmt in ("text", "json"):
        stream = io.StringIO()
        setup("INFO", fmt, stream)
        logging.getLogger("mta.test").info("deliver.result", extra={"qid": "Q1", "mx": "mx a"})
        logging.getLogger("mta.test").debug("hidden.at.info")
        out = stream.getvalue()
        assert "hidden.at.info" not in out
        if fmt == "json":
            doc = json.loads(out)
            assert (doc["event"], doc["qid"], doc["mx"]) == ("deliver.result", "Q1", "mx a")
        else:
            assert 'deliver.result qid=Q1 mx="mx a"' in out
