"""A relay group (``[server] workers = 2``) as an operator runs it: real processes.

The supervisor (``mta run``) starts two workers, each a whole relay on its own spool
shard, listening on the same port (SO_REUSEPORT). Mail goes through both over STARTTLS;
``mta stats``, ``queue`` and ``reload`` answer for both shards through the group's
control socket; records move between shards when ``workers`` changes, and a TLS
report sent before the change is not sent again after it; the key tools count every
shard; SIGTERM drains every process and a killed supervisor takes its
workers with it (they drain).
"""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, policy, wait_until
from tests.integration.reportlab import STS, WAIT, report_lab, send, shown, wait_counts

SENDER = "group@sender.test"
MESSAGES = 12  # each on its own connection: the kernel spreads them over the workers


def message(number: int) -> str:
    return f"From: {SENDER}\r\nTo: sink@dest.test\r\nSubject: group {number}\r\n\r\nbody\r\n"


def send_each_on_its_own_connection(process: RelayProcess, count: int) -> None:
    for number in range(count):
        process.send(SENDER, ["sink@dest.test"], message(number))


def dead_end() -> str:
    """A route to a port nothing listens on: every message is deferred for an hour."""
    return policy(f"[127.0.0.1]:{free_port()}")


def queued_in(process: RelayProcess, shard: int) -> list[str]:
    directory = process.home / "spool" / "shards" / str(shard) / "msg"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def stats(process: RelayProcess) -> dict[str, str]:
    answer = process.mta("stats")
    assert answer.returncode == 0, answer.stderr
    return dict(word.split("=", 1) for word in answer.stdout.split())


@pytest.fixture
def started() -> Iterator[list[RelayProcess]]:
    processes: list[RelayProcess] = []
    yield processes
    for process in processes:
        process.stop()


@pytest.mark.timeout(90)
def test_a_group_relays_over_starttls_and_both_workers_take_mail(
    tls_ca: trustme.CA, tmp_path: Path, started: list[RelayProcess]
) -> None:
    metrics_port = free_port()
    with Receiver("127.0.0.151", tls="fs", ca=tls_ca) as receiver:
        extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        nexthop = f"[127.0.0.151]:{receiver.port}"
        process = RelayProcess(tmp_path, policy(nexthop, extra=extra), workers=2)
        started.append(process)
        process.start()
        assert set(process.worker_pids()) == {0, 1}
        send_each_on_its_own_connection(process, MESSAGES)
        wait_until(lambda: len(receiver.messages) == MESSAGES, 30, "every message relayed")
        assert all(got.tls_version for got in receiver.messages)  # STARTTLS outbound
        # Each worker reuses its outbound connections (its own cache): far fewer than one
        # per message.
        assert receiver.connections <= 4, receiver.connections
        # Each worker received some (each shard's receipt log has entries).
        for shard in (0, 1):
            receipts = process.home / "spool" / "shards" / str(shard) / "receipts"
            wait_until(
                lambda r=receipts: any(f.stat().st_size for f in r.glob("*-*-*")),  # type: ignore[misc]
                10,
                f"receipts of worker {shard}",
            )
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        text = scraped.read().decode()
        received = re.findall(r"^mta_messages_received_total\{[^}]*\} (\S+)$", text, re.M)
        assert sum(float(v) for v in received) == MESSAGES, text
        assert re.search(r"^mta_group_workers_up 2\.0$", text, re.M), text
        report = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/report", timeout=30)
        assert "<html" in report.read().decode()  # worker 0's, from both shards' receipts
        verified = process.mta("receipts", "verify")
        assert verified.returncode == 0, verified.stderr
        assert process.terminate() == 0
    assert process.log.count("mta.stopped") == 3  # both workers, then the supervisor


@pytest.mark.timeout(90)
def test_the_group_keeps_to_the_per_destination_limit_as_a_whole(
    tls_ca: trustme.CA, tmp_path: Path, started: list[RelayProcess]
) -> None:
    """``max_per_destination = 2`` over two workers is one connection each: a slow
    receiver sees at most two, where two workers with the whole limit each opened four."""
    with Receiver("127.0.0.152", tls="fs", ca=tls_ca, data_delay=0.5) as receiver:
        text = policy(f"[127.0.0.152]:{receiver.port}")
        text = text.replace("[outbound]\n", "[outbound]\nmax_per_destination = 2\n", 1)
        process = RelayProcess(tmp_path, text, workers=2)
        started.append(process)
        process.start()
        send_each_on_its_own_connection(process, MESSAGES)
        wait_until(lambda: len(receiver.messages) == MESSAGES, 60, "every message relayed")
        assert receiver.connections <= 2, receiver.connections


@pytest.mark.timeout(120)
def test_the_group_socket_speaks_for_every_shard(
    tmp_path: Path, started: list[RelayProcess]
) -> None:
    process = RelayProcess(tmp_path, dead_end(), workers=2)
    started.append(process)
    process.start()
    send_each_on_its_own_connection(process, MESSAGES)
    wait_until(lambda: stats(process)["queued"] == str(MESSAGES), 20, "all queued")
    figures = stats(process)
    assert figures["workers"] == "2"
    per_worker = [int(figures[f"worker{k}.queued"]) for k in (0, 1)]
    assert sum(per_worker) == MESSAGES, figures
    assert min(per_worker) > 0, figures
    assert len(process.queue()) == MESSAGES

    in_shard_1 = queued_in(process, 1)[0]
    shown = process.mta("queue", "show", in_shard_1, "--body")
    assert shown.returncode == 0, shown.stderr
    assert "body" in shown.stdout
    assert f"queue.show.body qid={in_shard_1}" in process.log  # logged by its worker
    held = process.mta("queue", "hold", in_shard_1)
    assert held.returncode == 0, held.stderr
    assert f"held: {in_shard_1}" in held.stdout
    assert [e["held"] for e in process.queue() if e["qid"] == in_shard_1] == [True]
    every = process.mta("queue", "hold", "--all")
    assert f"-- {MESSAGES - 1} message(s) held" in every.stdout, every.stdout
    missing = process.mta("queue", "release", "A" * 20)
    assert missing.returncode == 1
    assert "not in the queue" in missing.stderr

    reloaded = process.mta("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert "workers=2" in reloaded.stdout
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)  # as `mta reload`: each worker reloads
    wait_until(lambda: process.log.count("mta.reloaded") == 4, 20, "SIGHUP's reloads")
    process.workers = 3
    process.write_policy(dead_end())
    refused = process.mta("reload")
    assert refused.returncode == 1
    assert "server.workers: changed from 2 to 3: restart the relay for that" in refused.stderr

    pids = process.worker_pids().values()
    assert process.terminate() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert process.log.count("mta.stopped") == 3


@pytest.mark.timeout(150)
def test_records_move_between_shards_when_workers_change(
    tls_ca: trustme.CA, tmp_path: Path, started: list[RelayProcess]
) -> None:
    process = RelayProcess(tmp_path, dead_end(), workers=2)
    started.append(process)
    process.start()
    send_each_on_its_own_connection(process, MESSAGES)
    assert process.terminate() == 0
    qids = {e["qid"] for e in process.queue()}
    assert len(qids) == MESSAGES
    assert {p.name for p in process.spooled("msg")} == qids

    process.workers = 1  # 2 -> 1: every record into the spool root
    process.write_policy(dead_end())
    process.start()
    assert {e["qid"] for e in process.queue()} == qids
    assert {p.name for p in (process.home / "spool" / "msg").iterdir()} == qids
    assert queued_in(process, 0) == queued_in(process, 1) == []
    assert process.terminate() == 0

    process.workers = 2  # 1 -> 2: out of the root into the shards
    with Receiver("127.0.0.152", tls="fs", ca=tls_ca) as receiver:
        process.write_policy(policy(f"[127.0.0.152]:{receiver.port}"))
        process.start()
        assert not any((process.home / "spool" / "msg").iterdir())
        assert set(queued_in(process, 0)) | set(queued_in(process, 1)) == qids
        flushed = process.mta("queue", "flush")
        assert flushed.returncode == 0, flushed.stderr
        wait_until(lambda: len(receiver.messages) == MESSAGES, 30, "the adopted mail delivered")
        wait_until(lambda: not process.spooled("msg"), 10, "the shards drained")


def receipts_entries(process: RelayProcess) -> int:
    """``mta receipts verify``: how many entries every receipt chain holds (all sound)."""
    verified = process.mta("receipts", "verify")
    assert verified.returncode == 0, verified.stderr
    return int(verified.stdout.split()[1])


def accepted(process: RelayProcess) -> list[str]:
    """The queue ids the relay logged as accepted, in order."""
    return re.findall(r"receive\.accepted qid=(\S+)", process.log)


def restart_with(process: RelayProcess, workers: int, policy_text: str) -> None:
    assert process.terminate() == 0
    process.workers = workers
    process.write_policy(policy_text)
    process.start()


@pytest.mark.timeout(240)
def test_a_report_sent_before_the_worker_count_changed_is_not_sent_again(
    tmp_path: Path, started: list[RelayProcess]
) -> None:
    """The sent-state is the group's (``SentState``): 1 -> 2 -> 1 workers, one POST; the
    counts and receipts of the days before each change are still seen."""
    with report_lab(tmp_path / "lab") as lab:
        process = RelayProcess(tmp_path, lab.relay_policy(), workers=1)
        started.append(process)
        process.start()
        send(process, STS, 2)
        lab.mx[STS].wait_for(2, WAIT)
        wait_counts(process, {STS: (2, 0)})
        first = process.mta("tlsrpt", "send")
        assert first.stdout.strip() == "tlsrpt: sent=1 failed=0 already=0 no_record=0"
        assert len(lab.collector.posts) == 1
        entries = receipts_entries(process)
        qid = accepted(process)[0]

        restart_with(process, 2, lab.relay_policy())  # 1 -> 2
        assert set(process.worker_pids()) == {0, 1}
        assert shown(process) == {STS: ((2, 0), "sent")}
        again = process.mta("tlsrpt", "send")
        assert again.stdout.strip() == "tlsrpt: sent=0 failed=0 already=1 no_record=0"
        assert receipts_entries(process) >= entries
        assert qid in process.mta("receipts", "show", qid).stdout
        send(process, STS, 1)  # the group's own sessions join the day's
        lab.mx[STS].wait_for(3, WAIT)
        wait_counts(process, {STS: (3, 0)})
        entries = receipts_entries(process)

        restart_with(process, 1, lab.relay_policy())  # 2 -> 1
        assert shown(process) == {STS: ((3, 0), "sent")}
        last = process.mta("tlsrpt", "send")
        assert last.stdout.strip() == "tlsrpt: sent=0 failed=0 already=1 no_record=0"
        assert receipts_entries(process) >= entries
        assert qid in process.mta("receipts", "show", qid).stdout
        assert len(lab.collector.posts) == 1  # one report for the day, whatever the count


@pytest.mark.timeout(120)
def test_key_tools_count_and_keep_every_shard(tmp_path: Path, started: list[RelayProcess]) -> None:
    process = RelayProcess(tmp_path, dead_end(), workers=2)
    started.append(process)
    process.start()
    send_each_on_its_own_connection(process, MESSAGES)
    wait_until(lambda: stats(process)["queued"] == str(MESSAGES), 20, "all queued")
    old_key = process.mta("keys", "list").stdout.split()[0]
    rotated = process.mta("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "running relay reloaded its keys" in rotated.stdout
    assert process.terminate() == 0

    records = len(process.spooled("msg")) + len(process.spooled("state"))
    listed = process.mta("keys", "list").stdout
    assert f"{old_key}  old     {records} spool record(s)" in listed, listed
    pruned = process.mta("keys", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "dropped 0 unreferenced key(s)" in pruned.stdout  # every shard's records need it
    rewrapped = process.mta("keys", "rewrap")
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert f"re-wrapped {records} record(s)" in rewrapped.stdout
    assert f"{old_key}  old     0 spool record(s)" in process.mta("keys", "list").stdout
    process.start()  # every shard opens under the ring as it is now
    assert len(process.queue()) == MESSAGES


@pytest.mark.timeout(60)
def test_workers_drain_when_their_supervisor_is_killed(
    tmp_path: Path, started: list[RelayProcess]
) -> None:
    process = RelayProcess(tmp_path, dead_end(), workers=2)
    started.append(process)
    process.start()
    pids = list(process.worker_pids().values())
    assert len(pids) == 2
    process.kill9()
    wait_until(
        lambda: (
            not any(Path(f"/proc/{pid}").exists() for pid in pids)
            or all(_zombie(pid) for pid in pids)
        ),
        40,
        "the orphaned workers to drain and exit",
    )
    assert process.log.count("mta.worker.orphaned") == 2
    process.start()  # the group starts again on the same spool
    assert json.loads(process.mta("queue", "list", "--json").stdout) == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_the_worker_count_is_the_cpu_count_unless_set(tmp_path: Path) -> None:
    """``[server] workers`` unset: one per CPU (``mta stats`` says how many)."""
    process = RelayProcess(tmp_path, dead_end(), server="allow_root = true\n# workers")
    try:
        process.start()
        assert stats(process).get("workers", "1") == str(os.cpu_count() if os.cpu_count() else 1)
    finally:
        process.stop()


def test_a_worker_that_cannot_start_stops_the_group_with_its_one_line(tmp_path: Path) -> None:
    process = RelayProcess(tmp_path, dead_end(), workers=2)
    process.write_policy(dead_end() + '[[listener]]\naddress = "192.0.2.1"\nport = 2525\n')
    result = process.mta("run")
    assert result.returncode == 2
    assert f"mta: {process.policy_file}: listener[1]: cannot listen on 192.0.2.1:2525" in (
        result.stderr
    )
    assert "mta.group.failed worker=" in result.stderr
