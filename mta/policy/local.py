"""Per-domain policy entries (``[[domain]]`` tables) and which one applies to a domain.

Pure: no I/O. ``mta.config`` parses the tables (so errors name file and key the same way
as everywhere else); this module holds the value type and the lookup rule: an exact
name beats a ``.parent`` entry, and among ``.parent`` entries the longest wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from mta.model import TlsLevel
from mta.policy.mx import normalise_host

T = TypeVar("T")
_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Nexthop:
    """Where mail for a route goes. ``mx_lookup`` is False for ``[host]`` and IP literals."""

    host: str
    port: int | None
    mx_lookup: bool


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """A local policy for one destination (or its subdomains); it outranks DANE and MTA-STS."""

    name: str  # "partner.example" (exact) or ".example" (subdomains)
    level: TlsLevel
    fingerprints: tuple[str, ...] = ()  # "sha256:<64 hex>", certificate or SPKI digest
    client_cert: Path | None = None  # mutual TLS (relay-to-relay)
    client_key: Path | None = None
    nexthop: Nexthop | None = None
    ca_file: Path | None = None  # trust anchors for verify/secure (a pinned CA)
    source: str = ""  # the policy file it came from


def normalise_fingerprint(text: str) -> str:
    """``"SHA256:AB:CD:..."`` or bare hex -> ``"sha256:abcd..."``; ``ValueError`` otherwise."""
    digits = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if not _HEX64.match(digits):
        raise ValueError(f"expected sha256:<64 hex digits>, got {text!r}")
    return f"sha256:{digits}"


def most_specific(entries: Iterable[T], name_of: Callable[[T], str], domain: str) -> T | None:
    """The entry named ``domain``, else the one with its longest ``.suffix``, else ``*``
    (the rule of ``[[domain]]`` policies and of ``[[route]]``s alike)."""
    domain = normalise_host(domain)
    best: T | None = None
    best_rank = -1
    for entry in entries:
        rank = _rank(name_of(entry), domain)
        if rank > best_rank:
            best, best_rank = entry, rank
    return best


def _rank(pattern: str, domain: str) -> int:
    if pattern == domain:
        return 1 << 30
    if pattern.startswith(".") and domain.endswith(pattern):
        return len(pattern)
    return 0 if pattern == "*" else -1


def find_policy(policies: Sequence[DomainPolicy], domain: str) -> DomainPolicy | None:
    """The entry for ``domain``: exact name first, else the longest matching ``.suffix``."""
    return most_specific(policies, lambda policy: policy.name, domain)
