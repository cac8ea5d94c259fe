"""The relay as a real process (``python -m mta run``), as an operator runs it.

Tests start it with a policy file in a temporary data directory, talk SMTP to it,
kill it (SIGTERM or SIGKILL) and start it again on the same spool.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def common_port(hosts: list[str]) -> int:
    """A TCP port free on every one of ``hosts`` (MX hosts share it, like port 25)."""
    for _ in range(200):
        port = 20000 + secrets.randbelow(40000)
        socks = []
        try:
            for host in hosts:
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return port
    raise AssertionError("no common free port")


def client_tls() -> ssl.SSLContext:
    """A client context for talking to the relay's self-signed listener."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def run_mta(
    *args: str, home: Path, stdin: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one ``mta`` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "mta", *args],
        env={**os.environ, "MTA_HOME": str(home)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def policy(nexthop: str, *, level: str = "encrypt", extra: str = "") -> str:
    """A policy that sends everything to ``nexthop`` at ``level`` and retries only after
    an hour (so a deferred message stays put for the test to look at)."""
    return (
        f'[outbound]\ndefault_level = "{level}"\nretry_min = "1h"\nretry_max = "2h"\n\n'
        f'[[route]]\ndomain = "*"\nnexthop = "{nexthop}"\n\n{extra}'
    )


class RelayProcess:
    """One relay process with its policy file, data directory and log file."""

    def __init__(
        self,
        tmp_path: Path,
        policy: str,
        *,
        port: int | None = None,
        listener: str = "",
        nofile: int | None = None,
        server: str = "allow_root = true",
        run_args: tuple[str, ...] = (),
        workers: int = 1,
    ) -> None:
        self.run_args = run_args  # more arguments for ``mta run``
        # [server] workers: 1 unless the test is about a relay group (``mta.group``), so
        # tests of one thing see one process whatever the machine's CPU count.
        self.workers = workers
        self.listener = listener  # extra keys for our [[listener]] table
        # The [server] table: tests run as root, which `mta run` refuses unless told.
        self.server = server
        self.nofile = nofile  # RLIMIT_NOFILE (soft and hard) of the process, like ulimit -n
        self.home = tmp_path / "var"
        self.port = port or free_port()
        self.policy_file = tmp_path / "relay.toml"
        self.log_file = tmp_path / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_policy(policy)

    def write_policy(self, policy: str) -> None:
        """Write the policy with our listener and [server] first; ``policy`` adds the rest."""
        listener = f'[[listener]]\naddress = "127.0.0.1"\nport = {self.port}\n{self.listener}\n'
        # The metrics listener is off unless the test asks for it: relays run side by
        # side here, and the default port (9464) is one port.
        metrics = "" if "[metrics]" in policy else '[metrics]\nlisten = ""\n\n'
        server = (
            self.server if "workers" in self.server else f"{self.server}\nworkers = {self.workers}"
        )
        self.policy_file.write_text(f"[server]\n{server}\n\n{listener}{metrics}{policy}")

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self) -> RelayProcess:
        mark = len(self.log)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mta",
                    "run",
                    "--config",
                    str(self.policy_file),
                    *self.run_args,
                ],
                env={**os.environ, "MTA_HOME": str(self.home)},
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limits if self.nofile is not None else None,
                start_new_session=True,  # its own process group: a group's workers too
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while "mta.ready" not in self.log[mark:]:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log[mark:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not ready in {READY_TIMEOUT}s:\n{self.log[mark:]}")
            time.sleep(0.05)
        return self

    def _limits(self) -> None:
        """In the child, before exec: the descriptor limit, as ``ulimit -n`` sets it."""
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def kill9(self) -> None:
        """SIGKILL to the ``mta run`` process (a group's supervisor: its workers drain)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def kill9_all(self) -> None:
        """SIGKILL to every process of the relay (a group's supervisor and workers)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def worker_pids(self) -> dict[int, int]:
        """A group's running workers: shard -> pid (the supervisor's children)."""
        assert self.proc is not None
        found: dict[int, int] = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if b"worker" in argv:
                        found[int(argv[argv.index(b"--shard") + 1])] = int(pid)
        return found

    def kill9_worker(self, shard: int) -> None:
        """SIGKILL to worker ``shard`` of a group (its supervisor starts it again)."""
        pid = self.worker_pids()[shard]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: self.worker_pids().get(shard) != pid, 10, f"worker {shard} gone")

    def terminate(self, timeout: float = 40) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # a group's workers too
                os.killpg(self.proc.pid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def mta(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_mta(*args, "--config", str(self.policy_file), home=self.home, stdin=stdin)

    @contextlib.contextmanager
    def smtp(self, *, starttls: bool = True) -> Iterator[smtplib.SMTP]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=20) as smtp:
            if starttls:
                smtp.starttls(context=client_tls())
            yield smtp

    def send(
        self, sender: str, rcpts: list[str], message: bytes | str, *, starttls: bool = True
    ) -> None:
        """Send one message; raises unless every recipient got 250."""
        with self.smtp(starttls=starttls) as smtp:
            refused = smtp.sendmail(sender, rcpts, message)
            assert not refused, refused

    def queue(self) -> list[dict[str, object]]:
        """``mta queue list --json``, parsed (its exit status must be 0)."""
        listed = self.mta("queue", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        entries: list[dict[str, object]] = json.loads(listed.stdout)
        return entries

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.home / "spool").rglob("*") if p.is_file())

    def spooled(self, kind: str = "msg") -> list[Path]:
        """The files in every ``kind`` directory (msg, tmp, state) of the spool: the
        root's and each shard's of a relay group."""
        spool = self.home / "spool"
        dirs = [spool / kind, *(spool / "shards").glob(f"*/{kind}")]
        return sorted(p for d in dirs if d.is_dir() for p in d.iterdir())


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate()`` until true, at most ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
