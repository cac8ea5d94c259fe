"""``mta run`` is two processes (``mta.processes``): a receiver and a queue manager.

Each test runs the real thing: ``python -m mta run`` with a policy file. What must hold:
either process dying takes the other down (nothing keeps listening without a queue
manager, nothing keeps delivering without a receiver), no acknowledged message is lost
either way, and start-up failures of the receiver are reported as the relay's own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, wait_until

SENDER = "alice@sender.test"


def policy(nexthop: str) -> str:
    return (
        '[outbound]\ndefault_level = "encrypt"\nretry_min = "1h"\nretry_max = "2h"\n\n'
        f'[[route]]\ndomain = "*"\nnexthop = "{nexthop}"\n'
    )


def message(body: str) -> str:
    return f"From: {SENDER}\r\nTo: bob@dest.test\r\nSubject: s\r\n\r\n{body}\r\n"


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat.rpartition(")")[2].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    tarpit = socket.socket()  # accepts TCP, never answers: deliveries stay in flight
    tarpit.bind(("127.0.0.31", 0))
    tarpit.listen(16)
    process = RelayProcess(tmp_path, policy(f"[127.0.0.31]:{tarpit.getsockname()[1]}"))
    yield process
    process.stop()
    tarpit.close()


def receiver_of(relay: RelayProcess) -> int:
    assert relay.proc is not None
    (child,) = children(relay.proc.pid)
    return child


def deliver_everything(relay: RelayProcess, ca: trustme.CA, count: int) -> list[bytes]:
    """Restart ``relay`` towards a real receiver; return what arrives."""
    with Receiver("127.0.0.31", tls="fs", ca=ca) as receiver:
        relay.write_policy(policy(f"[127.0.0.31]:{receiver.port}"))
        relay.start()
        return [got.content for got in receiver.wait_for(count, timeout=30)]


def test_mta_run_is_a_manager_and_one_receiver(relay: RelayProcess) -> None:
    relay.start()
    receiver = receiver_of(relay)
    stats = relay.mta("stats")
    assert stats.returncode == 0, stats.stderr
    figures = dict(item.split("=", 1) for item in stats.stdout.split() if "=" in item)
    assert int(figures["tasks"]) >= 1  # the manager's own figures
    assert int(figures["receiver_tasks"]) >= 1  # and the receiver's, asked over the link
    assert int(figures["receiver_fds"]) > 0
    assert Path(f"/proc/{receiver}/exe").resolve() == Path(sys.executable).resolve()


def test_killing_the_manager_takes_the_receiver_down_and_loses_nothing(
    relay: RelayProcess, tls_ca: trustme.CA
) -> None:
    relay.start()
    receiver = receiver_of(relay)
    relay.send(SENDER, ["bob@dest.test"], message("before the kill"))
    relay.kill9()
    wait_until(lambda: not alive(receiver), 5, "the receiver to die with its manager")
    arrived = deliver_everything(relay, tls_ca, 1)  # on the same port: it was released
    assert b"before the kill" in arrived[0]


def test_killing_the_receiver_stops_the_manager_and_loses_nothing(
    relay: RelayProcess, tls_ca: trustme.CA
) -> None:
    relay.start()
    relay.send(SENDER, ["bob@dest.test"], message("accepted by the receiver"))
    os.kill(receiver_of(relay), signal.SIGKILL)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=40) == 1
    assert "mta.receiver_exited" in relay.log
    arrived = deliver_everything(relay, tls_ca, 1)
    assert b"accepted by the receiver" in arrived[0]


def test_sigterm_stops_both_with_status_0(relay: RelayProcess) -> None:
    relay.start()
    receiver = receiver_of(relay)
    assert relay.terminate() == 0
    assert not alive(receiver)
    assert "mta.stopped" in relay.log


def test_a_listener_that_cannot_bind_fails_start_with_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen(1)
    port = taken.getsockname()[1]
    relay = RelayProcess(tmp_path, policy("[127.0.0.31]:25"), port=port)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mta", "run", "--config", str(relay.policy_file)],
            env={**os.environ, "MTA_HOME": str(relay.home)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        taken.close()
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mta:")]
    assert line == (
        f"mta: {relay.policy_file}: listener[0]: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )
