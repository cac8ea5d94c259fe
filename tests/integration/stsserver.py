"""An HTTPS server for MTA-STS policy fetch tests: the far end of ``StsFetcher``.

``StsServer`` runs aiohttp.web on its own event loop in a background thread, on a
loopback address, with a certificate from a test CA (a ``trustme.LeafCert`` or PEM
file paths). ``routes`` maps a request path to a ``Route`` (or a plain tuple
``(status, content_type, body, headers)``); any other path is a 404. A route can also
send its body chunked (no Content-Length) or wait before answering.

    cert = tls_ca.issue_cert("mta-sts.good.test")
    routes = {POLICY_PATH: Route(200, "text/plain", POLICY)}
    with StsServer("127.0.0.5", cert=cert, routes=routes) as srv:
        ...fetch https://mta-sts.good.test:{srv.port}/.well-known/mta-sts.txt via 127.0.0.5...
        assert srv.request_count == 1
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Final, NamedTuple

import trustme
from aiohttp import web

from tests.integration.threaded import ThreadedServer

POLICY_PATH: Final = "/.well-known/mta-sts.txt"


class Route(NamedTuple):
    """What the server answers on one path."""

    status: int
    content_type: str | None  # None: no Content-Type header at all
    body: bytes | str
    headers: Mapping[str, str] = {}
    chunked: bool = False  # send the body in chunks, without Content-Length
    delay: float = 0.0  # seconds to wait before answering


RouteLike = Route | tuple[int, str | None, bytes | str, Mapping[str, str]]


def policy_route(text: str, content_type: str = "text/plain") -> Route:
    """A 200 answer carrying ``text`` as the policy."""
    return Route(200, content_type, text)


def _server_context(cert: trustme.LeafCert | tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if isinstance(cert, trustme.LeafCert):
        cert.configure_cert(context)
    else:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


class StsServer(ThreadedServer):
    """An HTTPS server on ``host:port`` (``port=0``: any free port; see ``.port``).

    Parameters:
        host: a loopback address (127.0.0.0/8).
        port: the port to listen on; 0 picks a free one.
        cert: the server certificate: a trustme leaf, or (cert PEM, key PEM) paths.
        routes: path -> ``Route`` (or a 4-tuple ``(status, content_type, body, headers)``).
    """

    kind = "sts-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cert: trustme.LeafCert | tuple[Path, Path],
        routes: Mapping[str, RouteLike] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._context = _server_context(cert)
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._requests: list[str] = []
        self._posts: list[tuple[str, str, bytes]] = []  # (path, Content-Type, body)
        for path, route in (routes or {}).items():
            self.set_route(path, route)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._error: BaseException | None = None

    # --- what it serves, and what it was asked ---

    def set_route(self, path: str, route: RouteLike) -> None:
        """Serve ``route`` on ``path`` from now on."""
        with self._lock:
            self._routes[path] = route if isinstance(route, Route) else Route(*route)

    def set_policy(self, text: str, content_type: str = "text/plain") -> None:
        """Serve ``text`` as the policy (200) from now on."""
        self.set_route(POLICY_PATH, policy_route(text, content_type))

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def requests(self) -> list[str]:
        """The paths asked for, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def posts(self) -> list[tuple[str, str, bytes]]:
        """Each POST received: its path, Content-Type and body (a TLS-RPT collector)."""
        with self._lock:
            return list(self._posts)

    # --- the server thread ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            posted = (request.path, request.headers.get("Content-Type", ""), await request.read())
            with self._lock:
                self._posts.append(posted)
        with self._lock:
            self._requests.append(request.path)
            route = self._routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="not found")
        if route.delay:
            await asyncio.sleep(route.delay)
        body = route.body.encode("utf-8") if isinstance(route.body, str) else route.body
        headers = dict(route.headers)
        if route.content_type is not None:
            headers["Content-Type"] = route.content_type
        if not route.chunked:
            response = web.Response(status=route.status, body=body, headers=headers)
            if route.content_type is None:
                response.headers.popall("Content-Type", None)
            return response
        stream = web.StreamResponse(status=route.status, headers=headers)
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        for start in range(0, len(body), 4096):
            await stream.write(body[start : start + 4096])
        await stream.write_eof()
        return stream

    async def _shutdown(self, runner: web.AppRunner) -> None:
        await runner.cleanup()
        # handlers still running (a slow route whose client gave up) end here
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, ssl_context=self._context)
            loop.run_until_complete(site.start())
        except BaseException as err:  # reported to start() in the test's thread
            self._error = err
            loop.run_until_complete(runner.cleanup())
            asyncio.set_event_loop(None)
            loop.close()
            ready.set()
            return
        self._runner = runner
        self.port = runner.addresses[0][1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown(runner))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()
