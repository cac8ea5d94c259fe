"""Transport receipts through a real relay process and a real TLS receiver: ``mta receipts
show`` tells the story of a message, ``mta receipts verify`` finds tampering."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mta.report.receipts import Frame, walk
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, policy, wait_until

SENDER = "alice@sender.test"
BUSY = "450 4.2.1 mailbox busy, try later"


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.stop()


def _send(relay: RelayProcess, rcpts: list[str], subject: str) -> str:
    """Send one message; its queue id from the 250 reply to DATA."""
    with relay.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250
        return text.decode().rsplit(" ", 1)[-1]


def _show(relay: RelayProcess, qid: str) -> list[dict[str, object]]:
    shown = relay.mta("receipts", "show", qid, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["qid"] == qid
    events: list[dict[str, object]] = doc["events"]
    return events


def _verify(relay: RelayProcess) -> subprocess.CompletedProcess[str]:
    return relay.mta("receipts", "verify")


def _frames(path: Path) -> tuple[bytes, list[Frame]]:
    data = path.read_bytes()
    return data, [item for item in walk(io.BytesIO(data).read) if isinstance(item, Frame)]


@pytest.mark.timeout(120)
def test_show_tells_the_story_and_verify_finds_tampering(
    tls_ca: trustme.CA, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca, rcpt_reply={"carol@dest.test": BUSY}) as rx:
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}"))
        processes.append(relay)
        relay.start()
        qid = _send(relay, ["bob@dest.test", "carol@dest.test"], "first")
        rx.wait_for(1, timeout=20)

        def attempted() -> bool:
            return len(_show(relay, qid)) == 2

        wait_until(attempted, 20, "the attempt in the receipts")  # the relay flushes first
        received, attempt = _show(relay, qid)
        assert received["type"] == "received"
        assert received["listener"] == f"127.0.0.1:{relay.port}"
        assert str(received["tls"]).startswith("TLSv1.")
        assert received["recipients"] == 2
        assert attempt["type"] == "attempt"
        assert attempt["domain"] == "dest.test"
        outcomes = {r["rcpt"]: r["outcome"] for r in attempt["results"]}
        assert outcomes == {"bob@dest.test": "sent", "carol@dest.test": "deferred"}
        [session] = attempt["sessions"]
        assert (session["mx"], session["address"]) == ("127.0.0.1", "127.0.0.1")
        assert session["tls"]["version"].startswith("TLSv1.")
        assert session["tls"]["cipher"]
        assert session["tls"]["peer_key"]
        assert session["policy"]["source"] in ("local", "default")
        assert session["policy"]["level"] == "encrypt"
        assert session["result_type"] is None

        text = relay.mta("receipts", "show", qid)
        assert text.returncode == 0, text.stderr
        assert "received on 127.0.0.1" in text.stdout
        assert "attempt 1 to dest.test" in text.stdout
        assert "carol@dest.test" in text.stdout
        assert "deferred" in text.stdout

        ok = _verify(relay)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "ok: 3 entries in 1 files"

        # A restart continues the chain.
        assert relay.terminate() == 0
        relay.start()
        second = _send(relay, ["bob@dest.test"], "second")
        rx.wait_for(2, timeout=20)
        wait_until(lambda: len(_show(relay, second)) == 2, 20, "the second attempt")
        assert relay.terminate() == 0
    ok = _verify(relay)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok: 5 entries in 1 files"), ok.stderr

    [path] = sorted((relay.home / "spool" / "receipts").iterdir())
    intact, frames = _frames(path)
    assert len(frames) == 5

    def damaged(data: bytes) -> str:
        path.write_bytes(data)
        bad = _verify(relay)
        path.write_bytes(intact)
        assert bad.returncode == 1
        assert bad.stdout == ""
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1, bad.stderr
        assert lines[0].startswith(f"mta: {path}: entry ")
        return lines[0]

    flipped = bytearray(intact)
    flipped[frames[2].offset + 60] ^= 0x01
    assert ": entry 3: " in damaged(bytes(flipped))

    def cut(index: int) -> tuple[bytes, bytes, bytes]:
        start = frames[index].offset
        end = frames[index + 1].offset if index + 1 < len(frames) else len(intact)
        return intact[:start], intact[start:end], intact[end:]

    before, dropped, after = cut(2)
    assert "entry 3: sequence number 4, expected 3" in damaged(before + after)

    before, one, rest = cut(1)
    two, after = rest[: len(dropped)], rest[len(dropped) :]
    assert two == dropped
    assert "entry 2: sequence number 3, expected 2" in damaged(before + two + one + after)

    assert _verify(relay).returncode == 0  # the file as it was
