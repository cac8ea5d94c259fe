"""MAIL FROM / RCPT TO paths (RFC 5321 §4.1.2): parse them, and spot relay tricks.

Pure: no I/O. ``parse_path`` turns ``<local@domain>`` (optionally with an obsolete
source route ``<@a,@b:local@domain>``) into a ``MailPath`` or raises ``AddressError``.
``relay_tricks`` names the ways a path can ask a downstream host to relay further
than its domain says (Postfix's "sender-specified routing", ``allow_untrusted_routing``):

- a source route ``@a:user@b`` (RFC 5321 Appendix C: stripped, never followed);
- the percent hack ``user%other@b`` (RFC 1123 §5.2.16);
- a UUCP bang path ``other!user@b``;
- a quoted local part that holds ``@``, such as ``"user@other"@b``.

A client that may not relay gets ``554 5.7.1`` for any of these, even when ``b`` is
one of our domains. ``is_local`` says whether a domain is one we accept mail for.

Grammar (RFC 5321 §4.1.2, ASCII only: SMTPUTF8 is not offered)::

    Path          = "<" [ A-d-l ":" ] Mailbox ">"
    A-d-l         = At-domain *( "," At-domain )
    Mailbox       = Local-part "@" ( Domain / address-literal )
    Local-part    = Dot-string / Quoted-string
    Quoted-string = DQUOTE *( qtextSMTP / quoted-pairSMTP ) DQUOTE
    qtextSMTP     = %d32-33 / %d35-91 / %d93-126
    quoted-pairSMTP = %d92 %d32-126
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

MAX_PATH: Final = 256  # RFC 5321 §4.5.3.1.3, without the angle brackets
MAX_DOMAIN: Final = 255  # RFC 5321 §4.5.3.1.2

# RFC 5322 atext: the characters of an unquoted local part between dots.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_QUOTED_CHAR = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]")


class AddressError(ValueError):
    """A path that does not follow RFC 5321 syntax; ``str()`` says what is wrong."""


@dataclass(frozen=True, slots=True)
class MailPath:
    """A parsed path. ``local_part`` is unquoted; ``domain`` is lower case, no final dot.

    The null path ``<>`` has an empty local part and domain.
    """

    local_part: str
    domain: str
    route: tuple[str, ...] = ()
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        return not self.local_part and not self.domain and not self.quoted

    @property
    def address(self) -> str:
        """The mailbox as we store and forward it: route dropped, quoted only when needed."""
        if self.is_null:
            return ""
        return f"{quote_local_part(self.local_part)}@{self.domain}"


def quote_local_part(local_part: str) -> str:
    """A local part as it must be written: a dot-string as is, else a quoted string."""
    if _DOT_STRING.fullmatch(local_part):
        return local_part
    escaped = local_part.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def parse_path(text: str, *, allow_null: bool = False) -> MailPath:
    """Parse a reverse-path or forward-path, with or without the angle brackets.

    Parameters:
        text: ``<user@example.com>``, ``user@example.com``, ``<@relay:user@example.com>``.
        allow_null: whether ``<>`` is acceptable (MAIL FROM only).
    """
    path = text.strip()
    if path.startswith("<") != path.endswith(">"):
        raise AddressError("unbalanced angle brackets")
    if path.startswith("<"):
        path = path[1:-1]
    if not path:
        if allow_null:
            return MailPath("", "")
        raise AddressError("null path not allowed here")
    if len(path) > MAX_PATH:
        raise AddressError(f"path longer than {MAX_PATH} characters")
    route: tuple[str, ...] = ()
    if path.startswith("@"):
        adl, colon, path = path.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        route = tuple(_route_domain(hop) for hop in adl.split(","))
    local_part, quoted, rest = _local_part(path)
    if not rest.startswith("@"):
        raise AddressError("no '@' after the local part")
    return MailPath(local_part, _domain(rest[1:]), route, quoted)


def parse_domain(text: str) -> str:
    """A domain or address literal, checked and normalised as in a path (lower case, no
    final dot); ``AddressError`` otherwise."""
    return _domain(text)


def _route_domain(hop: str) -> str:
    if not hop.startswith("@"):
        raise AddressError(f"bad source route hop {hop!r}")
    return _domain(hop[1:])


def _local_part(text: str) -> tuple[str, bool, str]:
    """Split off the local part: (unquoted local part, was quoted, the rest)."""
    if not text.startswith('"'):
        local, at, domain = text.rpartition("@")
        if not at:
            raise AddressError("no '@' in address")
        if not _DOT_STRING.fullmatch(local):
            raise AddressError("local part is not a dot-string or a quoted string")
        return local, False, at + domain
    chars: list[str] = []
    index = 1
    while index < len(text):
        if text[index] == '"':
            return "".join(chars), True, text[index + 1 :]
        match = _QUOTED_CHAR.match(text, index)
        if not match:
            raise AddressError("bad character in quoted local part")
        chars.append(match.group()[-1])
        index = match.end()
    raise AddressError("unterminated quoted local part")


def _domain(text: str) -> str:
    """Validate a domain or an address literal; return it lower-cased, without a final dot."""
    if text.startswith("["):
        return _address_literal(text)
    domain = text[:-1] if text.endswith(".") else text
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("empty or overlong domain")
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise AddressError("domain is not a valid host name")
    return domain.lower()


def _address_literal(text: str) -> str:
    if not text.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = text[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("bad address literal") from None


def is_bare_postmaster(text: str) -> bool:
    """Whether a forward-path is ``<Postmaster>`` with no domain, in any case (RFC 5321
    §4.1.1.3, §4.5.1: every SMTP server must accept it, for its own postmaster)."""
    path = text.strip()
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    return path.lower() == "postmaster"


def relay_tricks(path: MailPath) -> tuple[str, ...]:
    """The sender-specified routing a path carries, by name; ``()`` for a plain mailbox."""
    tricks = []
    if path.route:
        tricks.append("source-route")
    if "%" in path.local_part:
        tricks.append("percent-hack")
    if "!" in path.local_part:
        tricks.append("bang-path")
    if "@" in path.local_part:
        tricks.append("quoted-at")
    return tuple(tricks)


def is_local(domain: str, local_domains: Iterable[str]) -> bool:
    """Whether mail for ``domain`` is ours to accept from anyone.

    An entry ``example.com`` matches that domain only; ``.example.com`` matches its
    subdomains (as ``route.domain`` does). ``*`` matches nothing: an open relay is never
    one configuration slip away. Address literals are never local.
    """
    domain = domain.lower().rstrip(".")
    if not domain or domain.startswith("["):
        return False
    for entry in local_domains:
        entry = entry.lower().rstrip(".")
        if entry.startswith("."):
            if domain.endswith(entry) and len(domain) > len(entry):
                return True
        elif entry != "*" and domain == entry:
            return True
    return False


def path_argument(argument: str, keyword: str) -> str:
    """The path in a MAIL/RCPT argument (``TO:<a@b> NOTIFY=NEVER`` -> ``<a@b>``).

    Parameters:
        argument: the text after the command verb, as the client sent it.
        keyword: ``"FROM:"`` or ``"TO:"``.
    """
    text = argument.strip()
    if text[: len(keyword)].upper() != keyword:
        raise AddressError(f"expected {keyword}")
    text = text[len(keyword) :].strip()
    if not text.startswith("<"):
        return text.split(None, 1)[0] if text else ""
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[: index + 1]
    raise AddressError("unbalanced angle brackets")
