"""StsFetcher against real HTTPS servers on loopback (trustme certificates), and the
StsResolver end to end with the real fetcher: a cached policy outlives its server."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trustme

from mta.policy.decide import StsFacts
from mta.policy.dns import DnsTempFail, NoDomain, TxtAnswer
from mta.policy.mta_sts import StsMode, parse_policy
from mta.policy.sts_cache import StsCache, StsResolver
from mta.policy.sts_fetch import StsFetched, StsFetcher, StsFetchFailed, StsFetchResult

from .stsserver import POLICY_PATH, Route, StsServer

T = TypeVar("T")
HOST = "127.0.0.5"
DOMAIN = "good.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
POLICY = "version: STSv1\nmode: enforce\nmx: mx.good.test\nmx: *.mx.good.test\nmax_age: 86400\n"
FETCH_ERROR = "sts-policy-fetch-error"
WEBPKI = "sts-webpki-invalid"
INVALID = "sts-policy-invalid"


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=20)

    return asyncio.run(bounded())


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


class Names:
    """The test's DNS for the fetcher: host -> addresses; records every lookup."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(table) if table is not None else {POLICY_HOST: [HOST]}
        self.lookups: list[str] = []

    async def resolve(self, host: str) -> list[str]:
        self.lookups.append(host)
        return list(self.table.get(host, []))


def fetch(
    port: int,
    ca: trustme.CA,
    *,
    domain: str = DOMAIN,
    names: Names | None = None,
    timeout: float = 5.0,
    max_bytes: int = 64 * 1024,
) -> StsFetchResult:
    async def main() -> StsFetchResult:
        fetcher = StsFetcher(
            resolve=(names or Names()).resolve,
            ssl_context=client_context(ca),
            port=port,
            timeout=timeout,
            max_bytes=max_bytes,
        )
        return await fetcher.fetch(domain)

    return run(main())


def failed(result: StsFetchResult) -> StsFetchFailed:
    assert isinstance(result, StsFetchFailed), result
    return result


@pytest.fixture
def server(tls_ca: trustme.CA) -> Iterator[StsServer]:
    cert = tls_ca.issue_cert(POLICY_HOST)
    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        yield srv


# --- a good fetch ------------------------------------------------------------------------


def test_good_policy(server: StsServer, tls_ca: trustme.CA) -> None:
    names = Names()
    result = fetch(server.port, tls_ca, names=names)
    assert result == StsFetched(parse_policy(POLICY), POLICY)
    assert isinstance(result, StsFetched)
    assert result.policy.mode is StsMode.ENFORCE
    assert server.requests == [POLICY_PATH]
    assert names.lookups == [POLICY_HOST]  # our DNS, the exact domain's policy host


def test_content_type_parameters_and_crlf_are_fine(server: StsServer, tls_ca: trustme.CA) -> None:
    text = POLICY.replace("\n", "\r\n")
    server.set_policy(text, "text/plain; charset=utf-8")
    assert fetch(server.port, tls_ca) == StsFetched(parse_policy(POLICY), text)


def test_chunked_body_under_the_cap_is_read_whole(server: StsServer, tls_ca: trustme.CA) -> None:
    text = POLICY + "".join(f"x-ext{n}: {'v' * 60}\n" for n in range(200))  # > 12 KiB
    server.set_route(POLICY_PATH, Route(200, "text/plain", text, chunked=True))
    assert fetch(server.port, tls_ca) == StsFetched(parse_policy(POLICY), text)


def test_fetcher_is_reusable_and_asks_again_every_time(
    server: StsServer, tls_ca: trustme.CA
) -> None:
    async def main() -> list[StsFetchResult]:
        fetcher = StsFetcher(
            resolve=Names().resolve, ssl_context=client_context(tls_ca), port=server.port
        )
        first = await fetcher.fetch(DOMAIN)
        server.set_policy(POLICY.replace("enforce", "testing"))
        return [first, await fetcher.fetch(DOMAIN)]

    first, second = run(main())
    assert isinstance(first, StsFetched)
    assert isinstance(second, StsFetched)
    assert (first.policy.mode, second.policy.mode) == (StsMode.ENFORCE, StsMode.TESTING)
    assert server.request_count == 2  # no HTTP caching


# --- HTTP-level refusals: sts-policy-fetch-error -----------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/html", "application/octet-stream", "text/plain-ish", None]
)
def test_wrong_content_type(
    server: StsServer, tls_ca: trustme.CA, content_type: str | None
) -> None:
    server.set_route(POLICY_PATH, Route(200, content_type, POLICY))
    assert failed(fetch(server.port, tls_ca)).reason == FETCH_ERROR


def test_redirect_is_not_followed(server: StsServer, tls_ca: trustme.CA) -> None:
    target = f"https://{POLICY_HOST}:{server.port}/elsewhere.txt"
    server.set_route(POLICY_PATH, Route(301, "text/plain", "", {"Location": target}))
    server.set_route("/elsewhere.txt", Route(200, "text/plain", POLICY))
    result = failed(fetch(server.port, tls_ca))
    assert result.reason == FETCH_ERROR
    assert "301" in result.detail
    assert server.requests == [POLICY_PATH]


@pytest.mark.parametrize("status", [204, 404, 500, 503])
def test_status_other_than_200(server: StsServer, tls_ca: trustme.CA, status: int) -> None:
    server.set_route(POLICY_PATH, Route(status, "text/plain", POLICY if status != 204 else ""))
    result = failed(fetch(server.port, tls_ca))
    assert result.reason == FETCH_ERROR
    assert str(status) in result.detail


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_cap(server: StsServer, tls_ca: trustme.CA, chunked: bool) -> None:
    text = POLICY + "x-padding: " + "p" * 3000 + "\n"
    server.set_route(POLICY_PATH, Route(200, "text/plain", text, chunked=chunked))
    result = failed(fetch(server.port, tls_ca, max_bytes=2048))
    assert result.reason == FETCH_ERROR
    assert "cap" in result.detail
    assert isinstance(fetch(server.port, tls_ca, max_bytes=4096), StsFetched)


def test_compressed_body_is_refused(server: StsServer, tls_ca: trustme.CA) -> None:
    server.set_route(POLICY_PATH, Route(200, "text/plain", POLICY, {"Content-Encoding": "gzip"}))
    assert failed(fetch(server.port, tls_ca)).reason == FETCH_ERROR


def test_slow_server_times_out(server: StsServer, tls_ca: trustme.CA) -> None:
    server.set_route(POLICY_PATH, Route(200, "text/plain", POLICY, delay=5.0))
    started = time.monotonic()
    result = failed(fetch(server.port, tls_ca, timeout=0.5))
    assert time.monotonic() - started < 3.0
    assert result.reason == FETCH_ERROR
    assert "timed out" in result.detail


def test_server_down(tls_ca: trustme.CA) -> None:
    with StsServer(HOST, cert=tls_ca.issue_cert(POLICY_HOST)) as srv:
        port = srv.port
    assert failed(fetch(port, tls_ca)).reason == FETCH_ERROR


@pytest.mark.parametrize("table", [{}, {POLICY_HOST: ["not-an-address"]}])
def test_policy_host_does_not_resolve(
    server: StsServer, tls_ca: trustme.CA, table: dict[str, list[str]]
) -> None:
    assert failed(fetch(server.port, tls_ca, names=Names(table))).reason == FETCH_ERROR
    assert server.request_count == 0


def test_resolver_exception_is_a_fetch_error(server: StsServer, tls_ca: trustme.CA) -> None:
    async def broken(host: str) -> list[str]:
        raise RuntimeError(f"resolver down for {host}")

    async def main() -> StsFetchResult:
        fetcher = StsFetcher(resolve=broken, ssl_context=client_context(tls_ca), port=server.port)
        return await fetcher.fetch(DOMAIN)

    assert failed(run(main())).reason == FETCH_ERROR


# --- the body: sts-policy-invalid --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"version: STSv1\nmode: enforce\nmax_age: 86400\n",  # enforce without mx
        b"<html>not a policy</html>",
        b"",
        POLICY.encode() + b"x-note: caf\xe9\n",  # Latin-1, not UTF-8
    ],
)
def test_invalid_policy(server: StsServer, tls_ca: trustme.CA, body: bytes) -> None:
    server.set_route(POLICY_PATH, Route(200, "text/plain", body))
    assert failed(fetch(server.port, tls_ca)).reason == INVALID


# --- the certificate: sts-webpki-invalid -------------------------------------------------


def test_certificate_for_another_name(tls_ca: trustme.CA) -> None:
    cert = tls_ca.issue_cert("mta-sts.other.test", "good.test", "*.good.test.example")
    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        result = failed(fetch(srv.port, tls_ca))
    assert result.reason == WEBPKI
    assert srv.request_count == 0


def test_parent_domain_certificate_is_not_enough(tls_ca: trustme.CA) -> None:
    # the policy host of sub.good.test is mta-sts.sub.good.test, not mta-sts.good.test
    names = Names({"mta-sts.sub.good.test": [HOST]})
    cert = tls_ca.issue_cert(POLICY_HOST)
    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        result = failed(fetch(srv.port, tls_ca, domain="sub.good.test", names=names))
    assert result.reason == WEBPKI
    assert names.lookups == ["mta-sts.sub.good.test"]


def test_untrusted_ca(tls_ca: trustme.CA) -> None:
    stranger = trustme.CA()
    cert = stranger.issue_cert(POLICY_HOST)
    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        result = failed(fetch(srv.port, tls_ca))
    assert result.reason == WEBPKI
    assert srv.request_count == 0


def test_expired_certificate(tls_ca: trustme.CA) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = tls_ca.issue_cert(
        POLICY_HOST, not_before=past, not_after=past + datetime.timedelta(days=30)
    )
    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        assert failed(fetch(srv.port, tls_ca)).reason == WEBPKI


def test_server_certificate_from_pem_files(tls_ca: trustme.CA, tmp_path: Path) -> None:
    leaf = tls_ca.issue_cert(POLICY_HOST)
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_pem))
    leaf.private_key_pem.write_to_path(str(key_pem))
    routes = {POLICY_PATH: Route(200, "text/plain", POLICY)}
    with StsServer(HOST, cert=(cert_pem, key_pem), routes=routes) as srv:
        assert isinstance(fetch(srv.port, tls_ca), StsFetched)


@pytest.mark.parametrize("weaken", ["no-verify", "no-hostname"])
def test_fetcher_refuses_a_context_that_does_not_verify(weaken: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    if weaken == "no-verify":
        context.verify_mode = ssl.CERT_NONE

    async def resolve(host: str) -> list[str]:
        return []

    with pytest.raises(ValueError, match="verifies"):
        StsFetcher(resolve=resolve, ssl_context=context)


# --- StsResolver with the real fetcher ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def now(self) -> float:
        return self.t


class Txt:
    def __init__(self) -> None:
        self.answer: TxtAnswer | NoDomain | DnsTempFail = TxtAnswer(("v=STSv1; id=first1",))

    async def txt(self, name: str) -> TxtAnswer | NoDomain | DnsTempFail:
        assert name == f"_mta-sts.{DOMAIN}"
        return self.answer


def test_cached_policy_is_used_while_the_policy_server_is_down(
    tls_ca: trustme.CA, tmp_path: Path
) -> None:
    path = tmp_path / "sts-cache.json"
    clock, dns = Clock(), Txt()
    cert = tls_ca.issue_cert(POLICY_HOST)
    enforce = parse_policy(POLICY)

    async def facts() -> StsFacts:
        fetcher = StsFetcher(resolve=Names().resolve, ssl_context=client_context(tls_ca), port=port)
        return await StsResolver(dns, fetcher, StsCache.load(path), clock).facts(DOMAIN)

    with StsServer(HOST, cert=cert, routes={POLICY_PATH: Route(200, "text/plain", POLICY)}) as srv:
        port = srv.port
        assert run(facts()) == StsFacts(enforce, "first1", state="fresh")
        assert srv.request_count == 1

    # the server is gone and the domain announces a new policy: the cached one still holds
    clock.t += 3600
    dns.answer = TxtAnswer(("v=STSv1; id=second2",))
    assert run(facts()) == StsFacts(enforce, "first1", state="cached", error=FETCH_ERROR)

    # DNS fails too (after a restart: the cache is read from its file again)
    dns.answer = DnsTempFail("SERVFAIL")
    assert run(facts()) == StsFacts(enforce, "first1", state="cached")

    # once max_age has passed, the cached policy is not applied any more
    clock.t += 86400
    dns.answer = TxtAnswer(("v=STSv1; id=second2",))
    assert run(facts()) == StsFacts(None, state="fetch-error", error=FETCH_ERROR)
