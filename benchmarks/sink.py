"""A STARTTLS SMTP sink for benchmarks: accepts mail, counts it, prints when N arrived.

Usage: python benchmarks/sink.py HOST PORT COUNT CERTDIR. Prints ``ready`` once
listening and ``done <monotonic seconds>`` when COUNT messages have arrived.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from mta.receive.tls import ensure_self_signed, server_context


class Counter:
    def __init__(self, target: int) -> None:
        self.target, self.count = target, 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += len(envelope.rcpt_tos)
        if self.count == self.target:
            print(f"done {time.monotonic()}", flush=True)
        return "250 2.0.0 Ok"


async def main(host: str, port: int, target: int, certdir: Path) -> None:
    cert, key, _ = ensure_self_signed(certdir, "sink.test")
    context = server_context(cert, key)
    handler = Counter(target)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, tls_context=context, hostname="sink.test", data_size_limit=None),
        host,
        port,
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
