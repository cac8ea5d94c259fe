"""``mta queue show|hold|release|delete|requeue`` against a real relay process and a real
receiving server: with the relay running (through its control socket) and stopped (on
the spool files), across ``kill -9``.

Mail is kept in the queue by a receiver that answers ``450`` for the recipient until the
test lets it through; the relay then retries only after an hour (``retry_min``), so
anything that arrives sooner was made due by the command under test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mta.deliver.pool import IDLE_TIME
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, policy, wait_until

SENDER = "alice@sender.test"
BUSY = "450 4.2.1 mailbox busy, try later"
QUIET = 1.5  # seconds with nothing arriving that should not arrive


def message(subject: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: bob@dest.test\r\nSubject: {subject}\r\n\r\n"
        f"secret body of {subject}\r\n"
    )


@pytest.fixture
def processes() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for process in started:
        process.stop()


def deferred(relay: RelayProcess, subject: str, rcpt: str) -> str:
    """Send a message that the receiver defers; its queue id once the deferral is in."""
    before = {entry["qid"] for entry in relay.queue()}
    relay.send(SENDER, [rcpt], message(subject))

    def new_deferred() -> list[dict[str, object]]:
        return [e for e in relay.queue() if e["qid"] not in before and e["last_error"]]

    wait_until(lambda: new_deferred(), 20, f"{subject} deferred")
    # Let the connection of that refused transaction leave the relay's connection cache:
    # reused at once, its next MAIL met "503 nested MAIL" (reported separately).
    time.sleep(IDLE_TIME + 0.5)
    return str(new_deferred()[0]["qid"])


def quiet(receiver: Receiver, count: int) -> None:
    """Nothing beyond ``count`` messages arrives for ``QUIET`` seconds."""
    time.sleep(QUIET)
    assert len(receiver.messages) == count, [m.content[:200] for m in receiver.messages]


def ok(relay: RelayProcess, *args: str) -> str:
    done = relay.mta(*args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


@pytest.mark.timeout(120)
def test_hold_survives_kill9_and_release_delivers(
    tls_ca: trustme.CA, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca, rcpt_reply={"bob@dest.test": BUSY}) as rx:
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}"))
        processes.append(relay)
        relay.start()
        qid = deferred(relay, "held", "bob@dest.test")
        assert f"held: {qid}" in ok(relay, "queue", "hold", qid)
        assert "queue.held" in relay.log
        rx.rcpt_reply.clear()  # the receiver takes it now: only the hold keeps it back
        ok(relay, "queue", "flush")
        quiet(rx, 0)
        [entry] = relay.queue()
        assert entry["held"] is True
        assert entry["next_attempt"] is None
        assert f"{qid}!" in ok(relay, "queue", "list")

        relay.kill9()
        relay.start()
        [entry] = relay.queue()
        assert (entry["qid"], entry["held"]) == (qid, True)
        ok(relay, "queue", "flush")
        quiet(rx, 0)

        assert f"released: {qid}" in ok(relay, "queue", "release", "--all")
        [got] = rx.wait_for(1, timeout=20)
        assert b"Subject: held" in got.content
        wait_until(lambda: not relay.queue(), 10, "the queue drained")


@pytest.mark.timeout(120)
def test_delete_requeue_and_show_with_the_relay_running(
    tls_ca: trustme.CA, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    busy = {"bob@dest.test": BUSY, "carol@dest.test": BUSY}
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca, rcpt_reply=busy) as rx:
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}"))
        processes.append(relay)
        relay.start()
        doomed = deferred(relay, "doomed", "bob@dest.test")
        kept = deferred(relay, "kept", "carol@dest.test")

        shown = json.loads(ok(relay, "queue", "show", kept, "--json"))
        assert shown["envelope"]["mail_from"] == SENDER
        assert shown["envelope"]["rcpt_tos"] == ["carol@dest.test"]
        [rcpt] = shown["recipients"]
        assert (rcpt["rcpt"], rcpt["status"], rcpt["attempts"]) == ("carol@dest.test", "pending", 1)
        assert rcpt["next_attempt"] > time.time() + 3000  # an hour's backoff
        assert "450 4.2.1" in rcpt["last_error"]
        assert "Subject: kept" in shown["headers"]
        assert "body" not in shown
        assert "queue.show.body" not in relay.log

        with_body = json.loads(ok(relay, "queue", "show", kept, "--json", "--body"))
        assert with_body["body"] == "secret body of kept\r\n"
        wait_until(lambda: f"queue.show.body qid={kept}" in relay.log, 5, "the body logged")
        assert "secret body" not in relay.log

        deleted = relay.mta("queue", "delete", doomed, "nosuchqid")
        assert deleted.returncode == 1  # one of them was not queued
        assert f"deleted: {doomed}" in deleted.stdout
        assert "nosuchqid: not in the queue" in deleted.stderr
        assert f"queue.deleted qid={doomed}" in relay.log
        assert [e["qid"] for e in relay.queue()] == [kept]
        assert not (relay.home / "spool" / "msg" / doomed).exists()

        rx.rcpt_reply.clear()
        assert f"requeued: {kept}" in ok(relay, "queue", "requeue", kept)
        [got] = rx.wait_for(1, timeout=20)  # now, not in an hour
        assert b"Subject: kept" in got.content
        wait_until(lambda: not relay.queue(), 10, "the queue drained")
        quiet(rx, 1)  # and no DSN for the deleted one
        assert "schedule.dsn.queued" not in relay.log


@pytest.mark.timeout(120)
def test_the_same_commands_with_the_relay_stopped(
    tls_ca: trustme.CA, tmp_path: Path, processes: list[RelayProcess]
) -> None:
    busy = {"bob@dest.test": BUSY, "carol@dest.test": BUSY, "dave@dest.test": BUSY}
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca, rcpt_reply=busy) as rx:
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}"))
        processes.append(relay)
        relay.start()
        held = deferred(relay, "held", "bob@dest.test")
        doomed = deferred(relay, "doomed", "carol@dest.test")
        requeued = deferred(relay, "requeued", "dave@dest.test")
        assert relay.terminate() == 0

        out = ok(relay, "queue", "hold", held)
        assert "relay not running" in out
        assert f"held: {held}" in out
        deleting = relay.mta("queue", "delete", doomed)
        assert deleting.returncode == 0, deleting.stderr
        assert f"queue.deleted qid={doomed}" in deleting.stderr  # logged by the command
        assert f"requeued: {requeued}" in ok(relay, "queue", "requeue", requeued)
        listed = {e["qid"]: e for e in relay.queue()}
        assert set(listed) == {held, requeued}
        assert listed[held]["held"] is True
        assert listed[requeued]["next_attempt"] <= time.time()

        shown = json.loads(ok(relay, "queue", "show", held, "--json"))
        assert shown["held"] is True
        assert "body" not in shown
        showing = relay.mta("queue", "show", held, "--body")
        assert showing.returncode == 0, showing.stderr
        assert "secret body of held" in showing.stdout
        assert f"queue.show.body qid={held}" in showing.stderr
        assert "secret body" not in showing.stderr

        rx.rcpt_reply.clear()
        relay.start()  # the requeued message goes at once; the held one stays
        [got] = rx.wait_for(1, timeout=20)
        assert b"Subject: requeued" in got.content
        ok(relay, "queue", "flush")
        quiet(rx, 1)
        assert relay.terminate() == 0

        assert f"released: {held}" in ok(relay, "queue", "release", "--domain", "dest.test")
        relay.start()
        got = rx.wait_for(2, timeout=20)[1]
        assert b"Subject: held" in got.content
        wait_until(lambda: not relay.queue(), 10, "the queue drained")
        quiet(rx, 2)  # no DSN for the deleted one
