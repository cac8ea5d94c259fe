"""The policy server's connection handling over real loopback sockets (the decision is a
fake here; tests/integration/test_policy_server.py has the real one): pipelined requests
in odd fragments, a broken netstring ends the connection, the connection cap holds."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from mta.config import PolicyServerConfig, validate
from mta.model import PolicySource, TlsLevel
from mta.policy.decide import StsFacts, TransportPolicy
from mta.policy.resolver import DomainPlan, HostPlan
from mta.postfix.server import PolicyService

CONFIG = validate({}, "test.toml", Path("/nonexistent"))


class FixedDestinations:
    """Every domain: no MX hosts to look at, the default level."""

    async def domain(self, domain: str) -> DomainPlan:
        policy = TransportPolicy(domain, TlsLevel.ENCRYPT, PolicySource.DEFAULT, "default")
        return DomainPlan(domain, policy, StsFacts(None), domain, 25, True)

    async def host(self, plan: DomainPlan, host: str) -> HostPlan:
        raise AssertionError("no hosts")


async def exchange(settings: PolicyServerConfig, chunks: list[bytes]) -> bytes:
    service = PolicyService(FixedDestinations(), settings)
    server = await asyncio.start_server(service.serve_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
        await writer.wait_closed()
        return data
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the server's side of the connection finishes closing


def test_pipelined_requests_in_fragments_get_replies_in_order() -> None:
    settings = PolicyServerConfig(idle_timeout=0.5)
    stream = b"10:mta a.test,15:mta [b.test]:25,12:other c.test,"
    data = asyncio.run(exchange(settings, [stream[:4], stream[4:21], stream[21:]]))
    ok = b"OK encrypt servername=hostname protocols=>=TLSv1.2 ciphers=high exclude=kRSA"
    perm = b"PERM unknown map name 'other'"
    assert data == b"%d:%s,9:NOTFOUND ,%d:%s," % (len(ok), ok, len(perm), perm)


def test_a_broken_netstring_ends_the_connection() -> None:
    settings = PolicyServerConfig(idle_timeout=5)
    assert asyncio.run(exchange(settings, [b"10:mta a.test;"])) == b""
    assert asyncio.run(exchange(settings, [b"99999:"])) == b""  # too long: not buffered


def test_connections_above_the_cap_are_closed() -> None:
    async def two_clients() -> tuple[bytes, bytes]:
        service = PolicyService(FixedDestinations(), PolicyServerConfig(max_connections=1))
        server = await asyncio.start_server(service.serve_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            first_r, first_w = await asyncio.open_connection("127.0.0.1", port)
            first_w.write(b"10:mta a.test,")
            answer = await asyncio.wait_for(first_r.readuntil(b","), 5)
            second_r, second_w = await asyncio.open_connection("127.0.0.1", port)
            second_w.write(b"10:mta a.test,")
            try:
                refused = await asyncio.wait_for(second_r.read(), 5)
            except ConnectionResetError:  # closed before our request was read
                refused = b""
            for writer in (first_w, second_w):
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            return answer, refused
        finally:
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0.05)

    answer, refused = asyncio.run(two_clients())
    assert answer.startswith(b"76:OK encrypt")
    assert refused == b""


def test_the_default_listen_address() -> None:
    assert (CONFIG.policy_server.host, CONFIG.policy_server.port) == ("127.0.0.1", 8461)
