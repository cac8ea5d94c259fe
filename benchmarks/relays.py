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

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POSTFIX = "/usr/sbin/postfix"
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


def mta_policy(port: int, sink: tuple[str, int], concurrency: int) -> str:
    """The policy: one relay listener, everything routed to the sink, WARNING logs; run
    as root here (the Postfix side needs root), which ``mta run`` refuses unless told."""
    return (
        "[server]\nallow_root = true\n\n"
        f'[[listener]]\naddress = "127.0.0.1"\nport = {port}\n\n'
        f"[outbound]\nmax_per_destination = {concurrency}\n\n"
        f'[log]\nlevel = "WARNING"\n\n'
        f'[[route]]\ndomain = "*"\nnexthop = "[{sink[0]}]:{sink[1]}"\n'
    )


@contextlib.contextmanager
def mta_relay(
    work: Path, sink: tuple[str, int], concurrency: int, wrapper: list[str]
) -> Iterator[RunningRelay]:
    """``python -m mta run`` with MTA_HOME in ``work``; stopped with SIGTERM on exit."""
    work.mkdir(parents=True)
    port = free_port("127.0.0.1")
    policy = work / "relay.toml"
    policy.write_text(mta_policy(port, sink, concurrency))
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


# --- Postfix -------------------------------------------------------------------------

MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
tlsproxy  unix  - - n -     0 tlsproxy
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_main_cf(
    base: Path, sink: tuple[str, int], concurrency: int, cert: Path, key: Path
) -> str:
    """main.cf of the private instance; every non-default line is the relay's contract."""
    return f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = relay.bench.test
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
biff = no
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


@dataclass(frozen=True)
class PostfixDirs:
    """The private instance's directories; the queue is outside the config directory
    so that ``postfix check`` does not walk it and warn about its owners."""

    base: Path

    @property
    def config(self) -> Path:
        return self.base / "conf"

    @property
    def queue(self) -> Path:
        return self.base / "queue"

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"


def write_postfix_config(
    dirs: PostfixDirs,
    port: int,
    sink: tuple[str, int],
    concurrency: int,
    cert: Path,
    key: Path,
) -> None:
    """Lay out the instance: the postfix user must reach data/ and the maillog."""
    for directory in (dirs.base, dirs.config, dirs.queue, dirs.data):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    os.chown(dirs.data, *postfix_ids())
    (dirs.config / "main.cf").write_text(postfix_main_cf(dirs.base, sink, concurrency, cert, key))
    (dirs.config / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{port}"))


def postfix_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


def postctl(dirs: PostfixDirs, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTFIX, "-c", str(dirs.config), action],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def master_pid(dirs: PostfixDirs) -> int | None:
    try:
        return int((dirs.queue / "pid" / "master.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def check_postfix_usable() -> None:
    """Fail early, with the reason, where a private Postfix instance cannot run."""
    if not Path(POSTFIX).exists():
        raise RuntimeError(f"{POSTFIX} not found: install Debian's postfix package")
    if os.geteuid() != 0:
        raise RuntimeError(
            "the Postfix comparison needs root: `postfix -c DIR` as non-root requires DIR "
            "in alternate_config_directories of /etc/postfix/main.cf (use --systems mta)"
        )


@contextlib.contextmanager
def postfix_relay(
    work: Path, sink: tuple[str, int], concurrency: int, cert: Path, key: Path
) -> Iterator[RunningRelay]:
    """A private Postfix instance in ``work``: started, yielded, always stopped."""
    dirs = PostfixDirs(work)
    port = free_port("127.0.0.1")
    write_postfix_config(dirs, port, sink, concurrency, cert, key)
    try:
        started = postctl(dirs, "start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr.strip()}")
        pid = wait_master_pid(dirs)
        wait_listening("127.0.0.1", port, pid)
        yield RunningRelay("postfix", "127.0.0.1", port, pid, dirs.maillog)
    finally:
        stop_postfix(dirs)


def wait_master_pid(dirs: PostfixDirs) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while (pid := master_pid(dirs)) is None or not proctree.alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError("postfix master did not write its pid file")
        time.sleep(0.05)
    return pid


def stop_postfix(dirs: PostfixDirs) -> None:
    """``postfix stop``; whatever of the instance's tree survives it is killed.

    Processes are remembered with their start times, so that a process id reused by
    another program meanwhile is never signalled.
    """
    pid = master_pid(dirs)
    tree = proctree.tree(pid) if pid is not None and proctree.alive(pid) else []
    members = {p: proctree.start_time(p) for p in tree}
    with contextlib.suppress(subprocess.TimeoutExpired):
        postctl(dirs, "stop")
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and any(
        proctree.start_time(p) == start for p, start in members.items()
    ):
        time.sleep(0.1)
    for leftover, start in members.items():
        if proctree.start_time(leftover) == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


def log_problems(relay: RunningRelay, limit: int = 5) -> tuple[int, list[str]]:
    """How many error or deferral lines a relay logged, and the first few of them."""
    words = POSTFIX_PROBLEMS if relay.name == "postfix" else MTA_PROBLEMS
    try:
        lines = relay.log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0, []
    bad = [line for line in lines if any(word in line for word in words)]
    return len(bad), bad[:limit]
