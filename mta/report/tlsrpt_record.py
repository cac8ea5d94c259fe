"""The ``_smtp._tls`` TXT record: where a domain wants its TLS reports (RFC 8460 §3).

Pure: no I/O. The resolver hands in the TXT RRset (each record's strings already
joined); this module says where reports go, or ``None`` when the domain does not take
them. The RFC is strict and so are we: records not starting with ``v=TLSRPTv1`` are
discarded, exactly one must remain, it must follow the grammar below, and its ``rua``
must list only ``mailto:`` and ``https:`` URIs; anything else means "no reporting"
(§3: "senders MUST assume the recipient domain does not implement TLSRPT").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

__all__ = ["TlsRptRecord", "parse_tlsrpt_txt"]

# tlsrpt-record    = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]
# field-delim      = *WSP ";" *WSP
# tlsrpt-version   = %s"v=TLSRPTv1"
_VERSION: Final = "v=TLSRPTv1"
_START: Final = re.compile(r"v=TLSRPTv1[ \t]*;")  # §3: others "are discarded"
_DELIM: Final = re.compile(r"[ \t]*;[ \t]*")
# tlsrpt-rua       = %s"rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri)
_URI_SEP: Final = re.compile(r"[ \t]*,[ \t]*")
# tlsrpt-uri       = URI ; commas and "!" MUST be encoded; we take the RFC 3986
#                    characters that may stand in a URI, nothing else
_URI: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#\[\]@$&'()*+;=%]+")
# tlsrpt-extension = tlsrpt-ext-name "=" tlsrpt-ext-value
# tlsrpt-ext-name  = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
# tlsrpt-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)
_EXTENSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_MAILBOX: Final = re.compile(r"[^@\s<>]+@[A-Za-z0-9.-]+")


@dataclass(frozen=True, slots=True)
class TlsRptRecord:
    """The report destinations of one domain, in the record's order."""

    mailto: tuple[str, ...]  # addresses (the ``mailto:`` URIs' paths, unquoted)
    https: tuple[str, ...]  # full ``https://`` URLs to POST to


def parse_tlsrpt_txt(records: Iterable[str]) -> TlsRptRecord | None:
    """Where the domain's reports go, or ``None`` if it takes none (or says it badly)."""
    candidates = [record for record in records if _START.match(record)]
    if len(candidates) != 1:
        return None
    fields = _DELIM.split(candidates[0].rstrip(" \t"))
    if fields[0] != _VERSION:
        return None
    if fields[-1] == "":  # the optional trailing field-delim
        fields.pop()
    ruas = [field for field in fields[1:] if field.startswith("rua=")]
    others = [field for field in fields[1:] if not field.startswith("rua=")]
    if len(ruas) != 1 or not all(_EXTENSION.fullmatch(field) for field in others):
        return None
    return _destinations(ruas[0].removeprefix("rua="))


def _destinations(text: str) -> TlsRptRecord | None:
    mailto: list[str] = []
    https: list[str] = []
    for uri in _URI_SEP.split(text):
        if not _URI.fullmatch(uri):
            return None
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme == "mailto":
            address = unquote(parts.path)
            if parts.query or not _MAILBOX.fullmatch(address):
                return None
            mailto.append(address)
        elif scheme == "https" and parts.hostname:
            https.append(uri)
        else:
            return None
    return TlsRptRecord(tuple(mailto), tuple(https))
