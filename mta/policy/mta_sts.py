"""MTA-STS record and policy parsing, and MX pattern matching (RFC 8461 §3.1, §3.2, §4.1).

Pure: no I/O. The resolver hands in the ``_mta-sts`` TXT RRset and the fetched policy
text; this module says what they mean or raises an ``StsError`` (never anything else)
naming what is wrong. Both grammars are RFC 8461's ABNF, written as regular expressions
beside the productions they implement. Where the RFC leaves room, we lean towards
accepting a policy rather than losing it: a rejected policy leaves the domain without
MTA-STS, which is the weaker outcome.

- TXT (§3.1): records not beginning with ``v=STSv1`` are discarded; exactly one must
  remain, with an ``id`` of 1 to 32 letters and digits; extensions are allowed.
- Policy (§3.2): ``key: value`` lines ended by LF or CRLF; ``version: STSv1``, ``mode``
  and ``max_age`` required once, ``mx`` at least once unless the mode is ``none``.
  Unknown keys are ignored. Of a repeated field other than ``mx``, "all entries except
  for the first SHALL be ignored". ``max_age`` above 31557600 counts as 31557600.
- MX patterns (§4.1): ``*.`` stands for exactly one left-most label.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mta.policy.mx import normalise_host

__all__ = [
    "MAX_MAX_AGE",
    "MAX_POLICY_BYTES",
    "StsError",
    "StsMode",
    "StsPolicy",
    "StsPolicyError",
    "StsRecordError",
    "mx_matches",
    "parse_policy",
    "parse_txt",
]

MAX_POLICY_BYTES: Final = 64 * 1024  # §3.3: senders may cap the policy body; 64 KiB is ample
MAX_MAX_AGE: Final = 31557600  # §3.2: "maximum value of 31557600" (one year)

# --- §3.1 TXT record ---------------------------------------------------------------------
# sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
# sts-field-delim = *WSP ";" *WSP
# sts-version     = %s"v=STSv1"
_VERSION_TAG: Final = "v=STSv1"
_WSP: Final = " \t"
# sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
_ID: Final = re.compile(r"id=([A-Za-z0-9]{1,32})")
# sts-extension   = sts-ext-name "=" sts-ext-value
# sts-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
# sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)   ; VCHAR except "=" and ";"
_EXTENSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")

# --- §3.2 policy -------------------------------------------------------------------------
# sts-policy-field-delim = ":" *WSP ; a line is  name field-delim value *WSP  sts-policy-term
# sts-policy-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
# sts-policy-ext-value   = sts-policy-vchar [*(%x20 / sts-policy-vchar) sts-policy-vchar]
# sts-policy-vchar       = %x21-7E / UTF8-2 / UTF8-3 / UTF8-4
_LINE: Final = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*"
    r"(?P<value>[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*"
)
# sts-policy-max-age-value = 1*10(DIGIT)
_MAX_AGE: Final = re.compile(r"[0-9]{1,10}")
# sts-policy-mx-value = ["*."] Domain                       ; Domain as in RFC 5321 §4.1.2
# sub-domain = Let-dig [Ldh-str]  (A-labels only; a final "." is tolerated and dropped)
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_MX: Final = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")
_SINGLE: Final = frozenset({"version", "mode", "max_age"})  # required once; first one counts


class StsMode(enum.Enum):
    """The policy ``mode`` (§5): what a sender does when an MX fails validation."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


def mx_matches(pattern: str, host: str) -> bool:
    """Whether MX host ``host`` matches policy ``mx`` pattern ``pattern`` (§4.1).

    A ``*.`` prefix stands for exactly one left-most label: ``*.example.net`` matches
    ``mx1.example.net``, not ``example.net`` nor ``a.b.example.net``. Case-insensitive;
    final dots are ignored.
    """
    pattern, host = normalise_host(pattern), normalise_host(host)
    if not pattern or not host:
        return False
    if pattern.startswith("*."):
        suffix = pattern[2:]
        label, dot, rest = host.partition(".")
        return bool(suffix) and bool(label) and bool(dot) and rest == suffix
    return host == pattern


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed policy: ``mode``, the allowed ``mx`` patterns, and ``max_age`` in seconds."""

    mode: StsMode
    mx: tuple[str, ...]  # patterns, lower-case, without a final dot; "*.example.net" allowed
    max_age: int  # seconds, 0..MAX_MAX_AGE

    def allows(self, host: str) -> bool:
        """Whether ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> tuple[str, ...]:
        """The policy as its fields (TLS-RPT's ``policy-string``, RFC 8460 §4.4)."""
        mx = tuple(f"mx: {pattern}" for pattern in self.mx)
        return ("version: STSv1", f"mode: {self.mode.value}", *mx, f"max_age: {self.max_age}")


class StsError(ValueError):
    """An MTA-STS record or policy that cannot be used. ``reason`` is the RFC 8460 type."""

    reason: str = "sts-policy-invalid"


class StsRecordError(StsError):
    """The ``_mta-sts`` TXT RRset does not announce exactly one valid policy (§3.1)."""


class StsPolicyError(StsError):
    """The policy text is not a valid policy (§3.2)."""


def parse_txt(strings: Sequence[str]) -> str:
    """The policy ``id`` announced by a ``_mta-sts`` TXT RRset (§3.1).

    Parameters:
        strings: one ``str`` per TXT record, its character-strings already joined.

    Records that do not begin with ``v=STSv1`` are discarded; exactly one may remain and
    it must be well-formed, else ``StsRecordError``. The first ``id`` counts.
    """
    records = [strings] if isinstance(strings, str) else list(strings)
    candidates = [record for record in records if _is_sts_record(record)]
    if len(candidates) != 1:
        raise StsRecordError(f"expected one v=STSv1 TXT record, found {len(candidates)}")
    record = candidates[0]
    first, *fields = record[len(_VERSION_TAG) :].split(";")
    if first.strip(_WSP) or not fields:
        raise StsRecordError(f"expected ';' after {_VERSION_TAG}: {record!r}")
    if not fields[-1].strip(_WSP):
        fields.pop()  # [sts-field-delim] at the end
    policy_id: str | None = None
    for raw in fields:
        field = raw.strip(_WSP)
        id_match = _ID.fullmatch(field)
        if id_match is not None:
            policy_id = policy_id or id_match.group(1)
        elif not field.startswith("id=") and _EXTENSION.fullmatch(field):
            continue  # an extension: ignored
        else:
            raise StsRecordError(f"malformed field {field!r} in {record!r}")
    if policy_id is None:
        raise StsRecordError(f"no id in {record!r}")
    return policy_id


def _is_sts_record(record: str) -> bool:
    """Whether a TXT record claims to be MTA-STS: ``v=STSv1`` then a delimiter or the end."""
    rest = record.removeprefix(_VERSION_TAG)
    return rest != record and (not rest or rest[0] in ";" + _WSP)


def parse_policy(text: str) -> StsPolicy:
    """The policy in ``text``, the body of ``/.well-known/mta-sts.txt`` (§3.2).

    Lines end in LF or CRLF (RFC 8461 errata 6253); blank lines are skipped. Raises
    ``StsPolicyError`` for anything that is not a valid policy.
    """
    if len(text) > MAX_POLICY_BYTES or len(text.encode("utf-8", "surrogatepass")) > (
        MAX_POLICY_BYTES
    ):
        raise StsPolicyError(f"policy longer than {MAX_POLICY_BYTES} bytes")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip(_WSP):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise StsPolicyError(f"line {number}: not a 'key: value' field: {line[:80]!r}")
        name, value = match.group("name", "value")
        if name == "mx":
            mx.append(_mx_pattern(value, number))
        elif name in _SINGLE:
            fields.setdefault(name, value)  # §3.2: of a duplicate, the first counts
    for name in ("version", "mode", "max_age"):
        if name not in fields:
            raise StsPolicyError(f"missing {name!r}")
    if fields["version"] != "STSv1":
        raise StsPolicyError(f"unsupported version {fields['version']!r}")
    try:
        mode = StsMode(fields["mode"])
    except ValueError:
        raise StsPolicyError(f"invalid mode {fields['mode']!r}") from None
    if not _MAX_AGE.fullmatch(fields["max_age"]):
        raise StsPolicyError(f"invalid max_age {fields['max_age']!r}")
    if not mx and mode is not StsMode.NONE:
        raise StsPolicyError(f"mode {mode.value!r} without any 'mx'")
    max_age = min(int(fields["max_age"]), MAX_MAX_AGE)
    return StsPolicy(mode, tuple(dict.fromkeys(mx)), max_age)


def _mx_pattern(value: str, number: int) -> str:
    if not _MX.fullmatch(value):
        raise StsPolicyError(f"line {number}: invalid mx pattern {value!r}")
    return normalise_host(value)
