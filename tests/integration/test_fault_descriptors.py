"""Fault: more connections configured than file descriptors -> clamped at start, said in
one line, and the control socket still answers under a flood of connections.

The relay runs as a real process with ``ulimit -n 256`` (soft and hard, so it cannot
raise the limit) and the default ``limits.connections`` (1000). Before the fix the
flood took every descriptor: ``mta stats`` and ``mta queue flush`` died with a
traceback and the relay logged nothing.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from tests.integration.relayproc import RelayProcess, free_port, policy, wait_until

NOFILE = 256
FLOOD = 400  # connections: well over what 256 descriptors hold
HOST = "127.0.0.154"


@contextlib.contextmanager
def flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` idle TCP connections to the relay, held open (bounded in count)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                break
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def test_connection_caps_fit_the_descriptor_limit_and_control_answers(tmp_path: Path) -> None:
    relay = RelayProcess(
        tmp_path,
        policy(f"[{HOST}]:{free_port(HOST)}", extra="[limits]\nconnections_per_client = 1000\n"),
        nofile=NOFILE,
    )
    try:
        relay.start()
        clamped = [line for line in relay.log.splitlines() if "mta.connections_clamped" in line]
        assert len(clamped) == 1, relay.log
        match = re.search(r"connections=1000->(\d+) max_connections=100->(\d+)", clamped[0])
        assert match is not None, clamped[0]
        inbound, outbound = int(match[1]), int(match[2])
        assert inbound + 2 * outbound <= NOFILE - 64
        with flood(relay.port, FLOOD) as held:
            assert len(held) > inbound  # the kernel's backlog takes the rest
            wait_until(lambda: relay.log.count("receive.connection_refused") > 0, 20, "refusals")
            for command in (("stats",), ("queue", "flush")):
                answered = relay.mta(*command)
                assert answered.returncode == 0, answered.stderr
                assert "Traceback" not in answered.stderr
            stats = relay.mta("stats").stdout
            fds = int(re.search(r"fds=(\d+)", stats)[1])  # type: ignore[index]
            assert fds < NOFILE, stats
        assert relay.proc is not None
        assert relay.proc.poll() is None
    finally:
        relay.stop()
