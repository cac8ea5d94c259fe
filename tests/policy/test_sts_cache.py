"""StsCache (a JSON file in tmp_path) and StsResolver with fake DNS, fetcher and clock."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mta.policy.decide import StsFacts
from mta.policy.dns import DnsTempFail, NoDomain, TxtAnswer
from mta.policy.mta_sts import StsMode, parse_policy
from mta.policy.sts_cache import FAILED_FETCH_HOLD, CachedPolicy, StsCache, StsResolver
from mta.policy.sts_fetch import StsFetched, StsFetchFailed

T = TypeVar("T")
T0 = 1_700_000_000.0
DAY = 86400

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.example.net\nmax_age: 604800\n"
TESTING = "version: STSv1\r\nmode: testing\r\nmx: mx2.example.com\r\nmax_age: 86400\r\n"
NONE = "version: STSv1\nmode: none\nmax_age: 604800\n"
SHORT = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 3600\n"
FETCH_ERROR = StsFetchFailed("sts-policy-fetch-error", "connection refused")


def fetched(text: str) -> StsFetched:
    return StsFetched(parse_policy(text), text)


def txt(policy_id: str) -> TxtAnswer:
    return TxtAnswer(strings=(f"v=STSv1; id={policy_id}",))


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout=10)

    return asyncio.run(bounded())


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeDns:
    """TXT answers by name; unknown names are NXDOMAIN. Records every query."""

    def __init__(self, answers: dict[str, TxtAnswer | NoDomain | DnsTempFail] | None = None):
        self.answers = dict(answers or {})
        self.queries: list[str] = []

    async def txt(self, name: str) -> TxtAnswer | NoDomain | DnsTempFail:
        self.queries.append(name)
        await asyncio.sleep(0)
        return self.answers.get(name, NoDomain(f"{name}: NXDOMAIN"))


class FakeFetcher:
    """Fetch results by domain (default: a fetch error). ``gate`` holds every fetch."""

    def __init__(self, results: dict[str, StsFetched | StsFetchFailed] | None = None):
        self.results = dict(results or {})
        self.fetches: list[str] = []
        self.gate: asyncio.Event | None = None
        self.raises: Exception | None = None

    async def fetch(self, domain: str) -> StsFetched | StsFetchFailed:
        self.fetches.append(domain)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.raises is not None:
            raise self.raises
        return self.results.get(domain, FETCH_ERROR)


class Lab:
    """A resolver over fakes and a cache file in ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "sts-cache.json"
        self.dns = FakeDns()
        self.fetcher = FakeFetcher()
        self.clock = Clock()
        self.cache = StsCache.load(self.path)
        self.resolver = StsResolver(self.dns, self.fetcher, self.cache, self.clock)

    def facts(self, domain: str) -> StsFacts:
        return run(self.resolver.facts(domain))

    def seed(self, domain: str, policy_id: str, text: str, age: float = 0.0) -> None:
        """A policy fetched ``age`` seconds ago."""
        self.cache.put(domain, policy_id, fetched(text), self.clock.now() - age)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


# --- CachedPolicy ------------------------------------------------------------------------


def test_cached_policy_expiry() -> None:
    entry = CachedPolicy("a1", parse_policy(SHORT), SHORT, T0)
    assert entry.expires_at == T0 + 3600
    assert entry.is_fresh(T0 + 3599)
    assert not entry.is_fresh(T0 + 3600)


@pytest.mark.parametrize(
    ("max_age", "margin"),
    [(3600, 900), (4 * DAY, DAY), (30 * DAY, DAY), (0, 0)],
)
def test_refresh_margin_is_a_quarter_of_max_age_or_a_day(max_age: int, margin: int) -> None:
    text = f"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: {max_age}\n"
    entry = CachedPolicy("a1", parse_policy(text), text, T0)
    expiry = T0 + max_age
    assert entry.refresh_due(expiry - margin)
    if margin:
        assert not entry.refresh_due(expiry - margin - 1)


# --- StsCache: the file ------------------------------------------------------------------


def test_put_get_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = StsCache.load(path)
    assert len(cache) == 0
    cache.put("Example.COM.", "a1", fetched(ENFORCE), T0)
    cache.put("example.org", "b2", fetched(TESTING), T0 + 5)

    got = cache.get("example.com")
    assert got == CachedPolicy("a1", parse_policy(ENFORCE), ENFORCE, T0)

    again = StsCache.load(path)
    assert again.get("example.com") == got
    assert again.get("EXAMPLE.org.") == CachedPolicy("b2", parse_policy(TESTING), TESTING, T0 + 5)
    assert again.get("example.net") is None
    assert sorted(domain for domain, _ in again.items()) == ["example.com", "example.org"]


def test_file_is_private_json_and_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = StsCache.load(path)
    cache.put("example.com", "a1", fetched(ENFORCE), T0)
    cache.put("example.com", "a2", fetched(NONE), T0 + 1)  # replaces
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["cache.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["version"] == 1
    assert doc["policies"] == {
        "example.com": {
            "id": "a2",
            "policy": NONE,
            "fetched_at": T0 + 1,
            "expires_at": T0 + 1 + 604800,
        }
    }


def test_write_is_durable_fsync_then_rename_then_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        steps.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    StsCache.load(tmp_path / "cache.json").put("example.com", "a1", fetched(ENFORCE), T0)
    assert steps == ["fsync-file", "replace", "fsync-dir"]


def test_stale_temporary_file_does_not_block_a_write(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    (tmp_path / f".cache.json.{os.getpid()}.tmp").write_text("left by a crash")
    cache = StsCache.load(path)
    cache.put("example.com", "a1", fetched(ENFORCE), T0)
    assert StsCache.load(path).get("example.com") is not None
    assert os.listdir(tmp_path) == ["cache.json"]


def test_drop(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = StsCache.load(path)
    cache.put("example.com", "a1", fetched(ENFORCE), T0)
    cache.put("example.org", "b1", fetched(ENFORCE), T0)
    cache.drop("EXAMPLE.com")
    cache.drop("never.cached")
    assert cache.get("example.com") is None
    assert [domain for domain, _ in StsCache.load(path).items()] == ["example.org"]


def test_memory_only_cache_writes_nothing(tmp_path: Path) -> None:
    cache = StsCache()
    cache.put("example.com", "a1", fetched(ENFORCE), T0)
    assert cache.get("example.com") is not None
    assert cache.path is None
    assert os.listdir(tmp_path) == []


def test_missing_file_is_an_empty_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cache = StsCache.load(tmp_path / "absent.json")
    assert len(cache) == 0
    assert caplog.records == []


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe garbage",
        b"[]",
        b'{"version": 2, "policies": {}}',
        b'{"version": 1}',
        b'{"version": 1, "policies": []}',
        b"",
    ],
)
def test_corrupt_file_starts_empty_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        cache = StsCache.load(path)
    assert len(cache) == 0
    assert [r.getMessage() for r in caplog.records] == ["sts.cache.corrupt"]
    cache.put("example.com", "a1", fetched(ENFORCE), T0)  # and the next write repairs it
    assert StsCache.load(path).get("example.com") is not None


def test_bad_entries_are_dropped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"id": "a1", "policy": ENFORCE, "fetched_at": T0, "expires_at": T0 + 604800}
    policies = {
        "good.example": good,
        "badpolicy.example": {**good, "policy": "version: STSv1\nmode: enforce\nmax_age: 1\n"},
        "badid.example": {**good, "id": "not-alnum!"},
        "longid.example": {**good, "id": "a" * 33},
        "notext.example": {**good, "policy": None},
        "badtime.example": {**good, "fetched_at": "yesterday"},
        "booltime.example": {**good, "fetched_at": True},
        "notobject.example": ["a1", ENFORCE],
        "[192.0.2.1]": good,
        "UPPER.example": good,
    }
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"version": 1, "policies": policies}))
    with caplog.at_level(logging.WARNING):
        cache = StsCache.load(path)
    assert [domain for domain, _ in cache.items()] == ["good.example"]
    assert len([r for r in caplog.records if r.getMessage() == "sts.cache.entry_dropped"]) == 9


def test_expiry_is_recomputed_from_max_age_not_read_back(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    entry = {"id": "a1", "policy": SHORT, "fetched_at": T0, "expires_at": T0 + 10 * 365 * DAY}
    path.write_text(json.dumps({"version": 1, "policies": {"example.com": entry}}))
    got = StsCache.load(path).get("example.com")
    assert got is not None
    assert got.expires_at == T0 + 3600


def test_cache_file_behind_a_symlink_is_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "real.json"
    StsCache.load(real).put("example.com", "a1", fetched(ENFORCE), T0)
    link = tmp_path / "cache.json"
    link.symlink_to(real)
    with caplog.at_level(logging.WARNING):
        cache = StsCache.load(link)
    assert len(cache) == 0
    assert [r.getMessage() for r in caplog.records] == ["sts.cache.unreadable"]


def test_write_failure_is_logged_and_memory_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = StsCache(tmp_path / "no-such-dir" / "cache.json")
    with caplog.at_level(logging.ERROR):
        cache.put("example.com", "a1", fetched(ENFORCE), T0)
    assert cache.get("example.com") is not None
    assert [r.getMessage() for r in caplog.records] == ["sts.cache.write_failed"]


# --- StsResolver: RFC 8461 §3.3 / §5.1 ---------------------------------------------------


def test_no_txt_record_no_cache_is_no_policy(lab: Lab) -> None:
    assert lab.facts("example.com") == StsFacts(None, state="none")
    assert lab.dns.queries == ["_mta-sts.example.com"]
    assert lab.fetcher.fetches == []


def test_first_fetch_is_fresh_and_cached_then_reused(lab: Lab) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)

    first = lab.facts("example.com")
    assert first == StsFacts(parse_policy(ENFORCE), "a1", state="fresh")
    assert first.policy is not None
    assert first.policy.mode is StsMode.ENFORCE

    lab.clock.advance(DAY)
    assert lab.facts("example.com") == StsFacts(parse_policy(ENFORCE), "a1", state="cached")
    assert lab.fetcher.fetches == ["example.com"]  # the same id: no second fetch
    saved = StsCache.load(lab.path).get("example.com")
    assert saved is not None
    assert (saved.policy_id, saved.fetched_at) == ("a1", T0)


def test_new_txt_id_triggers_a_fetch_that_replaces_the_policy(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE)
    lab.dns.answers["_mta-sts.example.com"] = txt("a2")
    lab.fetcher.results["example.com"] = fetched(TESTING)
    assert lab.facts("example.com") == StsFacts(parse_policy(TESTING), "a2", state="fresh")
    got = lab.cache.get("example.com")
    assert got is not None
    assert (got.policy_id, got.text) == ("a2", TESTING)


def test_fresh_mode_none_replaces_a_cached_enforce_policy(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE)
    lab.dns.answers["_mta-sts.example.com"] = txt("a2")
    lab.fetcher.results["example.com"] = fetched(NONE)
    facts = lab.facts("example.com")
    assert facts.state == "fresh"
    assert facts.policy is not None
    assert facts.policy.mode is StsMode.NONE
    # ...and it stays replaced: DNS now fails, the cached policy is the "none" one
    lab.dns.answers["_mta-sts.example.com"] = DnsTempFail("timeout")
    facts = lab.facts("example.com")
    assert (facts.state, facts.policy) == ("cached", parse_policy(NONE))


def test_subdomain_never_inherits_the_parent_policy(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE)
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)

    assert lab.facts("mail.example.com") == StsFacts(None, state="none")
    assert lab.dns.queries == ["_mta-sts.mail.example.com"]
    assert lab.fetcher.fetches == []

    lab.dns.answers["_mta-sts.mail.example.com"] = txt("s1")
    facts = lab.facts("mail.example.com")
    assert (facts.state, facts.policy, facts.error) == (
        "fetch-error",
        None,
        "sts-policy-fetch-error",
    )
    assert lab.fetcher.fetches == ["mail.example.com"]  # its own host, not the parent's


def test_failed_fetch_keeps_the_unexpired_cached_policy(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE, age=DAY)
    lab.dns.answers["_mta-sts.example.com"] = txt("a2")
    facts = lab.facts("example.com")
    assert facts == StsFacts(
        parse_policy(ENFORCE), "a1", state="cached", error="sts-policy-fetch-error"
    )
    got = lab.cache.get("example.com")
    assert got is not None
    assert got.policy_id == "a1"  # the cache is not touched by a failure


def test_a_failed_fetch_is_not_retried_for_every_message(lab: Lab) -> None:
    """The policy host is down: the next messages for that domain hear the same failure
    from memory (each fetch could wait out a whole timeout), until the hold expires or
    the TXT id changes."""
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    first = lab.facts("example.com")
    assert first.state == "fetch-error"
    assert lab.facts("example.com") == first
    assert lab.fetcher.fetches == ["example.com"]
    lab.dns.answers["_mta-sts.example.com"] = txt("a2")  # a new policy announced
    lab.facts("example.com")
    assert lab.fetcher.fetches == ["example.com"] * 2
    lab.clock.advance(FAILED_FETCH_HOLD)
    lab.fetcher.results["example.com"] = fetched(ENFORCE)
    assert lab.facts("example.com").state == "fresh"
    assert lab.fetcher.fetches == ["example.com"] * 3


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        ("sts-policy-fetch-error", "fetch-error"),
        ("sts-webpki-invalid", "fetch-error"),
        ("sts-policy-invalid", "invalid"),
    ],
)
def test_failed_fetch_without_cache_is_no_policy_with_the_reason(
    lab: Lab, reason: str, state: str
) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = StsFetchFailed(reason, "detail")
    assert lab.facts("example.com") == StsFacts(None, state=state, error=reason)
    assert lab.cache.get("example.com") is None


@pytest.mark.parametrize(
    "answer",
    [
        DnsTempFail("SERVFAIL"),
        NoDomain("NXDOMAIN"),
        TxtAnswer(strings=("v=STSv1; id=a1", "v=STSv1; id=a2")),  # §3.1: not exactly one
        TxtAnswer(strings=("v=STSv1; id=",)),
    ],
)
def test_txt_trouble_uses_the_unexpired_cached_policy(
    lab: Lab, answer: TxtAnswer | NoDomain | DnsTempFail
) -> None:
    lab.seed("example.com", "a1", ENFORCE, age=DAY)
    lab.dns.answers["_mta-sts.example.com"] = answer
    assert lab.facts("example.com") == StsFacts(parse_policy(ENFORCE), "a1", state="cached")
    assert lab.fetcher.fetches == []


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        (DnsTempFail("SERVFAIL"), "none"),
        (NoDomain("NXDOMAIN"), "none"),
        (TxtAnswer(strings=("v=STSv1; id=a1", "v=STSv1; id=a2")), "invalid"),
        (TxtAnswer(strings=("v=spf1 -all",)), "invalid"),
    ],
)
def test_txt_trouble_without_cache_is_no_policy(
    lab: Lab, answer: TxtAnswer | NoDomain | DnsTempFail, state: str
) -> None:
    lab.dns.answers["_mta-sts.example.com"] = answer
    lab.fetcher.results["example.com"] = fetched(ENFORCE)
    assert lab.facts("example.com") == StsFacts(None, state=state)
    assert lab.fetcher.fetches == []


def test_expired_cached_policy_is_never_used(lab: Lab) -> None:
    lab.seed("example.com", "a1", SHORT, age=3600)  # expires exactly now
    lab.dns.answers["_mta-sts.example.com"] = DnsTempFail("timeout")
    assert lab.facts("example.com") == StsFacts(None, state="none")

    lab.dns.answers["_mta-sts.example.com"] = txt("a1")  # same id, but expired: refetch
    assert lab.facts("example.com") == StsFacts(
        None, state="fetch-error", error="sts-policy-fetch-error"
    )
    assert lab.fetcher.fetches == ["example.com"]

    lab.clock.advance(FAILED_FETCH_HOLD)  # the failure is held that long (test above)
    lab.fetcher.results["example.com"] = fetched(SHORT)
    assert lab.facts("example.com") == StsFacts(parse_policy(SHORT), "a1", state="fresh")


def test_domain_is_normalised_and_ip_literals_are_not_looked_up(lab: Lab) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)
    assert lab.facts("Example.COM.").state == "fresh"
    assert lab.fetcher.fetches == ["example.com"]
    assert lab.facts("[192.0.2.1]") == StsFacts(None, state="none")
    assert lab.facts("") == StsFacts(None, state="none")
    assert lab.dns.queries == ["_mta-sts.example.com"]


def test_fetcher_crash_is_a_fetch_error(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.raises = RuntimeError("bug")
    with caplog.at_level(logging.ERROR):
        facts = lab.facts("example.com")
    assert facts == StsFacts(None, state="fetch-error", error="sts-policy-fetch-error")
    assert "sts.policy.fetch_crashed" in [r.getMessage() for r in caplog.records]


def test_the_cache_survives_a_restart(lab: Lab) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)
    assert lab.facts("example.com").state == "fresh"

    dns = FakeDns({"_mta-sts.example.com": DnsTempFail("timeout")})
    restarted = StsResolver(dns, FakeFetcher(), StsCache.load(lab.path), lab.clock)
    lab.clock.advance(DAY)
    assert run(restarted.facts("example.com")) == StsFacts(
        parse_policy(ENFORCE), "a1", state="cached"
    )


# --- concurrency -------------------------------------------------------------------------


def test_concurrent_facts_share_one_fetch(lab: Lab) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = StsFetchFailed("sts-policy-fetch-error", "down")

    async def main() -> list[StsFacts]:
        lab.fetcher.gate = asyncio.Event()
        calls = [asyncio.create_task(lab.resolver.facts("example.com")) for _ in range(5)]
        await _until(lambda: len(lab.fetcher.fetches) >= 1)
        for _ in range(20):  # let every caller reach the fetch
            await asyncio.sleep(0)
        lab.fetcher.gate.set()
        return await asyncio.gather(*calls)

    results = run(main())
    assert lab.fetcher.fetches == ["example.com"]  # one fetch, even though it failed
    assert all(r.error == "sts-policy-fetch-error" for r in results)
    assert len(lab.dns.queries) == 5


def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(lab: Lab) -> None:
    lab.dns.answers["_mta-sts.example.com"] = txt("a1")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)

    async def main() -> StsFacts:
        lab.fetcher.gate = asyncio.Event()
        first = asyncio.create_task(lab.resolver.facts("example.com"))
        second = asyncio.create_task(lab.resolver.facts("example.com"))
        await _until(lambda: len(lab.fetcher.fetches) >= 1)
        for _ in range(20):
            await asyncio.sleep(0)
        first.cancel()
        lab.fetcher.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert run(main()) == StsFacts(parse_policy(ENFORCE), "a1", state="fresh")
    assert lab.fetcher.fetches == ["example.com"]


def test_different_domains_fetch_independently(lab: Lab) -> None:
    for domain in ("a.example", "b.example"):
        lab.dns.answers[f"_mta-sts.{domain}"] = txt("x1")
        lab.fetcher.results[domain] = fetched(ENFORCE)

    async def main() -> tuple[StsFacts, StsFacts]:
        return await asyncio.gather(
            lab.resolver.facts("a.example"), lab.resolver.facts("b.example")
        )

    assert [f.state for f in run(main())] == ["fresh", "fresh"]
    assert sorted(lab.fetcher.fetches) == ["a.example", "b.example"]


# --- proactive refresh -------------------------------------------------------------------


def test_refresh_due(lab: Lab) -> None:
    week = 604800
    lab.seed("near.example", "n1", ENFORCE, age=week - 3600)  # expires within a day
    lab.seed("far.example", "f1", ENFORCE, age=DAY)  # same id, far from expiry
    lab.seed("moved.example", "m1", ENFORCE, age=DAY)  # new id published
    lab.seed("gone.example", "g1", SHORT, age=2 * 3600)  # expired
    lab.seed("down.example", "d1", ENFORCE, age=week - 60)  # near expiry, fetch fails
    lab.dns.answers.update(
        {
            "_mta-sts.near.example": txt("n1"),
            "_mta-sts.far.example": txt("f1"),
            "_mta-sts.moved.example": txt("m2"),
            "_mta-sts.gone.example": txt("g1"),
            "_mta-sts.down.example": txt("d1"),
        }
    )
    lab.fetcher.results.update(
        {
            "near.example": fetched(ENFORCE),
            "far.example": fetched(ENFORCE),
            "moved.example": fetched(TESTING),
            "gone.example": fetched(SHORT),
        }
    )

    assert run(lab.resolver.refresh_due()) == 2
    assert sorted(lab.fetcher.fetches) == ["down.example", "moved.example", "near.example"]
    cached = dict(lab.cache.items())
    assert sorted(cached) == ["down.example", "far.example", "moved.example", "near.example"]
    assert cached["near.example"].fetched_at == T0  # renewed
    assert (cached["moved.example"].policy_id, cached["moved.example"].text) == ("m2", TESTING)
    assert cached["far.example"].fetched_at == T0 - DAY  # untouched
    assert cached["down.example"].fetched_at == T0 - week + 60  # kept on failure
    assert "gone.example" not in dict(StsCache.load(lab.path).items())


def test_refresh_near_expiry_fetches_even_when_txt_fails(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE, age=604800 - 60)
    lab.dns.answers["_mta-sts.example.com"] = DnsTempFail("blocked")
    lab.fetcher.results["example.com"] = fetched(ENFORCE)
    assert run(lab.resolver.refresh_due()) == 1
    got = lab.cache.get("example.com")
    assert got is not None
    assert (got.policy_id, got.fetched_at) == ("a1", T0)


def test_run_refresher_keeps_going_after_a_failed_round(lab: Lab) -> None:
    lab.seed("example.com", "a1", ENFORCE, age=604800 - 60)
    rounds: list[int] = []
    original = lab.resolver.refresh_due

    async def flaky() -> int:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("first round breaks")
        return await original()

    lab.resolver.refresh_due = flaky  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.create_task(lab.resolver.run_refresher(0.01))
        await _until(lambda: len(rounds) >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert len(rounds) >= 3
    assert lab.fetcher.fetches[:1] == ["example.com"]


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def test_each_fetch_is_observed_by_a_bounded_result(tmp_path: Path) -> None:
    """The metrics' mta_sts_policy_fetches_total: one per HTTPS fetch, by result."""
    seen: list[str] = []
    lab = Lab(tmp_path)
    lab.resolver = StsResolver(lab.dns, lab.fetcher, lab.cache, lab.clock, observe=seen.append)
    lab.fetcher.results.update(
        {
            "good.example": fetched(ENFORCE),
            "bad.example": StsFetchFailed("sts-policy-invalid", "no version"),
            "pkix.example": StsFetchFailed("sts-webpki-invalid", "expired"),
        }
    )
    for domain in ("good.example", "bad.example", "pkix.example", "down.example"):
        lab.dns.answers[f"_mta-sts.{domain}"] = txt("a1")
        lab.facts(domain)
    lab.facts("good.example")  # cached: no fetch, nothing observed
    assert seen == ["ok", "invalid", "webpki-invalid", "fetch-error"]
