"""Relayed messages per second over STARTTLS on both legs, against a same-run baseline.

    python benchmarks/relay_throughput.py [--messages 1000] [--sessions 20] [--size 4096]

Phase 1 (baseline): the clients send straight to a STARTTLS sink.
Phase 2 (relay): the same clients send to ``mta run`` (STARTTLS in, encrypted fsynced
spool, STARTTLS out), which relays to the sink. End to end = from the first send to
the last arrival at the sink. Everything runs on loopback; the load is bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

HERE = Path(__file__).parent
TIMEOUT = 300.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_sink(host: str, port: int, count: int, workdir: Path) -> subprocess.Popen[str]:
    sink = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "sink.py"),
            host,
            str(port),
            str(count),
            str(workdir / "sink-tls"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None
    assert sink.stdout.readline().strip() == "ready"
    return sink


def wait_done(sink: subprocess.Popen[str]) -> float:
    assert sink.stdout is not None
    line = sink.stdout.readline().split()
    assert line, "sink closed without reporting"
    assert line[0] == "done", line
    return float(line[1])


def message(n: int, size: int) -> bytes:
    head = f"From: bench@sender.test\r\nTo: sink@dest.test\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def load(host: str, port: int, total: int, sessions: int, size: int) -> list[float]:
    """``sessions`` clients, each reusing its connection; returns per-message ack latencies."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    queue = list(range(total))
    latencies: list[float] = []

    async def client() -> None:
        smtp = aiosmtplib.SMTP(
            hostname=host, port=port, tls_context=context, start_tls=True, timeout=60
        )
        await smtp.connect()
        while queue:
            n = queue.pop()
            started = time.monotonic()
            await smtp.sendmail("bench@sender.test", ["sink@dest.test"], message(n, size))
            latencies.append(time.monotonic() - started)
        await smtp.quit()

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(sessions))), TIMEOUT)
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def run_phase(
    name: str, target: tuple[str, int], sink: subprocess.Popen[str], args: argparse.Namespace
) -> float:
    started = time.monotonic()
    latencies = asyncio.run(load(*target, args.messages, args.sessions, args.size))
    finished = wait_done(sink)
    rate = args.messages / (finished - started)
    print(
        f"{name:<9} {rate:8.1f} msg/s   ack p50 {percentile(latencies, 0.5) * 1000:6.1f} ms"
        f"   p99 {percentile(latencies, 0.99) * 1000:6.1f} ms"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument(
        "--relay-wrapper", default="", help='e.g. "py-spy record -f raw -o relay.txt --"'
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mta-bench-") as tmp:
        work = Path(tmp)
        sink_host = "127.0.0.2"
        print(
            f"{args.messages} messages of {args.size} bytes, {args.sessions} sessions,"
            " STARTTLS on both legs"
        )

        sink_port = free_port(sink_host)
        sink = start_sink(sink_host, sink_port, args.messages, work)
        try:
            baseline = run_phase("baseline", (sink_host, sink_port), sink, args)
        finally:
            sink.terminate()
            sink.wait()

        sink_port = free_port(sink_host)
        sink = start_sink(sink_host, sink_port, args.messages, work)
        relay_port = free_port("127.0.0.1")
        policy = work / "relay.toml"
        policy.write_text(
            f'[[listener]]\naddress = "127.0.0.1"\nport = {relay_port}\n'
            f'[log]\nlevel = "WARNING"\n'
            f'[[route]]\ndomain = "*"\nnexthop = "[{sink_host}]:{sink_port}"\n'
        )
        relay = subprocess.Popen(
            [*args.relay_wrapper.split(), sys.executable, "-m", "mta", "run", "--config", str(policy)],
            env={**os.environ, "MTA_HOME": str(work / "var")},
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", relay_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or relay.poll() is not None:
                        raise SystemExit("relay did not start") from None
                    time.sleep(0.1)
            rate = run_phase("mta relay", ("127.0.0.1", relay_port), sink, args)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(timeout=60)
            sink.terminate()
            sink.wait()
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"ratio relay/baseline: {rate / baseline:.2f}"
            f"   (largest child process peak RSS: {rss:.0f} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
