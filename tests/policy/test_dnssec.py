"""The DNSSEC probe: its question, its state machine, and the prober with a fake resolver."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mta.policy.dnssec import (
    DnssecStatus,
    ProbeAnswer,
    ProbeSpec,
    after_probe,
    news,
    parse_probe,
)
from mta.policy.dnssec_probe import DnssecProbe

PASS = ProbeAnswer(True, "ns:.: validated (AD bit set)")
FAIL = ProbeAnswer(False, "ns:. answered without the AD bit")


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("ns:.", ProbeSpec("NS", ".")),
        ("NS:.", ProbeSpec("NS", ".")),
        ("soa:Example.ORG", ProbeSpec("SOA", "example.org.")),
        ("txt:_probe.example.", ProbeSpec("TXT", "_probe.example.")),
        ("", None),
        ("  ", None),
    ],
)
def test_parse_probe(text: str, spec: ProbeSpec | None) -> None:
    assert parse_probe(text) == spec


@pytest.mark.parametrize("text", ["ns", "ns:", ":.", "nosuchtype:.", "any:.", "axfr:."])
def test_parse_probe_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_probe(text)


def test_the_probe_prints_as_configured() -> None:
    assert str(ProbeSpec("NS", ".")) == "ns:."


def test_a_failed_probe_then_a_passing_one() -> None:
    start = DnssecStatus(resolver="127.0.0.1:53", probe="ns:.")
    assert (start.ok, start.state) == (True, "not-probed")
    failed = after_probe(start, FAIL, 100.0)
    assert (failed.ok, failed.state, failed.failures, failed.last_checked) == (
        False,
        "unverifiable",
        1,
        100.0,
    )
    assert news(start, failed) == "failed"
    again = after_probe(failed, FAIL, 160.0)
    assert (again.failures, again.probes) == (2, 2)
    assert news(failed, again) is None  # no second warning for the same state
    passed = after_probe(again, PASS, 220.0)
    assert (passed.ok, passed.state, passed.failures, passed.detail) == (
        True,
        "validating",
        2,  # a counter: never reset
        PASS.detail,
    )
    assert news(again, passed) == "ok"
    assert news(passed, after_probe(passed, PASS, 280.0)) is None


def test_the_first_pass_is_news() -> None:
    start = DnssecStatus()
    assert news(start, after_probe(start, PASS, 1.0)) == "ok"


class FakeAsker:
    def __init__(self, answers: list[ProbeAnswer]) -> None:
        self.answers = answers
        self.asked: list[ProbeSpec] = []

    async def probe_dnssec(self, spec: ProbeSpec) -> ProbeAnswer:
        self.asked.append(spec)
        await asyncio.sleep(0)
        return self.answers.pop(0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        self.t += 1
        return self.t


def test_the_first_callers_wait_for_one_probe(caplog: pytest.LogCaptureFixture) -> None:
    asker = FakeAsker([FAIL, PASS])
    probe = DnssecProbe(asker, ProbeSpec("NS", "."), "127.0.0.53:5353", FakeClock())
    assert probe.status.state == "not-probed"

    async def main() -> list[DnssecStatus]:
        return list(await asyncio.gather(*(probe.current() for _ in range(5))))

    with caplog.at_level(logging.INFO, logger="mta.policy.dnssec_probe"):
        statuses = asyncio.run(main())
    assert len(asker.asked) == 1  # one probe for all five
    assert {s.state for s in statuses} == {"unverifiable"}
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "dns.dnssec_probe.failed"
    assert warning.__dict__["resolver"] == "127.0.0.53:5353"
    assert warning.__dict__["probe"] == "ns:."
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mta.policy.dnssec_probe"):
        cleared = asyncio.run(probe.check())
    assert (cleared.ok, cleared.failures, cleared.probes) == (True, 1, 2)
    assert [r.getMessage() for r in caplog.records] == ["dns.dnssec_probe.ok"]


def test_no_probe_configured_is_never_asked() -> None:
    asker = FakeAsker([])
    probe = DnssecProbe(asker, None, "127.0.0.1:53", FakeClock())
    status = asyncio.run(probe.current())
    assert (status.ok, status.state, asker.asked) == (True, "not-probed", [])
    asyncio.run(probe.run())  # returns at once
