"""The fleet's TLS-RPT counts in Redis: one report per policy domain per day, sent by
exactly one relay, with the sum of every relay's sessions (``TlsReporter(fleet=...)``).

- Counts: each relay puts its whole day (``DailyTally`` of its receipt log, sealed)
  into one hash per day, ``mta:tlsrpt-counts:<HMAC(day)>``, under its relay id; it
  replaces its own field each time (every ``[shared] publish_interval``, after
  midnight, and before each send), so a publish is idempotent. The fleet's day is the
  sum of the fields.
- Once: before sending a domain's report a relay takes ``mta:tlsrpt-lock:<HMAC(day,
  domain)>`` (SET NX EX); what was done (the destinations reached, the tries: the
  ``Progress`` the local sent-state also keeps) is sealed under
  ``mta:tlsrpt-sent:<HMAC(day, domain)>``, so no relay sends it again and a failed
  destination is retried by whichever relay runs next.
- Redis away: ``share`` answers None and the relay reports its own sessions alone,
  as without Redis (no report is lost; a domain may then get one per relay).
"""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import Any, Final

from mta.report.tlsrpt import DailyTally, FailureDetail, PolicyType, ReportPolicy
from mta.report.tlsrpt_send import KEEP_DAYS, Progress
from mta.shared.fleet_key import FleetKey, Unsealable
from mta.shared.redis_store import SharedStore, Unavailable

log = logging.getLogger(__name__)

LOCK_TTL: Final = 600.0  # a relay that dies while sending holds the lock this long
KEEP: Final = (KEEP_DAYS + 2) * 86400.0  # counts and sent marks outlive a retry window
_FORMAT: Final = 1


# --- the counts, as JSON (pure) ---


def encode_tally(tally: DailyTally, day: date) -> dict[str, Any]:
    """``day``'s counts of ``tally`` as a JSON document."""
    entries = []
    for domain in tally.domains(day):
        for policy, counts in tally.policies(day, domain).items():
            entries.append(
                {
                    "type": policy.policy_type.value,
                    "domain": policy.domain,
                    "strings": list(policy.policy_string),
                    "mx": list(policy.mx_hosts),
                    "ok": counts.successes,
                    "failures": [[*_detail(d), n] for d, n in counts.failures.items()],
                }
            )
    return {"v": _FORMAT, "day": day.isoformat(), "policies": entries}


def _detail(d: FailureDetail) -> list[str]:
    return [
        d.result_type,
        d.sending_mta_ip,
        d.receiving_mx_hostname,
        d.receiving_ip,
        d.additional_information,
    ]


def decode_tally(doc: Any) -> DailyTally:
    """The counts of ``encode_tally``; ``ValueError`` for anything else."""
    try:
        if doc["v"] != _FORMAT:
            raise ValueError("unknown format")
        day = date.fromisoformat(doc["day"])
        tally = DailyTally()
        for entry in doc["policies"]:
            policy = ReportPolicy(
                PolicyType(entry["type"]),
                _text(entry["domain"]),
                tuple(_text(s) for s in entry["strings"]),
                tuple(_text(s) for s in entry["mx"]),
            )
            failures = {
                FailureDetail(*(_text(v) for v in row[:5])): _count(row[5])
                for row in entry["failures"]
            }
            tally.add_counts(day, policy, _count(entry["ok"]), failures)
        return tally
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"bad counts: {err!r}") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value


def _encode_progress(progress: Progress) -> bytes:
    return json.dumps({"done": sorted(progress.done), "tries": progress.tries}).encode()


def _decode_progress(data: bytes) -> Progress:
    doc = json.loads(data)
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("done"), list)
        and isinstance(doc.get("tries"), dict)
    ):
        raise ValueError("not a sent-mark document")
    return Progress(
        frozenset(_text(d) for d in doc["done"]),
        {_text(k): _count(v) for k, v in doc["tries"].items()},
    )


# --- Redis ---


class FleetReports:
    """``Fleet`` of ``mta.report.tlsrpt_send`` over Redis (module docstring).

    Parameters:
        store: the bounded Redis client; key: seals values and names keys;
        relay_id: this relay's field in the day's counts.
    """

    def __init__(self, store: SharedStore, key: FleetKey, relay_id: str) -> None:
        self._store, self._key, self._relay = store, key, relay_id

    async def publish(self, day: date, tally: DailyTally) -> bool:
        """Put our counts of ``day`` (replacing what we put before); False if Redis is
        away."""
        name = self._key.name("tlsrpt-counts", day.isoformat())
        field = self._key.name("tlsrpt-relay", day.isoformat(), self._relay)
        sealed = self._key.seal(f"{name}/{field}", json.dumps(encode_tally(tally, day)).encode())
        try:
            await self._store.hput(name, field, sealed, KEEP)
        except Unavailable:
            return False
        return True

    async def share(self, day: date, tally: DailyTally) -> DailyTally | None:
        """Publish our counts of ``day``, then the fleet's sum (ours included); None
        when Redis is away (report alone)."""
        if not await self.publish(day, tally):
            return None
        name = self._key.name("tlsrpt-counts", day.isoformat())
        try:
            fields = await self._store.hgetall(name)
        except Unavailable:
            return None
        total = DailyTally()
        for field, sealed in fields.items():
            try:
                plain = self._key.unseal(f"{name}/{field.decode('ascii')}", sealed)
                total.merge(decode_tally(json.loads(plain)))
            except (Unsealable, ValueError, UnicodeDecodeError) as err:
                log.warning("shared.tlsrpt.counts_unreadable", extra={"error": str(err)})
        return total

    async def progress(self, day: date, domain: str) -> Progress | None:
        """What the fleet did for ``domain``'s report of ``day``; None if nothing (or
        Redis is away)."""
        name = self._key.name("tlsrpt-sent", day.isoformat(), domain)
        try:
            opened = await self._store.get_opened(name, self._key.unseal)
            return None if opened is None else _decode_progress(opened)
        except (Unsealable, ValueError) as err:  # a bug is not taken for a bad record
            log.warning("shared.tlsrpt.sent_unreadable", extra={"error": str(err)})
            return Progress(frozenset({"*"}), {"*": 1})  # never send twice

    async def claim(self, day: date, domain: str) -> bool:
        """Take the lock on ``domain``'s report of ``day``: False when another relay
        holds it; True when taken, or when Redis is away (then we report alone)."""
        name = self._key.name("tlsrpt-lock", day.isoformat(), domain)
        try:
            return await self._store.claim(name, self._relay.encode(), LOCK_TTL)
        except Unavailable:
            return True

    async def record(self, day: date, domain: str, progress: Progress) -> None:
        """Mark what was done, and let go of the lock."""
        sent = self._key.name("tlsrpt-sent", day.isoformat(), domain)
        lock = self._key.name("tlsrpt-lock", day.isoformat(), domain)
        try:
            await self._store.put(sent, self._key.seal(sent, _encode_progress(progress)), KEEP)
            await self._store.delete(lock)
        except Unavailable:
            pass  # the lock expires; the local sent-state has it
