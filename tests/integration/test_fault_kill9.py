"""Fault: ``kill -9`` at random moments under load loses no acknowledged message.

Several client sessions send a bounded load of small messages over STARTTLS to the
relay process, which relays them over STARTTLS to a receiving server. Meanwhile the
test kills the relay with SIGKILL two or three times, at random moments, and starts it
again on the same spool each time. Against a relay group (``[server] workers = 2``)
the test kills each worker in turn (the supervisor starts it again), or the
supervisor (its workers drain; the test starts the group again), or every process.
Every message carries a unique token in its Message-ID. The clients record each token
that got ``250``; at the end every one of them must have reached the receiver. A token
may arrive twice only if the relay (or the group's worker) was killed between the two
arrivals (it was in flight: delivered, but not yet removed from the spool), never
otherwise, and nothing arrives that no client sent.

The random moments come from a seed printed with the figures (``-s`` shows them), so
a failing run can be replayed: ``MTA_KILL9_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import smtplib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, client_tls, policy, wait_until

SENDER = "load@sender.test"
MESSAGES = 2000
SESSIONS = 8
LOAD_DEADLINE = 45.0  # seconds for the clients to get every message acknowledged
DRAIN_TIMEOUT = 30.0  # seconds for the last acknowledged message to arrive after the load
SETTLE = 0.5  # the receiver is quiet this long after a kill before arrivals are counted
SETTLE_MAX = 5.0
TOKEN = re.compile(rb"Message-ID: <([0-9a-f]{32})@load\.test>")


def message(token: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: sink@dest.test\r\nSubject: load\r\n"
        f"Message-ID: <{token}@load.test>\r\n\r\nload test {token}\r\n"
    )


@dataclass
class Load:
    """What the clients did: tokens acknowledged (250) and tokens tried without a 250."""

    target: int
    acked: list[str] = field(default_factory=list)
    unacked: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, token: str, ok: bool, error: str = "") -> None:
        with self.lock:
            (self.acked if ok else self.unacked).append(token)
            if error:
                self.errors[error] += 1

    @property
    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


def connect(port: int) -> smtplib.SMTP | None:
    """A STARTTLS session to the relay, or None (its socket closed) when the relay is away."""
    try:
        smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="load.test", timeout=10)
    except (OSError, smtplib.SMTPException):
        return None  # smtplib closes the socket of a failed connect itself
    try:
        smtp.starttls(context=client_tls())
    except (OSError, smtplib.SMTPException):
        smtp.close()  # a half-made session must not leak its socket
        return None
    return smtp


def client(port: int, share: int, load: Load) -> None:
    """One client: a STARTTLS session reused for message after message, reconnecting
    whenever the relay goes away, until ``share`` messages got ``250`` (or the deadline)."""
    deadline = time.monotonic() + LOAD_DEADLINE
    smtp: smtplib.SMTP | None = None
    done = 0
    while done < share and time.monotonic() < deadline and not load.stop.is_set():
        if smtp is None:
            smtp = connect(port)
            if smtp is None:
                time.sleep(0.05)
                continue
        token = uuid.uuid4().hex
        try:
            refused = smtp.sendmail(SENDER, ["sink@dest.test"], message(token))
        except (OSError, smtplib.SMTPException) as err:
            load.record(token, ok=False, error=type(err).__name__)
            with contextlib.suppress(OSError):
                smtp.close()
            smtp = None
            continue
        assert not refused, refused
        load.record(token, ok=True)
        done += 1
    if smtp is not None:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


def tokens_of(receiver: Receiver) -> list[str]:
    """The token of each arrival, in order of arrival (the receiver appends in order)."""
    out = []
    for got in list(receiver.messages):
        match = TOKEN.search(got.content)
        assert match is not None, got.content[:300]
        out.append(match.group(1).decode())
    return out


def settle(receiver: Receiver) -> int:
    """Wait until nothing more arrives (what a dead relay had sent is in); the count."""
    deadline = time.monotonic() + SETTLE_MAX
    count = len(receiver.messages)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = len(receiver.messages)
        if now != count:
            count, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE:
            break
    return count


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.stop()


def kill(process: RelayProcess, target: str, number: int) -> None:
    """SIGKILL what ``target`` names: the single relay, a group's worker (each in turn;
    its supervisor starts it again), a group's supervisor (its workers drain), or every
    process of a group at once."""
    if target == "worker":
        process.kill9_worker(number % 2)
    elif target == "all":
        process.kill9_all()
    else:
        process.kill9()


def recover(process: RelayProcess, target: str, number: int) -> None:
    """Start the relay again, or, for a worker, wait for its supervisor to have."""
    if target != "worker":
        process.start()
        return
    wait_until(
        lambda: (
            process.log.count("mta.worker.restarted") > number and len(process.worker_pids()) == 2
        ),
        20,
        "the supervisor to start the killed worker again",
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("target", "workers"),
    [("relay", 1), ("worker", 2), ("supervisor", 2), ("all", 2)],
)
def test_kill9_under_load_loses_no_acknowledged_message(
    tls_ca: trustme.CA, tmp_path: Path, relay: list[RelayProcess], target: str, workers: int
) -> None:
    seed = int(os.environ.get("MTA_KILL9_SEED") or random.SystemRandom().randrange(1 << 32))
    rand = random.Random(seed)
    kills = rand.choice((2, 3))
    # Kill when so many messages have been acknowledged (spread over the load), plus a
    # random few milliseconds: the relay is then receiving, storing and delivering at once.
    thresholds = sorted(rand.sample(range(MESSAGES // 10, MESSAGES * 9 // 10), kills))
    jitters = [rand.uniform(0.0, 0.05) for _ in range(kills)]

    with Receiver("127.0.0.150", tls="fs", ca=tls_ca) as receiver:
        process = RelayProcess(tmp_path, policy(f"[127.0.0.150]:{receiver.port}"), workers=workers)
        relay.append(process)
        process.start()
        load = Load(MESSAGES)
        shares = [MESSAGES // SESSIONS + (i < MESSAGES % SESSIONS) for i in range(SESSIONS)]
        threads = [
            threading.Thread(target=client, args=(process.port, share, load), daemon=True)
            for share in shares
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
            # Arrivals counted at each kill and once what the killed process sent is in
        # (one count for a whole relay: taken once nothing more arrives).
        marks: list[tuple[int, int]] = []
        try:
            for number, (threshold, jitter) in enumerate(zip(thresholds, jitters, strict=True)):
                wait_until(
                    lambda t=threshold: load.acked_count >= t,  # type: ignore[misc]
                    LOAD_DEADLINE,
                    f"{threshold} acknowledged messages",
                )
                time.sleep(jitter)
                at_kill = len(receiver.messages)
                kill(process, target, number)
                if target == "worker":  # the other worker goes on delivering meanwhile
                    time.sleep(SETTLE)
                    marks.append((at_kill, len(receiver.messages)))
                else:
                    settled = settle(receiver)
                    marks.append((settled, settled))
                recover(process, target, number)
            for thread in threads:
                thread.join(LOAD_DEADLINE)
        finally:
            load.stop.set()
        load_seconds = time.monotonic() - started
        assert all(not thread.is_alive() for thread in threads)
        assert len(load.acked) == MESSAGES, (
            f"only {len(load.acked)} of {MESSAGES} acknowledged in {LOAD_DEADLINE}s "
            f"(seed {seed}); client errors: {dict(load.errors)}"
        )

        # Anything deferred by a kill waits for retry_min: retry it now.
        flushed = process.mta("queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
        acked = set(load.acked)
        with contextlib.suppress(AssertionError):  # the counts below say what is missing
            wait_until(
                lambda: acked <= set(tokens_of(receiver)) and not process.spooled("msg"),
                DRAIN_TIMEOUT,
                "every acknowledged message at the receiver, and the spool drained",
            )
        arrivals = tokens_of(receiver)

    sent = acked | set(load.unacked)
    counts = Counter(arrivals)
    duplicates = {token: n for token, n in counts.items() if n > 1}
    figures = (
        f"target={target} seed={seed} kills={kills} at acked={thresholds} load={load_seconds:.1f}s "
        f"acked={len(acked)} unacked={len(load.unacked)} arrived={len(counts)} "
        f"arrivals={len(arrivals)} duplicates={len(duplicates)} "
        f"unacked_arrived={len(set(load.unacked) & set(counts))} "
        f"client_errors={dict(load.errors)}"
    )
    print(figures)
    lost = acked - set(counts)
    assert not lost, f"lost {len(lost)} acknowledged, e.g. {sorted(lost)[:3]} ({figures})"
    assert set(counts) <= sent, f"arrived but never sent ({figures})"
    # A second arrival of a token needs a kill between the two: the relay died after
    # the receiver took it and before the spool forgot it. Never otherwise.
    positions: dict[str, list[int]] = {}
    for index, token in enumerate(arrivals):
        positions.setdefault(token, []).append(index)
    for token in duplicates:
        seen = positions[token]
        for first, again in itertools.pairwise(seen):
            assert any(first < sent_in and at_kill <= again for at_kill, sent_in in marks), (
                f"{token} arrived at {first} and again at {again} with no kill between "
                f"(kills after arrivals {marks}; {figures})"
            )
    # At most the deliveries in flight at each kill (outbound.max_connections = 100).
    assert len(duplicates) <= 100 * kills, figures
    # Everything delivered has left the spool, and no half-written record stayed.
    assert not process.spooled("msg"), figures
    assert not process.spooled("tmp"), figures
