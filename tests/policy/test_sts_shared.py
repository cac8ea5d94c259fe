"""StsResolver with a shared policy store (several relays): one fetch per policy id for
the fleet; a new id, or a shared policy near expiry, is fetched; a store that is away
answers nothing and the relay fetches as if alone. Fakes for DNS, fetcher, store."""

from __future__ import annotations

from pathlib import Path

from mta.policy.sts_cache import CachedPolicy, StsCache, StsResolver
from tests.policy.test_sts_cache import DAY, ENFORCE, Clock, FakeDns, FakeFetcher, fetched, run, txt


class DictStore:
    """The fleet's policies in a dict; ``away`` makes it answer None and drop puts."""

    def __init__(self) -> None:
        self.entries: dict[str, CachedPolicy] = {}
        self.away = False

    async def get(self, domain: str) -> CachedPolicy | None:
        return None if self.away else self.entries.get(domain)

    async def put(self, domain: str, entry: CachedPolicy) -> None:
        if not self.away:
            self.entries[domain] = entry


class Fleet:
    """Two relays (own caches, own fetchers) over one DNS, clock and shared store."""

    def __init__(self, tmp_path: Path) -> None:
        self.dns = FakeDns({"_mta-sts.example.com": txt("one")})
        self.clock = Clock()
        self.store = DictStore()
        self.fetchers = [FakeFetcher({"example.com": fetched(ENFORCE)}) for _ in range(2)]
        self.caches = [StsCache.load(tmp_path / f"cache{i}.json") for i in range(2)]
        self.relays = [
            StsResolver(self.dns, f, c, self.clock, shared=self.store)
            for f, c in zip(self.fetchers, self.caches, strict=True)
        ]

    def fetches(self) -> list[int]:
        return [len(f.fetches) for f in self.fetchers]


def test_one_fetch_serves_the_fleet(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    first = run(fleet.relays[0].facts("example.com"))
    second = run(fleet.relays[1].facts("example.com"))
    assert fleet.fetches() == [1, 0]
    assert first.policy == second.policy
    assert (first.policy_id, second.policy_id) == ("one", "one")
    # adopted into the second relay's own cache: its fallback if the store goes away
    entry = fleet.caches[1].get("example.com")
    assert entry is not None
    assert entry.policy_id == "one"
    fleet.store.away = True
    assert run(fleet.relays[1].facts("example.com")).state == "cached"
    assert fleet.fetches() == [1, 0]


def test_a_new_id_is_fetched_once_more(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    run(fleet.relays[0].facts("example.com"))
    fleet.dns.answers["_mta-sts.example.com"] = txt("two")
    run(fleet.relays[1].facts("example.com"))
    run(fleet.relays[0].facts("example.com"))
    assert fleet.fetches() == [1, 1]
    assert fleet.store.entries["example.com"].policy_id == "two"


def test_a_shared_policy_near_expiry_is_refreshed_not_adopted(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    run(fleet.relays[0].facts("example.com"))
    run(fleet.relays[1].facts("example.com"))  # adopted: both relays hold it
    fleet.clock.advance(7 * DAY - DAY / 2)  # max_age 604800: in its last day
    run(fleet.relays[1].refresh_due())
    assert fleet.fetches() == [1, 1]
    # the other relay's refresh now adopts the fresh copy
    run(fleet.relays[0].refresh_due())
    assert fleet.fetches() == [1, 1]
    entry = fleet.caches[0].get("example.com")
    assert entry is not None
    assert entry.fetched_at == fleet.clock.now()


def test_a_store_that_is_away_changes_nothing(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.store.away = True
    run(fleet.relays[0].facts("example.com"))
    run(fleet.relays[1].facts("example.com"))
    assert fleet.fetches() == [1, 1]
    assert fleet.store.entries == {}
