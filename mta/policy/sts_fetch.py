"""Fetch a domain's MTA-STS policy over HTTPS (RFC 8461 §3.3), as a typed result.

This is the I/O edge for HTTPS: every aiohttp exception is translated here, once, into
an ``StsFetchFailed`` carrying an RFC 8460 result type, and nothing above this module
sees ``aiohttp`` errors. The RFC's guards live together in ``StsFetcher.fetch``:

- only ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` is asked, never a parent
  domain's host (§3.4), and the host is resolved with *our* DNS (the injected
  ``resolve``), not the system's;
- the certificate must be PKIX-valid for ``mta-sts.<domain>`` (§3.3): the caller's
  ``ssl_context`` must verify chains and host names (checked at construction);
  a failure is ``sts-webpki-invalid``;
- 3xx redirects are not followed, only 200 is accepted, the media type must be
  ``text/plain`` (parameters allowed), no HTTP caching is used (§3.3);
- the body is read in chunks and the fetch stops as soon as it passes ``max_bytes``;
  the whole fetch (resolve, connect, handshake, headers, body) has one deadline;
- the body must be strict UTF-8 and parse as a policy (``mta_sts.parse_policy``),
  otherwise ``sts-policy-invalid``.

Everything else that goes wrong (DNS, connection, timeout, status, size, encoding of
the transfer) is ``sts-policy-fetch-error``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import aiohttp.abc
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace
from yarl import URL

from mta.policy.mta_sts import MAX_POLICY_BYTES, StsError, StsPolicy, parse_policy
from mta.policy.mx import normalise_host

FETCH_ERROR: Final = "sts-policy-fetch-error"
WEBPKI_INVALID: Final = "sts-webpki-invalid"
POLICY_INVALID: Final = "sts-policy-invalid"
WELL_KNOWN_PATH: Final = "/.well-known/mta-sts.txt"
POLICY_HOST_PREFIX: Final = "mta-sts."
_CHUNK: Final = 16 * 1024
_GRACE: Final = 1.0
_HEADERS: Final = {
    "User-Agent": "mta (MTA-STS policy fetcher)",
    "Accept-Encoding": "identity",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class StsFetched:
    """A policy fetched and parsed; ``text`` is the body as served (for the cache)."""

    policy: StsPolicy
    text: str


@dataclass(frozen=True, slots=True)
class StsFetchFailed:
    """No policy could be fetched.

    ``reason`` is the RFC 8460 result type: ``sts-policy-fetch-error``,
    ``sts-webpki-invalid`` or ``sts-policy-invalid``; ``detail`` says what happened.
    """

    reason: str
    detail: str


StsFetchResult = StsFetched | StsFetchFailed


class _Failed(Exception):
    """Internal: stops a fetch with a result (never leaves this module)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.result = StsFetchFailed(reason, detail)


class _OneFetchConnector(aiohttp.TCPConnector):
    """A connector that remembers the transports it opened, so the fetch can drop them.

    aiohttp closes a finished or failed connection with a TLS close_notify exchange,
    which waits up to 30 s for a slow or vanished server; the fetch aborts its
    connections instead when it ends (the body is complete by HTTP framing).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._transports: list[asyncio.Transport] = []

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 -- aiohttp's signature
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        if protocol.transport is not None:
            self._transports.append(protocol.transport)
        return protocol

    def abort_all(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()


class _InjectedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver hook, answered by the relay's own DNS (``resolve(host)``)."""

    def __init__(self, resolve: Callable[[str], Awaitable[list[str]]]) -> None:
        self._resolve = resolve

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        try:
            addresses = await self._resolve(host)
        except Exception as err:  # the injected lookup's failure is a DNS failure here
            raise OSError(f"cannot resolve {host}: {err}") from err
        results: list[aiohttp.abc.ResolveResult] = []
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            addr_family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            if family not in (socket.AF_UNSPEC, addr_family):
                continue
            results.append(
                {
                    "hostname": host,
                    "host": str(address),
                    "port": port,
                    "family": addr_family,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        if not results:
            raise OSError(f"{host} has no usable address")
        return results

    async def close(self) -> None:
        return None


def policy_url(domain: str, port: int = 443) -> URL:
    """``https://mta-sts.<domain>[:port]/.well-known/mta-sts.txt`` (RFC 8461 §3.3)."""
    return URL.build(
        scheme="https", host=POLICY_HOST_PREFIX + domain, port=port, path=WELL_KNOWN_PATH
    )


class StsFetcher:
    """Fetches MTA-STS policies over HTTPS with the RFC 8461 guards.

    Each fetch has its own HTTP session and connection, dropped when the fetch ends:
    policy fetches are rare, and nothing is kept between them (no pooled connection,
    no HTTP cache, no cookies), so the fetcher works on any event loop.

    Parameters:
        resolve: ``host -> addresses`` through the relay's DNS; an empty list or an
            exception means the host cannot be resolved.
        ssl_context: client context that verifies chains (``CERT_REQUIRED``) and host
            names (``check_hostname``); its trust store is the system's plus any
            configured CA file.
        port: the HTTPS port (443; tests use others).
        timeout: seconds for the whole fetch.
        max_bytes: the largest policy body accepted.
    """

    def __init__(
        self,
        *,
        resolve: Callable[[str], Awaitable[list[str]]],
        ssl_context: ssl.SSLContext,
        port: int = 443,
        timeout: float = 10.0,
        max_bytes: int = MAX_POLICY_BYTES,
    ) -> None:
        if ssl_context.verify_mode != ssl.CERT_REQUIRED or not ssl_context.check_hostname:
            raise ValueError(
                "the MTA-STS fetcher needs an ssl_context that verifies certificates "
                "and host names (RFC 8461 §3.3)"
            )
        if timeout <= 0 or max_bytes <= 0:
            raise ValueError("timeout and max_bytes must be positive")
        self._resolve = resolve
        self._ssl_context = ssl_context
        self._port = port
        self._timeout = timeout
        self._max_bytes = max_bytes

    async def fetch(self, domain: str) -> StsFetchResult:
        """The policy of exactly ``domain`` (never its parent's), or why there is none."""
        domain = normalise_host(domain)
        try:
            url = policy_url(domain, self._port)
        except ValueError as err:
            return StsFetchFailed(FETCH_ERROR, f"invalid policy host for {domain!r}: {err}")
        try:
            # aiohttp's own deadline (the session's) normally fires first; this one
            # bounds the whole fetch whatever aiohttp does.
            async with asyncio.timeout(self._timeout + _GRACE):
                text = await self._get(url)
        except _Failed as failed:
            return failed.result
        except TimeoutError:
            return StsFetchFailed(FETCH_ERROR, f"{url.host}: timed out after {self._timeout}s")
        except ssl.CertificateError as err:  # aiohttp's ClientConnectorCertificateError too
            return StsFetchFailed(WEBPKI_INVALID, f"{url.host}: {err}")
        except (aiohttp.ClientError, OSError) as err:
            return StsFetchFailed(FETCH_ERROR, f"{url.host}: {type(err).__name__}: {err}")
        try:
            return StsFetched(parse_policy(text), text)
        except StsError as err:
            return StsFetchFailed(POLICY_INVALID, f"{url.host}: {err}")

    async def _get(self, url: URL) -> str:
        """The policy body as text; raises ``_Failed`` or an aiohttp/OS error."""
        host = url.host
        connector = _OneFetchConnector(
            resolver=_InjectedResolver(self._resolve),
            ssl=self._ssl_context,
            use_dns_cache=False,
            force_close=True,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,  # no proxies from the environment
            headers=_HEADERS,
        )
        async with session:
            try:
                async with session.get(url, allow_redirects=False) as response:
                    body = await self._read(response, host)
            finally:
                connector.abort_all()
        try:
            return body.decode("utf-8", errors="strict")
        except UnicodeDecodeError as err:
            raise _Failed(POLICY_INVALID, f"{host}: policy is not UTF-8: {err}") from None

    async def _read(self, response: aiohttp.ClientResponse, host: str | None) -> bytes:
        """The body of a 200 ``text/plain`` answer, at most ``max_bytes`` of it."""
        if 300 <= response.status < 400:
            where = response.headers.get("Location", "?")
            raise _Failed(
                FETCH_ERROR, f"{host}: redirect {response.status} to {where} not followed"
            )
        if response.status != 200:
            raise _Failed(FETCH_ERROR, f"{host}: HTTP status {response.status}")
        if response.content_type != "text/plain":
            raise _Failed(
                FETCH_ERROR, f"{host}: Content-Type {response.content_type!r}, not text/plain"
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _Failed(FETCH_ERROR, f"{host}: Content-Encoding {encoding!r} refused")
        length = response.content_length
        if length is not None and length > self._max_bytes:
            raise _Failed(
                FETCH_ERROR, f"{host}: body of {length} bytes over the {self._max_bytes} cap"
            )
        body = bytearray()
        while chunk := await response.content.read(_CHUNK):
            body += chunk
            if len(body) > self._max_bytes:
                raise _Failed(FETCH_ERROR, f"{host}: body over the {self._max_bytes} cap")
        return bytes(body)
