"""A real ``redis-server`` on loopback for the shared-state tests: a free port, no
persistence, stopped (and startable again on the same port) by the test."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.integration.relayproc import free_port

READY_TIMEOUT = 10.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    assert Path(found).exists(), "redis-server missing: run scripts/system-deps.sh"
    return found


class RedisServer:
    """``redis-server --port N --save '' --appendonly no --bind 127.0.0.1``, in ``work``."""

    def __init__(self, work: Path, port: int | None = None) -> None:
        self.work = work
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(redis_server_binary(), "--port", str(self.port), "--save", ""),
                *("--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(self.work)),
                *("--logfile", str(self.work / "redis.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._answers():
            assert self.proc.poll() is None, (self.work / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not come up"
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        """A synchronous client, to look at what the relays stored."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
