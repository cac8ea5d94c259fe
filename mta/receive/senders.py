"""Which envelope senders an authenticated user may use. Pure: no I/O.

Postfix's ``smtpd_sender_login_maps`` with ``reject_sender_login_mismatch``: once a
client has logged in, ``MAIL FROM`` must name an address the login owns, or the
transaction gets ``553 5.7.1``. A login owns

- itself, when the login name is an address (``alice@example.com``);
- every ``[[sender_login]]`` grant for that user: an address (``ops@example.com``) or a
  whole domain (``@example.com``, that domain only, not its subdomains).

A login that is not an address (``alice``) owns nothing it is not granted. Addresses
compare without regard to case (as Postfix's table lookups do) and without a final dot.
The null sender ``<>`` is allowed to every login, as in Postfix: a user's client sends
read receipts and vacation replies with it (RFC 8098 §2.1, RFC 3834 §3.3), and no one
can be impersonated by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mta.receive.addresses import AddressError, MailPath, parse_domain, parse_path


@dataclass(frozen=True, slots=True)
class SenderLogin:
    """One ``[[sender_login]]`` table: ``user`` may also send as each of ``senders``."""

    user: str
    senders: tuple[str, ...]  # normalised: "local@domain" or "@domain"


def parse_grant(text: str) -> str:
    """``"ops@Example.COM."`` -> ``"ops@example.com"``, ``"@Example.com"`` -> ``"@example.com"``.

    ``ValueError`` (an ``AddressError``) for anything else.
    """
    text = text.strip()
    if text.startswith("@"):
        return "@" + parse_domain(text[1:])
    try:
        path = parse_path(text)
    except AddressError as err:
        raise AddressError(f"expected an address or @domain, got {text!r}: {err}") from None
    if path.route:
        raise AddressError(f"expected an address or @domain, got {text!r}")
    return owned_form(path)


def owned_form(path: MailPath) -> str:
    """The form a sender is compared in: the unquoted local part and domain, lower case."""
    return f"{path.local_part.lower()}@{path.domain}"


def login_address(user: str) -> str | None:
    """The login name as an address it owns, or None when it is not an address."""
    if user.startswith("@") or "@" not in user:
        return None
    try:
        return parse_grant(user)
    except AddressError:
        return None


class SenderLogins:
    """The grants of every user, looked up per ``MAIL FROM``.

    Parameters:
        logins: the ``[[sender_login]]`` tables (one per user).
    """

    def __init__(self, logins: Iterable[SenderLogin]) -> None:
        self._grants = {login.user: frozenset(login.senders) for login in logins}

    def owned(self, user: str) -> frozenset[str]:
        """Everything ``user`` may send as: its own address (if it is one) and its grants."""
        own = login_address(user)
        grants = self._grants.get(user, frozenset())
        return grants | {own} if own is not None else grants

    def allows(self, user: str, sender: MailPath) -> bool:
        """Whether the logged-in ``user`` may use ``sender`` as the reverse-path."""
        if sender.is_null:
            return True
        if sender.route:
            return False
        owned = self.owned(user)
        return owned_form(sender) in owned or f"@{sender.domain}" in owned
