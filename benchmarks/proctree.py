"""CPU time and memory of a relay's whole process tree, read from /proc (no cgroups).

Why a tree: Postfix is a dozen kinds of processes (master, smtpd, cleanup, qmgr, smtp,
tlsproxy, ...) that come and go during a run; ``mta`` is one process. Reading both the
same way keeps the comparison fair.

CPU: the sum over the live tree of each process's own CPU time plus the ``cutime/cstime``
of its reaped children (``/proc/PID/stat``). A process that exits is reaped by its
parent (Postfix's master), whose ``cutime/cstime`` then hold all its CPU time, so the
sum only grows and the difference between two readings is all the CPU the tree used in
between, short-lived processes included, without sampling fast. A live process's own
time is read in nanoseconds from its threads' ``schedstat``: ``utime``/``stime`` are
whole clock ticks, and truncating 70-odd Postfix processes to 10 ms each would hide
up to half a CPU-second per reading.

Memory: RSS (``/proc/PID/statm``) and PSS (``/proc/PID/smaps_rollup``) summed over the
tree at each sample. A sum of RSS counts the shared libraries once per process, which
overstates a multi-process server; the PSS sum splits each shared page between the
processes mapping it, so it is the tree's real footprint. Both are reported.
``VmHWM`` (``/proc/PID/status``) is the kernel's own peak RSS of one process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Memory:
    """One sample of a tree's memory, in KiB."""

    rss_kb: int = 0
    pss_kb: int = 0
    processes: int = 0


def _read(path: str) -> str | None:
    """A /proc file's text, or None if the process has gone meanwhile."""
    try:
        with open(path) as handle:
            return handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (needs CONFIG_PROC_CHILDREN)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            found.extend(int(child) for child in text.split())
    return found


def tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    pids, index = [root], 0
    while index < len(pids):
        pids.extend(children(pids[index]))
        index += 1
    return pids


def process_cpu(pid: int) -> float:
    """CPU seconds of one process and of its reaped children (0 if it is gone)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    own_ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14-15 of proc(5)
    children_ticks = int(fields[13]) + int(fields[14])  # cutime, cstime
    # The larger of the two: schedstat misses threads that have exited, ticks truncate.
    return max(own_ticks / TICK, threads_runtime(pid)) + children_ticks / TICK


def threads_runtime(pid: int) -> float:
    """Seconds on a CPU of the live threads of ``pid``, from ``schedstat`` (nanoseconds)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    texts = (_read(f"/proc/{pid}/task/{tid}/schedstat") for tid in tasks)
    return sum(int(text.split()[0]) for text in texts if text) / 1e9


def start_time(pid: int) -> int | None:
    """When the process started (ticks after boot): tells a reused process id apart."""
    text = _read(f"/proc/{pid}/stat")
    return int(text[text.rindex(")") + 2 :].split()[19]) if text else None


def cpu_seconds(root: int) -> float:
    """All CPU time used so far by ``root`` and its descendants, dead ones included."""
    return sum(process_cpu(pid) for pid in tree(root))


def rss_kb(pid: int) -> int:
    text = _read(f"/proc/{pid}/statm")
    return int(text.split()[1]) * PAGE_KB if text else 0


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status, e.g. ``VmHWM`` (0 if gone or absent)."""
    return _field_kb(_read(f"/proc/{pid}/status"), key)


def pss_kb(pid: int) -> int:
    return _field_kb(_read(f"/proc/{pid}/smaps_rollup"), "Pss")


def _field_kb(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return 0


def summed_hwm_kb(root: int) -> int:
    """The sum of every process's ``VmHWM`` in the tree: each one the kernel's own peak,
    so an upper bound of the tree's peak (peaks that did not coincide, and pages shared
    since a fork, are counted in full in each process)."""
    return sum(status_kb(pid, "VmHWM") for pid in tree(root))


def max_hwm_kb(root: int) -> int:
    """The largest ``VmHWM`` of one process in the tree: the per-process memory target
    is about each process, which a sum over a group of workers hides."""
    return max((status_kb(pid, "VmHWM") for pid in tree(root)), default=0)


class Monitor:
    """Tracks one relay's tree through a phase: CPU used and peak memory.

    Reading ``smaps_rollup`` costs about 0.2 ms of CPU per process (the kernel walks
    the page tables): every 0.1 s for Postfix's 70-odd processes that would take 15 %
    of a CPU from the relays under test. So RSS is read at every sample, and PSS
    every ``pss_interval`` seconds and whenever the RSS sum reaches a new peak (while
    processes are being started, when the footprint grows).
    """

    def __init__(self, root: int, pss_interval: float = 1.0) -> None:
        self.root = root
        self.cpu_start = cpu_seconds(root)
        self.peak = Memory()
        self.pss_interval = pss_interval
        self.pss_due = 0.0

    def sample(self) -> None:
        pids = tree(self.root)
        rss = sum(rss_kb(pid) for pid in pids)
        pss = 0
        if rss > self.peak.rss_kb or time.monotonic() >= self.pss_due:
            self.pss_due = time.monotonic() + self.pss_interval
            pss = sum(pss_kb(pid) for pid in pids)
        now = Memory(rss_kb=rss, pss_kb=pss, processes=len(pids))
        self.peak = Memory(
            rss_kb=max(self.peak.rss_kb, now.rss_kb),
            pss_kb=max(self.peak.pss_kb, now.pss_kb),
            processes=max(self.peak.processes, now.processes),
        )

    def cpu_used(self) -> float:
        return cpu_seconds(self.root) - self.cpu_start


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far (all CPUs, /proc/stat), in seconds.

    Includes the load generator and the sink: a check that the relay figures add up,
    and a sign of whether the 2 CPUs were saturated.
    """
    fields = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / TICK


def kernel_seconds() -> float:
    """CPU time so far of kernel threads (kthreadd's children) and of irq/softirq work.

    Work the kernel does for a relay but charges to no process of it: ext4 converting
    the extents of fsynced files, journal commits, block I/O completion, loopback
    networking in softirq. Machine-wide, so it also holds other programs' share.
    """
    fields = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    ticks = int(fields[5]) + int(fields[6])  # irq, softirq
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (text := _read(f"/proc/{entry}/stat")):
            rest = text[text.rindex(")") + 2 :].split()
            if entry == "2" or rest[1] == "2":  # kthreadd and its children
                ticks += int(rest[11]) + int(rest[12])
    return ticks / TICK


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
