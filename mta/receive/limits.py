"""Inbound limits that outlive one command: connections, AUTH failures, the error budget.

Pure: no I/O, no clock (callers pass ``now``, monotonic seconds). ``server.py`` builds
one ``ConnectionGate`` and one ``AuthFailures`` for all listeners, so a client cannot
get around a limit by trying another port; each session keeps its own ``ErrorBudget``.

- ``ConnectionGate``: sessions at once, in total (``limits.connections``) and per client
  (``limits.connections_per_client``, Postfix's ``smtpd_client_connection_count_limit``);
  beyond either, the connection gets ``421 4.7.0`` instead of a greeting. It also says
  when the relay is under stress (Postfix's stress mode): from ``STRESS_ENTER`` of
  ``total`` sessions until they are back under ``STRESS_LEAVE`` (two thresholds, so a
  count that hovers at one does not flip the mode, and its log line, back and forth).
- ``AuthFailures``: failed AUTH attempts per client within a sliding window
  (``limits.auth_failures`` per ``limits.auth_failure_window``); once a client has used
  them up, AUTH gets ``421 4.7.0`` until its oldest failure leaves the window. The table
  is bounded: past ``max_clients`` the client whose failures are oldest is forgotten.
- ``ErrorBudget``: error replies in one session (``limits.errors``, Postfix's
  ``smtpd_hard_error_limit``); when it runs out, ``421 4.7.0`` and disconnect. Our own
  trouble (``4.3.x``: spool full, local error) is not the client's error, and the first
  ``RCPT_OVERSHOOT`` "too many recipients" replies are not either (a client that sends
  more recipients than we take is told ``452 4.5.3`` and should carry on, RFC 5321
  §4.5.3.1.10; Postfix's ``smtpd_recipient_overshoot_limit``).

Clients are counted by address, IPv6 clients by their /84 prefix (Postfix 3.8's
``smtpd_client_ipv6_prefix_length``): one IPv6 host controls at least a /64 and could
otherwise spread its connections over as many addresses as it likes.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from typing import Final

IPV6_PREFIX: Final = 84
STRESS_ENTER: Final = 0.9  # share of limits.connections in use that starts stress mode
STRESS_LEAVE: Final = 0.8  # ...and the share below which it ends
RCPT_OVERSHOOT: Final = 1000
MAX_AUTH_CLIENTS: Final = 10_000

_REPLY_CODE = re.compile(r"([245])(\d\d)[ -](?:([245])\.(\d{1,3})\.\d{1,3})?")


def client_key(ip: str) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /84 prefix."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # "" for an unknown peer: all such clients share one count
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class ConnectionGate:
    """Counts open sessions in total and per client.

    Parameters:
        total: sessions at once, every client together.
        per_client: sessions at once from one client (``client_key``).
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self._open: dict[str, int] = {}
        self._count = 0
        self.stressed = False

    def stress_changed(self) -> bool:
        """Update ``stressed`` from the count; True if it has just changed."""
        if self.stressed:
            stressed = self._count >= self.total * STRESS_LEAVE
        else:
            stressed = self._count >= self.total * STRESS_ENTER
        changed, self.stressed = stressed != self.stressed, stressed
        return changed

    def admit(self, client: str) -> str | None:
        """Count a new session from ``client``; None when admitted, else why not.

        An admitted session must be ``release``d exactly once; a refused one must not.
        """
        if self._count >= self.total:
            return "too many connections"
        key = client_key(client)
        if self._open.get(key, 0) >= self.per_client:
            return f"too many connections from {client}"
        self._open[key] = self._open.get(key, 0) + 1
        self._count += 1
        return None

    def release(self, client: str) -> None:
        key = client_key(client)
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
        self._count = max(self._count - 1, 0)

    @property
    def count(self) -> int:
        return self._count

    def count_for(self, client: str) -> int:
        return self._open.get(client_key(client), 0)


class AuthFailures:
    """Failed AUTH attempts per client in a sliding window.

    Parameters:
        limit: failures allowed within ``window``; the next AUTH is refused.
        window: seconds a failure is remembered.
        max_clients: clients remembered at most (the oldest are forgotten first).
    """

    def __init__(self, limit: int, window: float, max_clients: int = MAX_AUTH_CLIENTS) -> None:
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str, now: float) -> bool:
        """Whether ``client`` has used up its failures for now."""
        key = client_key(client)
        times = self._failures.get(key)
        if times is None:
            return False
        self._expire(key, times, now)
        return len(times) >= self.limit

    def record(self, client: str, now: float) -> None:
        """Remember one failed attempt by ``client`` at ``now``."""
        key = client_key(client)
        times = self._failures.pop(key, None) or deque(maxlen=self.limit)
        times.append(now)
        self._failures[key] = times  # re-inserted: the dict is ordered by last failure
        while len(self._failures) > self.max_clients:
            del self._failures[next(iter(self._failures))]

    def _expire(self, key: str, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]

    def __len__(self) -> int:
        return len(self._failures)


class ErrorBudget:
    """Error replies one session may get before it is disconnected.

    Parameters:
        limit: error replies allowed; the one that reaches it ends the session.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.errors = 0
        self._overshoot = 0

    def spend(self, reply: str) -> bool:
        """Count ``reply`` if it is the client's error; True when the budget is used up."""
        match = _REPLY_CODE.match(reply)
        if match is None or match.group(1) == "2":
            return False
        if reply.startswith("421"):
            return False  # we are closing anyway
        if match.group(3) is not None and match.group(4) == "3":
            return False  # X.3.x: the mail system's trouble (spool full, local error)
        if reply.startswith("452 4.5.3"):
            self._overshoot += 1
            if self._overshoot <= RCPT_OVERSHOOT:
                return False
        self.errors += 1
        return self.errors >= self.limit
