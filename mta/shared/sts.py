"""The fleet's MTA-STS policy cache in Redis: one HTTPS fetch per policy id for every
relay (``StsResolver(shared=...)``).

One key per domain, ``mta:sts:<HMAC(domain)>``, holding the sealed JSON of the cached
policy (domain, TXT id, policy text, fetch time), expiring with the policy. A relay
whose local cache lacks the id now in ``_mta-sts`` TXT looks here first and fetches
only when the fleet has nothing fresh under that id. The policy text is parsed again
on every read: Redis is not trusted more than the network was. Redis being away (or
a value that does not open) is a miss: the relay fetches, as a relay alone would.
"""

from __future__ import annotations

import contextlib
import json
import logging

from mta.clock import Clock
from mta.policy.mta_sts import StsError, parse_policy
from mta.policy.sts_cache import CachedPolicy
from mta.shared.fleet_key import FleetKey, Unsealable
from mta.shared.redis_store import SharedStore, Unavailable

log = logging.getLogger(__name__)


class SharedPolicies:
    """``SharedPolicyStore`` over Redis (see ``mta.policy.sts_cache``).

    Parameters:
        store: the bounded Redis client; key: seals values and names keys.
        clock: wall-clock time, for the key's expiry.
    """

    def __init__(self, store: SharedStore, key: FleetKey, clock: Clock) -> None:
        self._store, self._key, self._clock = store, key, clock

    def _name(self, domain: str) -> str:
        return self._key.name("sts", domain)

    async def get(self, domain: str) -> CachedPolicy | None:
        """The fleet's cached policy of ``domain``; None when none, or Redis is away."""
        try:
            opened = await self._store.get_opened(self._name(domain), self._key.unseal)
            return None if opened is None else decode(opened, domain)
        except (Unsealable, ValueError, StsError) as err:
            log.warning("shared.sts.unreadable", extra={"error": str(err)})
            return None

    async def put(self, domain: str, entry: CachedPolicy) -> None:
        """Share ``entry`` until it expires (nothing when Redis is away)."""
        ttl = entry.expires_at - self._clock.now()
        if ttl <= 0:
            return
        name = self._name(domain)
        doc = {
            "domain": domain,
            "id": entry.policy_id,
            "policy": entry.text,
            "fetched_at": entry.fetched_at,
        }
        with contextlib.suppress(Unavailable):  # the relay's own cache still has it
            await self._store.put(name, self._key.seal(name, json.dumps(doc).encode()), ttl)


def decode(data: bytes, domain: str) -> CachedPolicy:
    """A shared entry, checked: it is ``domain``'s, and its policy parses."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("domain") != domain:
        raise ValueError("not this domain's policy")
    policy_id, text, fetched_at = doc.get("id"), doc.get("policy"), doc.get("fetched_at")
    if not isinstance(policy_id, str) or not isinstance(text, str):
        raise ValueError("bad entry")
    if isinstance(fetched_at, bool) or not isinstance(fetched_at, int | float):
        raise ValueError("bad fetched_at")
    return CachedPolicy(policy_id, parse_policy(text), text, float(fetched_at))
