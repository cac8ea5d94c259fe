"""Per-domain policy entries (``[[domain]]`` tables) and which one applies to a domain.

Pure: no I/O. ``mta.config`` parses the tables (so errors name file and key the same way
as everywhere else); this module holds the value type and the lookup rule: an exact
name beats a ``.parent`` entry, and among ``.parent`` entries the longest wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from mta.model import TlsLevel
from mta.policy.mx import normalise_host

if TYPE_CHECKING:
    from mta.config import Nexthop

_HEX64: Final = re.compile(r"^[0-9a-f]{64}$")


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


def find_policy(policies: Sequence[DomainPolicy], domain: str) -> DomainPolicy | None:
    """The entry for ``domain``: exact name first, else the longest matching ``.suffix``."""
    domain = normalise_host(domain)
    best: DomainPolicy | None = None
    for policy in policies:
        if policy.name == domain:
            return policy
        suffix = policy.name.startswith(".") and domain.endswith(policy.name)
        if suffix and (best is None or len(policy.name) > len(best.name)):
            best = policy
    return best
