"""MX records -> the hosts to try, in order (RFC 5321 §5.1, RFC 7505). Pure: no I/O.

Three rules live here and nowhere else:

- A null MX (RFC 7505 §3: one MX RR, preference 0, exchange ``.``) means the domain
  accepts no mail; the caller bounces with ``556 5.1.10``.
- No MX records at all (NODATA) means an implicit MX: the domain itself, preference 0
  (RFC 5321 §5.1).
- Lower preference first; hosts of equal preference in random order, so that load
  spreads (RFC 5321 §5.1: "the SMTP client SHOULD randomize them"). The randomness is
  an injected ``random.Random`` so tests can fix it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True, slots=True)
class MxRecord:
    """One MX RR. ``exchange`` is lower-case without the final dot; ``""`` is the root."""

    preference: int
    exchange: str


def normalise_host(name: str) -> str:
    """A host name as we compare and store it: lower-case, no final dot (root -> ``""``)."""
    return name.strip().lower().rstrip(".")


def is_null_mx(records: Sequence[MxRecord]) -> bool:
    """Whether the RRset says "no mail here" (RFC 7505).

    RFC 7505 §3 defines a null MX as a single RR ``0 .`` and forbids mixing it with other
    MX RRs. We are lenient about the misconfigured mixture: root targets can never be
    connected to, so they are dropped, and only an RRset of nothing but root targets
    counts as null (its preference is not checked: ``10 .`` cannot mean anything else).
    """
    return bool(records) and all(record.exchange == "" for record in records)


def order_hosts(records: Sequence[MxRecord], rand: random.Random) -> list[str]:
    """Exchange names by ascending preference, ties shuffled, root targets and repeats dropped.

    Parameters:
        records: the MX RRset as returned by DNS.
        rand: the randomness used to shuffle hosts of equal preference.
    """
    ordered: list[str] = []
    seen: set[str] = set()
    by_preference = sorted(records, key=lambda record: record.preference)
    for _preference, group in groupby(by_preference, key=lambda record: record.preference):
        hosts = sorted({normalise_host(record.exchange) for record in group} - {""})
        rand.shuffle(hosts)
        for host in hosts:
            if host not in seen:
                seen.add(host)
                ordered.append(host)
    return ordered


def hosts_for(domain: str, records: Sequence[MxRecord], rand: random.Random) -> list[str]:
    """The hosts to try for a domain given its MX RRset (empty = NODATA = implicit MX).

    Returns an empty list for a null MX; callers check ``is_null_mx`` first to tell the
    sender why.
    """
    if not records:
        return [normalise_host(domain)]
    return order_hosts(records, rand)
