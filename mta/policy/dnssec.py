"""Whether the resolver validates DNSSEC: the probe's question and its state machine.

Pure: no I/O, no clock (``now`` is a parameter). DANE trusts the AD bit of the
resolver, so a resolver that never sets it (validation off, a forwarder, no trust
anchor) makes every zone look insecure and turns DANE off in silence. Like Postfix's
``dnssec_probe``, the relay asks the resolver for a name that must validate
(``dns.dnssec_probe``, default ``ns:.``: the root's NS RRset) and checks the AD bit
of the answer; ``mta.policy.dnssec_probe`` asks, at start and then periodically, and
keeps the ``DnssecStatus`` below, which the destination resolver, ``mta check`` and the
metrics read.

While the last probe failed, DNSSEC is *unverifiable* (not "insecure"): TLSA records
cannot be told apart from forged ones, so mail that would need them is deferred
(``mta.policy.decide``). A probe that passes later clears the state; ``failures``
keeps counting (a counter for the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

import dns.exception
import dns.name
import dns.rdatatype

DEFAULT_PROBE: Final = "ns:."


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """The probe's question (Postfix syntax ``type:name``), e.g. ``NS`` of ``.``."""

    rdtype: str  # upper case, a known RR type ("NS")
    name: str  # absolute ("." or "test.")

    def __str__(self) -> str:
        return f"{self.rdtype.lower()}:{self.name}"


ROOT_NS: Final = ProbeSpec("NS", ".")  # DEFAULT_PROBE, parsed


def parse_probe(text: str) -> ProbeSpec | None:
    """``"ns:."`` -> ``ProbeSpec("NS", ".")``; ``""`` -> ``None`` (no probe).

    Raises ``ValueError`` with the reason for anything else (the config names the key).
    """
    text = text.strip()
    if not text:
        return None
    kind, sep, name = text.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"expected type:name (like {DEFAULT_PROBE!r}) or '', got {text!r}")
    try:
        rdtype = dns.rdatatype.from_text(kind.upper())
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown DNS record type {kind!r} in {text!r}") from None
    if dns.rdatatype.is_metatype(rdtype) or rdtype == dns.rdatatype.ANY:
        raise ValueError(f"{kind!r} is not a record type a resolver answers from data")
    try:
        absolute = dns.name.from_text(name).to_text().lower()
    except dns.exception.DNSException as err:
        raise ValueError(f"invalid name {name!r}: {err}") from None
    return ProbeSpec(dns.rdatatype.to_text(rdtype), absolute)


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """One probe's result: did the resolver vouch for the answer (AD bit)?"""

    validated: bool
    detail: str


@dataclass(frozen=True, slots=True)
class DnssecStatus:
    """What the relay knows about its resolver's DNSSEC validation right now.

    ``ok``: the last probe was validated, or no probe has run (or none is configured);
    ``last_checked``: clock seconds of the last probe (``None``: never probed);
    ``failures``: failed probes since start (never reset: a counter for the metrics);
    ``probes``: probes made since start.
    """

    ok: bool = True
    last_checked: float | None = None
    failures: int = 0
    probes: int = 0
    detail: str = ""
    resolver: str = ""  # the nameservers asked, as "ip:port, ..."
    probe: str = ""  # the question, "ns:." ("" when probing is off)

    @property
    def state(self) -> str:
        """``validating``, ``unverifiable`` or ``not-probed`` (for reports)."""
        if self.last_checked is None:
            return "not-probed"
        return "validating" if self.ok else "unverifiable"


def after_probe(status: DnssecStatus, answer: ProbeAnswer, now: float) -> DnssecStatus:
    """The status once ``answer`` came in at ``now``: the latest probe decides ``ok``."""
    return replace(
        status,
        ok=answer.validated,
        last_checked=now,
        failures=status.failures + (0 if answer.validated else 1),
        probes=status.probes + 1,
        detail=answer.detail,
    )


def news(before: DnssecStatus, after: DnssecStatus) -> str | None:
    """What the operator must be told about this probe: ``"failed"`` when validation was
    (or was not yet known to be) working and the probe failed, ``"ok"`` on the first pass
    or a recovery, else ``None`` (a repeat: no new line in the log)."""
    if not after.ok and (before.ok or before.last_checked is None):
        return "failed"
    if after.ok and (not before.ok or before.last_checked is None):
        return "ok"
    return None
