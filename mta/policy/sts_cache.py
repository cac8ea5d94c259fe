"""The MTA-STS policy cache and resolver: what policy is in force for a domain now.

RFC 8461 §3.3 and §5.1 make MTA-STS trust-on-first-use: its protection against an
attacker who blocks DNS or HTTPS comes from the policies a sender already holds. So
the cache persists across restarts (``StsCache``, one JSON file written atomically)
and ``StsResolver`` follows the RFC's rules for using it:

- the TXT record ``_mta-sts.<domain>`` names the current policy ``id``; the same id
  and an unexpired cached policy -> the cached policy, no fetch;
- a new id, or nothing cached -> fetch; a fetched policy (``mode: none`` too)
  replaces the cached one;
- a failed fetch, a failed or missing TXT record -> the unexpired cached policy if
  there is one, else no policy ("as though the domain has not implemented MTA-STS");
- an expired policy is never applied; only ``_mta-sts.<domain>`` and
  ``mta-sts.<domain>`` of the exact domain are consulted, never a parent's (§3.4);
- policies are refreshed before they expire, in the background (``run_refresher``),
  not on the delivery path.

Several relays may share their policies (``SharedPolicyStore``: ``mta.shared.sts``
keeps them in Redis): before fetching, a relay adopts the fleet's cached policy when it
carries the id wanted and is not near expiry; what it fetches it shares. The local
cache stays the relay's own, and what it falls back to when the shared store is away.

Concurrent ``facts()`` calls for one domain share a single fetch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from mta import durable
from mta.clock import Clock
from mta.policy.decide import StsFacts
from mta.policy.dns import DnsTempFail, NoDomain, TxtAnswer
from mta.policy.mta_sts import StsError, StsPolicy, parse_policy, parse_txt
from mta.policy.mx import normalise_host
from mta.policy.sts_fetch import (
    FETCH_ERROR,
    POLICY_INVALID,
    WEBPKI_INVALID,
    StsFetched,
    StsFetchFailed,
)

log = logging.getLogger(__name__)

CACHE_VERSION: Final = 1
MAX_CACHE_BYTES: Final = 64 * 1024 * 1024
REFRESH_MARGIN_MAX: Final = 86400.0  # refresh at most a day before expiry...
REFRESH_MARGIN_FRACTION: Final = 0.25  # ...or in the last quarter of max_age if shorter
REFRESH_CONCURRENCY: Final = 8
# A failed fetch is answered from memory this long for the same (domain, policy id):
# with the policy host down, each message and retry would otherwise wait out a fresh
# HTTPS timeout. The background refresher does not look here.
FAILED_FETCH_HOLD: Final = 300.0
_POLICY_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_DOMAIN = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as cached: the TXT ``id`` it was fetched under, the parsed policy, the
    text it was parsed from and when it was fetched (epoch seconds)."""

    policy_id: str
    policy: StsPolicy
    text: str
    fetched_at: float

    @property
    def expires_at(self) -> float:
        """The end of the policy's life: ``fetched_at + max_age``."""
        return self.fetched_at + self.policy.max_age

    def is_fresh(self, now: float) -> bool:
        """Whether the policy may still be applied at ``now`` (RFC 8461 §3.2 max_age)."""
        return now < self.expires_at

    def refresh_due(self, now: float) -> bool:
        """Whether expiry is near: within a quarter of max_age or a day, the smaller."""
        margin = min(self.policy.max_age * REFRESH_MARGIN_FRACTION, REFRESH_MARGIN_MAX)
        return self.expires_at - now <= margin


def is_policy_domain(domain: str) -> bool:
    """Whether ``domain`` (normalised) is a DNS name MTA-STS can apply to (not an IP
    literal, not empty, LDH labels)."""
    return len(domain) <= 253 and _DOMAIN.fullmatch(domain) is not None


class StsCache:
    """Cached policies by domain, in memory and (when ``path`` is set) in a JSON file.

    Every ``put`` and ``drop`` rewrites the file atomically (temporary file, fsync,
    rename, directory fsync; mode 0600). A file that cannot be read or parsed is
    logged and the cache starts empty; an entry whose policy no longer parses is
    dropped. Write failures are logged, never raised: the in-memory cache still
    serves. Thread-safe, so the resolver may write from a worker thread.

    Parameters:
        path: the cache file; None keeps the cache in memory only.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._entries: dict[str, CachedPolicy] = {}
        self._lock = threading.Lock()  # guards _entries
        self._write_lock = threading.Lock()  # keeps file writes in mutation order

    @classmethod
    def load(cls, path: Path) -> StsCache:
        """The cache stored at ``path`` (empty when the file is absent or corrupt)."""
        cache = cls(path)
        try:
            data = _read(path)
        except FileNotFoundError:
            return cache
        except (OSError, ValueError) as err:
            log.warning("sts.cache.unreadable", extra={"path": str(path), "error": str(err)})
            return cache
        try:
            cache._entries = _decode(data, path)
        except ValueError as err:
            log.warning("sts.cache.corrupt", extra={"path": str(path), "error": str(err)})
        return cache

    @property
    def path(self) -> Path | None:
        return self._path

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, domain: str) -> CachedPolicy | None:
        """The cached policy of exactly ``domain`` (expired or not), if any."""
        with self._lock:
            return self._entries.get(normalise_host(domain))

    def items(self) -> list[tuple[str, CachedPolicy]]:
        """A snapshot of every (domain, cached policy)."""
        with self._lock:
            return list(self._entries.items())

    def put(self, domain: str, policy_id: str, fetched: StsFetched, now: float) -> CachedPolicy:
        """Cache ``fetched`` as the policy of ``domain`` under ``policy_id``, fetched at
        ``now``, replacing what was there (a ``mode: none`` policy too)."""
        return self.adopt(domain, CachedPolicy(policy_id, fetched.policy, fetched.text, now))

    def adopt(self, domain: str, entry: CachedPolicy) -> CachedPolicy:
        """Cache ``entry`` (another relay's fetch) as the policy of ``domain``."""
        with self._write_lock:
            with self._lock:
                self._entries[normalise_host(domain)] = entry
                data = self._encode()
            self._save(data)
        return entry

    def drop(self, domain: str) -> None:
        """Forget the policy of ``domain``."""
        with self._write_lock:
            with self._lock:
                if self._entries.pop(normalise_host(domain), None) is None:
                    return
                data = self._encode()
            self._save(data)

    def _encode(self) -> bytes:
        policies = {
            domain: {
                "id": entry.policy_id,
                "policy": entry.text,
                "fetched_at": entry.fetched_at,
                "expires_at": entry.expires_at,
            }
            for domain, entry in sorted(self._entries.items())
        }
        doc = {"version": CACHE_VERSION, "policies": policies}
        return json.dumps(doc, indent=1, ensure_ascii=True).encode("ascii")

    def _save(self, data: bytes) -> None:
        if self._path is None:
            return
        try:
            _write_atomically(self._path, data)
        except OSError as err:
            log.error("sts.cache.write_failed", extra={"path": str(self._path), "error": str(err)})


def _read(path: Path) -> bytes:
    data = durable.read_file(path, MAX_CACHE_BYTES + 1)
    if len(data) > MAX_CACHE_BYTES:
        raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
    return data


def _decode(data: bytes, path: Path) -> dict[str, CachedPolicy]:
    """The entries of a cache file; raises ValueError when the file as a whole is bad."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    except RecursionError:  # nested deeper than the interpreter's stack
        raise ValueError("not JSON: nested too deep") from None
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
        raise ValueError(f"not a version {CACHE_VERSION} policy cache")
    policies = doc.get("policies")
    if not isinstance(policies, dict):
        raise ValueError("no 'policies' object")
    entries: dict[str, CachedPolicy] = {}
    for domain, raw in policies.items():
        try:
            entries[_check_domain(domain)] = _decode_entry(raw)
        except (ValueError, StsError) as err:
            log.warning(
                "sts.cache.entry_dropped",
                extra={"path": str(path), "domain": str(domain)[:253], "error": str(err)},
            )
    return entries


def _check_domain(domain: object) -> str:
    if not isinstance(domain, str) or not is_policy_domain(domain):
        raise ValueError("not a domain name")
    return domain


def _decode_entry(raw: Any) -> CachedPolicy:
    if not isinstance(raw, dict):
        raise ValueError("entry is not an object")
    policy_id, text, fetched_at = raw.get("id"), raw.get("policy"), raw.get("fetched_at")
    if not isinstance(policy_id, str) or _POLICY_ID.fullmatch(policy_id) is None:
        raise ValueError("bad policy id")
    if not isinstance(text, str):
        raise ValueError("no policy text")
    if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
        raise ValueError("bad fetched_at")
    # The policy is parsed again, as on a fetch: the file is not trusted more than the
    # network was. expires_at is recomputed from max_age, not read back.
    return CachedPolicy(policy_id, parse_policy(text), text, float(fetched_at))


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace the cache file durably (the spool's primitive: 0600, no links, fsyncs)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    durable.unlink_quietly(tmp)  # left by a crash of an earlier process with our pid
    durable.replace_durably(tmp, path, data)


class TxtLookup(Protocol):
    """The DNS the resolver needs (``mta.policy.dns.DnsClient`` provides it)."""

    async def txt(self, name: str) -> TxtAnswer | NoDomain | DnsTempFail: ...


class SharedPolicyStore(Protocol):
    """The fleet's policies (``mta.shared.sts.SharedPolicies``): never raises; a store
    that is away answers None and forgets what it is given."""

    async def get(self, domain: str) -> CachedPolicy | None: ...

    async def put(self, domain: str, entry: CachedPolicy) -> None: ...


class PolicyFetcher(Protocol):
    """The HTTPS fetch the resolver needs (``mta.policy.sts_fetch.StsFetcher``)."""

    async def fetch(self, domain: str) -> StsFetched | StsFetchFailed: ...


@dataclass(frozen=True, slots=True)
class _TxtId:
    policy_id: str


@dataclass(frozen=True, slots=True)
class _TxtNone:
    """No usable TXT record: absent, unknown for now, or invalid (state says which)."""

    state: str  # "none" (absent or temp failure) or "invalid"
    detail: str


# An RFC 8460 failure of a fetch -> the metrics' result label.
FETCH_RESULTS: Final = {
    FETCH_ERROR: "fetch-error",
    WEBPKI_INVALID: "webpki-invalid",
    POLICY_INVALID: "invalid",
}


def _no_observer(_result: str) -> None:
    """The default observer: nobody is counting."""


class StsResolver:
    """The MTA-STS facts for a domain, from DNS, HTTPS and the cache (RFC 8461 §3.3, §5.1).

    Parameters:
        dns: TXT lookups.
        fetcher: HTTPS policy fetches.
        cache: the policy cache; fetched policies are stored in it.
        clock: wall-clock time for fetch and expiry times.
        observe: told how each HTTPS fetch ended, for the metrics: ``ok``,
            ``fetch-error``, ``webpki-invalid`` or ``invalid`` (``FETCH_RESULTS``).
        shared: the fleet's policies, asked before each fetch and told of each; None
            for a relay alone.
    """

    def __init__(
        self,
        dns: TxtLookup,
        fetcher: PolicyFetcher,
        cache: StsCache,
        clock: Clock,
        *,
        observe: Callable[[str], None] | None = None,
        shared: SharedPolicyStore | None = None,
    ) -> None:
        self._observe = observe or _no_observer
        self._shared = shared
        self._dns = dns
        self._fetcher = fetcher
        self._cache = cache
        self._clock = clock
        self._inflight: dict[str, asyncio.Task[StsFetched | StsFetchFailed]] = {}
        self._failed: dict[tuple[str, str], tuple[StsFetchFailed, float]] = {}

    async def facts(self, domain: str) -> StsFacts:
        """What MTA-STS says about exactly ``domain`` now (never its parent's policy)."""
        domain = normalise_host(domain)
        if not is_policy_domain(domain):
            return StsFacts(policy=None, state="none")
        txt = await self._txt_id(domain)
        cached = self._usable(domain)
        if isinstance(txt, _TxtNone):
            if cached is not None:
                return StsFacts(cached.policy, cached.policy_id, state="cached")
            return StsFacts(policy=None, state=txt.state)
        if cached is not None and cached.policy_id == txt.policy_id:
            return StsFacts(cached.policy, cached.policy_id, state="cached")
        result = self._recent_failure(domain, txt.policy_id) or await self._fetch(
            domain, txt.policy_id
        )
        if isinstance(result, StsFetched):
            return StsFacts(result.policy, txt.policy_id, state="fresh")
        cached = self._usable(domain)  # as of now: the fetch took time
        if cached is not None:
            return StsFacts(cached.policy, cached.policy_id, state="cached", error=result.reason)
        state = "invalid" if result.reason == "sts-policy-invalid" else "fetch-error"
        return StsFacts(policy=None, state=state, error=result.reason)

    async def refresh_due(self) -> int:
        """Refresh cached policies whose expiry is near or whose TXT id changed; forget
        expired ones. Returns how many policies were fetched anew."""
        now = self._clock.now()
        due: list[tuple[str, CachedPolicy]] = []
        for domain, entry in self._cache.items():
            if entry.is_fresh(now):
                due.append((domain, entry))
            else:
                await asyncio.to_thread(self._cache.drop, domain)
                log.info("sts.cache.expired", extra={"domain": domain})
        limit = asyncio.Semaphore(REFRESH_CONCURRENCY)

        async def refresh(domain: str, entry: CachedPolicy) -> bool:
            async with limit:
                return await self._refresh_one(domain, entry, now)

        done = await asyncio.gather(*(refresh(domain, entry) for domain, entry in due))
        count = sum(done)
        log.info("sts.refresh.done", extra={"checked": len(due), "refreshed": count})
        return count

    async def run_refresher(self, interval: float) -> None:
        """Call ``refresh_due`` now and then every ``interval`` seconds, until cancelled."""
        while True:
            try:
                await self.refresh_due()
            except Exception:  # a bad round must not end the loop
                log.exception("sts.refresh.failed")
            await asyncio.sleep(interval)

    async def _refresh_one(self, domain: str, entry: CachedPolicy, now: float) -> bool:
        txt = await self._txt_id(domain)
        new_id = txt.policy_id if isinstance(txt, _TxtId) else None
        changed = new_id is not None and new_id != entry.policy_id
        if not changed and not entry.refresh_due(now):
            return False
        # Near expiry the policy is refetched even when the TXT lookup failed: HTTPS is
        # authenticated, and an attacker who blocks DNS must not make the policy lapse.
        result = await self._fetch(domain, new_id or entry.policy_id)
        return isinstance(result, StsFetched)

    def _recent_failure(self, domain: str, policy_id: str) -> StsFetchFailed | None:
        held = self._failed.get((domain, policy_id))
        if held is None or held[1] <= self._clock.now():
            return None
        return held[0]

    def _remember_failure(self, domain: str, policy_id: str, failed: StsFetchFailed) -> None:
        now = self._clock.now()
        for key in [key for key, (_, until) in self._failed.items() if until <= now]:
            del self._failed[key]  # bounded by the domains failing in one hold period
        self._failed[domain, policy_id] = (failed, now + FAILED_FETCH_HOLD)

    def _usable(self, domain: str) -> CachedPolicy | None:
        entry = self._cache.get(domain)
        if entry is not None and entry.is_fresh(self._clock.now()):
            return entry
        return None

    async def _txt_id(self, domain: str) -> _TxtId | _TxtNone:
        answer = await self._dns.txt(f"_mta-sts.{domain}")
        if isinstance(answer, NoDomain):
            return _TxtNone("none", answer.reason)
        if isinstance(answer, DnsTempFail):
            log.info("sts.txt.tempfail", extra={"domain": domain, "error": answer.reason})
            return _TxtNone("none", answer.reason)
        try:
            return _TxtId(parse_txt(answer.strings))
        except StsError as err:
            # RFC 8461 §3.1: not exactly one valid record -> no available policy.
            log.info("sts.txt.invalid", extra={"domain": domain, "error": str(err)})
            return _TxtNone("invalid", str(err))

    async def _fetch(self, domain: str, policy_id: str) -> StsFetched | StsFetchFailed:
        """One fetch per domain at a time: concurrent callers share the in-flight one."""
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.create_task(self._fetch_and_store(domain, policy_id))
            self._inflight[domain] = task
            task.add_done_callback(_forget(self._inflight, domain))
        # shield: a cancelled caller must not cancel the fetch the others wait on
        return await asyncio.shield(task)

    async def _from_shared(self, domain: str, policy_id: str) -> StsFetched | None:
        """The fleet's policy of ``domain`` under ``policy_id``, adopted into the local
        cache, when one is fresh and not due for refresh; else None (fetch it)."""
        if self._shared is None:
            return None
        entry = await self._shared.get(domain)
        now = self._clock.now()
        if entry is None or entry.policy_id != policy_id or entry.refresh_due(now):
            return None
        await asyncio.to_thread(self._cache.adopt, domain, entry)
        log.info("sts.policy.shared", extra={"domain": domain, "id": policy_id})
        return StsFetched(entry.policy, entry.text)

    async def _fetch_and_store(self, domain: str, policy_id: str) -> StsFetched | StsFetchFailed:
        adopted = await self._from_shared(domain, policy_id)
        if adopted is not None:
            return adopted
        try:
            result = await self._fetcher.fetch(domain)
        except Exception as err:  # a fetcher bug is a failed fetch, not a failed delivery
            log.exception("sts.policy.fetch_crashed", extra={"domain": domain})
            result = StsFetchFailed("sts-policy-fetch-error", f"{type(err).__name__}: {err}")
        if isinstance(result, StsFetchFailed):
            self._observe(FETCH_RESULTS.get(result.reason, "fetch-error"))
            log.warning(
                "sts.policy.fetch_failed",
                extra={"domain": domain, "reason": result.reason, "detail": result.detail},
            )
            self._remember_failure(domain, policy_id, result)
            return result
        self._observe("ok")
        entry = await asyncio.to_thread(
            self._cache.put, domain, policy_id, result, self._clock.now()
        )
        if self._shared is not None:
            await self._shared.put(domain, entry)
        log.info(
            "sts.policy.fetched",
            extra={
                "domain": domain,
                "id": policy_id,
                "mode": result.policy.mode.value,
                "max_age": result.policy.max_age,
            },
        )
        return result


def _forget(
    inflight: dict[str, asyncio.Task[StsFetched | StsFetchFailed]], domain: str
) -> Callable[[asyncio.Task[StsFetched | StsFetchFailed]], None]:
    def done(task: asyncio.Task[StsFetched | StsFetchFailed]) -> None:
        if inflight.get(domain) is task:
            del inflight[domain]

    return done
