"""Start and stop the two relays under test: ``mta run`` and a private Postfix instance.

Both are configured as the same relay: listen on 127.0.0.1, offer STARTTLS with a
self-signed ECDSA P-256 certificate (TLS >= 1.2), accept mail from 127.0.0.0/8, relay
everything to one next hop (the sink) with mandatory STARTTLS (TLS >= 1.2, forward
secrecy), at most 20 deliveries in flight to it, reusing outbound connections, and make
each message durable (fsync) before answering ``250``.

Postfix runs as ``postfix -c DIR`` with everything of its own in a temporary directory:
main.cf, master.cf, queue_directory, data_directory and maillog_file. Nothing under
/etc/postfix is read or changed. Postfix insists that a non-default configuration
directory be listed in ``alternate_config_directories`` of /etc/postfix/main.cf only
for callers that are not root (``mail_conf_suck``: ``geteuid() != 0``), and this
harness runs as root, so that file need not exist (on this machine it does not).
Running as non-root is refused up front with that explanation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import proctree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the private Postfix instance
from tests.integration import postfix

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POSTFIX_PROBLEMS = ("warning:", "fatal:", "panic:", "status=deferred", "status=bounced")
MTA_PROBLEMS = ("ERROR", "CRITICAL", "Traceback", "defer", "bounce")


@dataclass(frozen=True)
class RunningRelay:
    """A started relay: where to send mail, and the root of its process tree."""

    name: str
    host: str
    port: int
    root_pid: int
    log: Path


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(host: str, port: int, pid: int | None = None) -> None:
    """Return once ``host:port`` accepts a connection; fail if ``pid`` dies first."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if pid is not None and not proctree.alive(pid):
                raise RuntimeError(f"relay process {pid} exited during start") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {host}:{port}") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL to the process group it leads."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


# --- mta ---------------------------------------------------------------------------


def mta_policy(port: int, sink: tuple[str, int], concurrency: int, workers: int) -> str:
    """The policy: one relay listener, everything routed to the sink, WARNING logs,
    ``workers`` relay processes; run as root here (the Postfix side needs root), which
    ``mta run`` refuses unless told."""
    return (
        f"[server]\nallow_root = true\nworkers = {workers}\n\n"
        f'[[listener]]\naddress = "127.0.0.1"\nport = {port}\n\n'
        f"[outbound]\nmax_per_destination = {concurrency}\n\n"
        # Metrics on, as by default, but on a free port: not 9464, which another relay
        # on the machine may hold.
        f'[metrics]\nlisten = "127.0.0.1:{free_port("127.0.0.1")}"\n\n'
        f'[log]\nlevel = "WARNING"\n\n'
        f'[[route]]\ndomain = "*"\nnexthop = "[{sink[0]}]:{sink[1]}"\n'
    )


@contextlib.contextmanager
def mta_relay(
    work: Path, sink: tuple[str, int], concurrency: int, workers: int, wrapper: list[str]
) -> Iterator[RunningRelay]:
    """``python -m mta run`` with MTA_HOME in ``work``; stopped with SIGTERM on exit."""
    work.mkdir(parents=True)
    port = free_port("127.0.0.1")
    policy = work / "relay.toml"
    policy.write_text(mta_policy(port, sink, concurrency, workers))
    log = work / "mta.log"
    command = [*wrapper, sys.executable, "-m", "mta", "run", "--config", str(policy)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            env={**os.environ, "MTA_HOME": str(work / "var")},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a Ctrl-C reaches the harness only
        )
    try:
        wait_listening("127.0.0.1", port, proc.pid)
        yield RunningRelay("mta", "127.0.0.1", port, proc.pid, log)
    finally:
        stop_process(proc)


# --- Postfix (the private instance: tests/integration/postfix.py) ------------------


def postfix_main_cf(
    base: Path, sink: tuple[str, int], concurrency: int, cert: Path, key: Path
) -> str:
    """main.cf of the private instance; every non-default line is the relay's contract."""
    return (
        postfix.instance_main_cf(base, "relay.bench.test")
        + f"""\
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [{sink[0]}]:{sink[1]}
in_flow_delay = 0

# Inbound: STARTTLS offered, TLS >= 1.2, self-signed ECDSA P-256.
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_security_level = may
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_session_cache_database = btree:${{data_directory}}/smtpd_scache

# Outbound: STARTTLS required, TLS >= 1.2, forward-secret suites only (TLS 1.2 ECDHE;
# all TLS 1.3 suites are). Session cache as in Debian's default main.cf.
smtp_tls_security_level = encrypt
smtp_tls_protocols = >=TLSv1.2
smtp_tls_mandatory_protocols = >=TLSv1.2
smtp_tls_mandatory_ciphers = high
smtp_tls_mandatory_exclude_ciphers = kRSA, aNULL
smtp_tls_session_cache_database = btree:${{data_directory}}/smtp_scache

# At most {concurrency} deliveries in flight to the next hop, connections reused
# (TLS ones too, through tlsproxy, Postfix >= 3.4).
default_destination_concurrency_limit = {concurrency}
smtp_connection_cache_on_demand = yes
smtp_tls_connection_reuse = yes

# Durability is Postfix's normal one: cleanup fsyncs the queue file before smtpd
# answers 250. Nothing here weakens it.
"""
    )


check_postfix_usable = postfix.check_postfix_usable


@contextlib.contextmanager
def postfix_relay(
    work: Path, sink: tuple[str, int], concurrency: int, cert: Path, key: Path
) -> Iterator[RunningRelay]:
    """A private Postfix instance in ``work``: started, yielded, always stopped."""
    dirs = postfix.PostfixDirs(work)
    port = free_port("127.0.0.1")
    postfix.write_config(
        dirs,
        postfix_main_cf(dirs.base, sink, concurrency, cert, key),
        postfix.master_cf(f"127.0.0.1:{port} inet n - n - - smtpd\n"),
    )
    with postfix.running(dirs) as pid:
        wait_listening("127.0.0.1", port, pid)
        yield RunningRelay("postfix", "127.0.0.1", port, pid, dirs.maillog)


def log_problems(relay: RunningRelay, limit: int = 5) -> tuple[int, list[str]]:
    """How many error or deferral lines a relay logged, and the first few of them."""
    words = POSTFIX_PROBLEMS if relay.name == "postfix" else MTA_PROBLEMS
    try:
        lines = relay.log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0, []
    bad = [line for line in lines if any(word in line for word in words)]
    return len(bad), bad[:limit]
