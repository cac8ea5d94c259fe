"""What a reload may change, and what it changes (``mta reload``, SIGHUP). Pure: no I/O.

A reload swaps the running relay's configuration for a new one, validated whole
first. Some settings cannot change under a running process (the spool it holds
locked, the user it became, what it logs and seals its receipts with): a new policy
that changes one of them is refused, one line naming the file, the key and "restart
for that", and the relay keeps the old configuration.

Listeners are matched by where they listen and how (``listener_key``): a listener in
both the old and the new policy keeps its socket, so no connection is refused during
a reload, and its next sessions are built from the new configuration (certificates,
``require_tls``, limits, the password file). The others are closed or bound.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from mta.config import Config, ListenerConfig
from mta.errors import ConfigError
from mta.policy.local import DomainPolicy

# (dotted key, value of it): settings that only a restart changes.
RESTART_ONLY: Final[tuple[tuple[str, Callable[[Config], object]], ...]] = (
    ("spool.path", lambda c: c.spool.path),  # the spool lock and the control socket
    ("spool.key_file", lambda c: c.spool.key_file),
    ("server.user", lambda c: c.server.user),
    ("server.workers", lambda c: c.server.workers),  # the processes and their spool shards
    ("hostname", lambda c: c.hostname),
    ("outbound.max_connections", lambda c: c.outbound.max_connections),
    ("log", lambda c: c.log),
    ("receipts", lambda c: c.receipts),
    ("tlsrpt", lambda c: c.tlsrpt),
    ("metrics", lambda c: c.metrics),  # its HTTP listener starts with the relay
)


def refusal(old: Config, new: Config) -> ConfigError | None:
    """The first restart-only setting ``new`` changes, as the error to answer; None if
    the new configuration may replace the old one live."""
    for key, value in RESTART_ONLY:
        if value(old) != value(new):
            problem = f"changed from {_shown(value(old))} to {_shown(value(new))}: "
            return ConfigError(new.source, key, problem + "restart the relay for that")
    return None


def _shown(value: object) -> str:
    return str(value) if isinstance(value, str | Path | int) else "its old value"


def listener_key(listener: ListenerConfig) -> Hashable:
    """What a listener must keep to keep its socket: address, port and mode; for an
    smtps listener also its client-certificate demands (its handshake starts before
    we can swap its TLS context, ``receive.server``)."""
    key: tuple[object, ...] = (listener.address, listener.port, listener.mode)
    if listener.mode == "smtps":
        key += (listener.tls_client_ca, listener.require_client_cert)
    return key


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """Listeners by index: ``kept`` pairs (old index, new index), ``added`` new indexes,
    ``removed`` old indexes."""

    kept: tuple[tuple[int, int], ...]
    added: tuple[int, ...]
    removed: tuple[int, ...]


def plan_listeners(
    old: tuple[ListenerConfig, ...], new: tuple[ListenerConfig, ...]
) -> ListenerPlan:
    """Match the new listeners to the running ones by ``listener_key``."""
    running: dict[Hashable, list[int]] = {}
    for index, listener in enumerate(old):
        running.setdefault(listener_key(listener), []).append(index)
    kept: list[tuple[int, int]] = []
    added: list[int] = []
    for index, listener in enumerate(new):
        same = running.get(listener_key(listener))
        if same:
            kept.append((same.pop(0), index))
        else:
            added.append(index)
    removed = sorted(index for indexes in running.values() for index in indexes)
    return ListenerPlan(tuple(kept), tuple(added), tuple(removed))


@dataclass(frozen=True, slots=True)
class Changes:
    """What a reload changed, for the ``mta.reloaded`` log line and the operator."""

    listeners: ListenerPlan
    domains_added: int
    domains_removed: int
    domains_changed: int

    def facts(self) -> dict[str, int]:
        return {
            "listeners_kept": len(self.listeners.kept),
            "listeners_added": len(self.listeners.added),
            "listeners_removed": len(self.listeners.removed),
            "domains_added": self.domains_added,
            "domains_removed": self.domains_removed,
            "domains_changed": self.domains_changed,
        }


def changes(old: Config, new: Config) -> Changes:
    """What replacing ``old`` by ``new`` changes (``refusal`` must be None first)."""
    before = {policy.name: policy for policy in old.domains}
    after = {policy.name: policy for policy in new.domains}
    return Changes(
        plan_listeners(old.listeners, new.listeners),
        domains_added=len(after.keys() - before.keys()),
        domains_removed=len(before.keys() - after.keys()),
        domains_changed=sum(
            1
            for name in before.keys() & after.keys()
            if _policy(before[name]) != _policy(after[name])
        ),
    )


def _policy(policy: DomainPolicy) -> DomainPolicy:
    """A domain policy without the file it came from (moving it is no change)."""
    return replace(policy, source="")
