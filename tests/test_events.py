"""The typed events and their codec: what a sink is handed, and what a log keeps."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.events import (
    DeliveryAttempt,
    Event,
    EventError,
    Events,
    MessageReceived,
    decode_event,
    encode_event,
)
from mta.model import (
    DeliveryResult,
    HostPolicy,
    Outcome,
    PeerAuth,
    PolicySource,
    QueueId,
    RecipientResult,
    SessionRecord,
    TlsInfo,
    TlsLevel,
)
from mta.reply import SmtpReply

OK = SmtpReply(250, "2.0.0", "OK id=1")
STS = HostPolicy(
    PolicySource.MTA_STS,
    TlsLevel.VERIFY,
    "pkix",
    PeerAuth.PKIX,
    policy_strings=("version: STSv1", "mode: enforce", "mx: *.b.test", "max_age: 86400"),
    mx_patterns=("*.b.test",),
)
TLS = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", True, "EC-256")
ATTEMPT = DeliveryAttempt(
    at=1_700_000_100.5,
    qid=QueueId("q1"),
    received_at=1_700_000_000.0,
    result=DeliveryResult(
        "b.test",
        (
            RecipientResult("bob@b.test", Outcome.SENT, OK),
            RecipientResult(
                "carol@b.test", Outcome.DEFERRED, SmtpReply(451, "4.7.5", "x"), "weak-key"
            ),
        ),
        "mx2.b.test",
        TLS,
        "127.0.0.22",
        STS,
        (
            SessionRecord(
                "mx1.b.test",
                "127.0.0.21",
                SmtpReply(451, "4.7.5", "TLS failed"),
                "certificate-expired",
                TlsInfo("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"),
                HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", policy_strings=("3 1 1 ab",)),
            ),
            SessionRecord("mx2.b.test", "127.0.0.22", OK, None, TLS, STS, "127.0.0.1"),
            SessionRecord("mx.evil.test", "", SmtpReply(451, "4.7.5", "no"), "validation-failure"),
        ),
    ),
    report=True,
)
RECEIVED = MessageReceived(
    at=1_700_000_000.0,
    qid=QueueId("q1"),
    listener="127.0.0.1:2525",
    tls="TLSv1.3",
    authenticated=False,
    size=1234,
    recipients=2,
    ack_seconds=0.0125,
)


@pytest.mark.parametrize("event", [ATTEMPT, RECEIVED])
def test_an_event_survives_json(event: Event) -> None:
    assert decode_event(json.loads(json.dumps(encode_event(event)))) == event


def test_an_attempt_without_hosts_or_tls_survives_json() -> None:
    bare = DeliveryAttempt(
        1.0,
        QueueId("q2"),
        0.0,
        DeliveryResult("c.test", (RecipientResult("x@c.test", Outcome.BOUNCED, OK),)),
    )
    assert decode_event(encode_event(bare)) == bare


def test_a_session_stored_before_local_address_decodes_without_it() -> None:
    doc = json.loads(json.dumps(encode_event(ATTEMPT)))
    assert doc["sessions"][1]["local_address"] == "127.0.0.1"
    for session in doc["sessions"]:
        del session["local_address"]
    decoded = decode_event(doc)
    assert isinstance(decoded, DeliveryAttempt)
    assert [s.local_address for s in decoded.result.sessions] == ["", "", ""]


def _broken(change: dict[str, Any]) -> dict[str, Any]:
    doc = encode_event(ATTEMPT)
    doc.update(change)
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        {"v": 2, "type": "attempt"},
        {"v": 1, "type": "unknown"},
        _broken({"at": "yesterday"}),
        _broken({"report": 1}),
        _broken({"results": [{"rcpt": "x", "outcome": "lost", "reply": [250, "2.0.0", ""]}]}),
        _broken({"policy": {**encode_event(ATTEMPT)["policy"], "check": "magic"}}),
        _broken({"policy": {**encode_event(ATTEMPT)["policy"], "level": "paranoid"}}),
        _broken({"sessions": [{"mx": "m", "address": "a", "reply": [250, "2.0.0"]}]}),
        _broken(
            {
                "sessions": [
                    {"mx": "m", "address": "a", "reply": [250, "2.0.0", ""], "local_address": 1}
                ]
            }
        ),
        {k: v for k, v in encode_event(RECEIVED).items() if k != "size"},
    ],
)
def test_anything_else_is_an_event_error(doc: object) -> None:
    with pytest.raises(EventError):
        decode_event(doc)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists, max_leaves=8))
def test_decoding_never_raises_anything_but_event_error(doc: object) -> None:
    with pytest.raises(EventError):
        decode_event({"v": 1, "type": "attempt", "results": doc})


def test_a_failing_sink_never_stops_the_others(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Event] = []

    def broken(_: Event) -> None:
        raise RuntimeError("disk on fire")

    events = Events([broken, seen.append])
    with caplog.at_level(logging.ERROR, logger="mta.events"):
        events(RECEIVED)
    assert seen == [RECEIVED]
    assert [r.getMessage() for r in caplog.records] == ["events.sink_failed"]
