"""A private Postfix instance for tests and benchmarks: ``postfix -c DIR``, never the system one.

Everything of its own lives in one directory: main.cf and master.cf in ``conf/``,
queue_directory, data_directory and maillog_file beside it. Nothing under
/etc/postfix is read or changed. Postfix insists that a non-default configuration
directory be listed in ``alternate_config_directories`` of /etc/postfix/main.cf only
for callers that are not root (``mail_conf_suck``: ``geteuid() != 0``); tests and the
benchmark run as root, so that file need not exist. ``check_postfix_usable`` says so
up front for anyone else.

Postfix resolves through /etc/resolv.conf only (no setting names a nameserver). An
instance that must use the DNSSEC lab runs in a mount namespace of its own, where a
resolv.conf naming the lab's unbound is bind-mounted over /etc/resolv.conf
(``running(dirs, resolv_conf=...)``): the system's file is never changed.

Used by ``benchmarks/relays.py`` (Postfix as the relay to compare with),
``tests/integration/test_beside_postfix.py`` (Postfix beside mta, both directions) and
``tests/integration/test_policy_server_postfix.py`` (Postfix asking ``mta
policy-server``). ``readme_block`` reads the README blocks those tests follow.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import proctree

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
POSTFIX = "/usr/sbin/postfix"
ROOT = Path(__file__).parents[2]

# master.cf without an smtpd listener: callers add theirs ({listen} is filled in by
# ``master_cf``). local and virtual deliver to mailboxes where main.cf asks for it.
MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
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
local     unix  - n n -     - local
virtual   unix  - n n -     - virtual
"""


def master_cf(listeners: str) -> str:
    """The services every instance runs, plus ``listeners`` (smtpd lines)."""
    return MASTER_CF + listeners


def instance_main_cf(base: Path, hostname: str) -> str:
    """The main.cf lines that make an instance private: its own directories, loopback."""
    return f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
myhostname = {hostname}
inet_interfaces = loopback-only
inet_protocols = ipv4
biff = no
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


def write_config(dirs: PostfixDirs, main_cf: str, master: str) -> None:
    """Lay out the instance: the postfix user must reach data/ and the maillog."""
    for directory in (dirs.base, dirs.config, dirs.queue, dirs.data):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    os.chown(dirs.data, *postfix_ids())
    (dirs.config / "main.cf").write_text(main_cf)
    (dirs.config / "master.cf").write_text(master)


def postfix_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


def readme_block(marker: str, name: str) -> str:
    """The README block after ``<!-- MARKER: NAME -->``: the lines a test follows word
    for word."""
    text = (ROOT / "README.md").read_text()
    found = re.search(
        rf"<!-- {re.escape(marker)}: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", text, re.S
    )
    assert found, f"README.md has no {marker} block {name}"
    return found.group(1)


def postctl(
    dirs: PostfixDirs, action: str, resolv_conf: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [POSTFIX, "-c", str(dirs.config), action]
    if resolv_conf is not None:  # a private mount namespace; its processes inherit it
        mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            mount,
            str(resolv_conf),
            *command,
        ]
    return subprocess.run(
        command,
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
            "in alternate_config_directories of /etc/postfix/main.cf"
        )


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


@contextlib.contextmanager
def running(dirs: PostfixDirs, resolv_conf: Path | None = None) -> Iterator[int]:
    """Start the instance written by ``write_config``; yield its master's pid; always
    stop it. With ``resolv_conf`` the instance resolves through that file instead of
    /etc/resolv.conf (module docstring)."""
    check_postfix_usable()
    try:
        started = postctl(dirs, "start", resolv_conf)
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr.strip()}")
        yield wait_master_pid(dirs)
    finally:
        stop_postfix(dirs)


@contextlib.contextmanager
def policy_server(policy_file: Path, home: Path, log_file: Path) -> Iterator[None]:
    """``mta policy-server`` on ``policy_file``, ready once it logs that it listens;
    always terminated."""
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "policy-server", "--config", str(policy_file)],
            env={**os.environ, "MTA_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "policy_server.listening" not in log_file.read_text():
            assert proc.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
