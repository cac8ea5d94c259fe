"""The shared state of one relay, opened at start from ``[shared]``: the bounded Redis
store, the fleet key and this relay's id among the fleet's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mta.config import Config
from mta.errors import ConfigError, KeyFileError
from mta.shared.fleet_key import FleetKey
from mta.shared.redis_store import SharedStore


@dataclass(frozen=True)
class SharedState:
    """Redis, the fleet key, and ``relay_id``: who added which TLS-RPT counts (an HMAC
    of the host name and the data directory, so it is stable across restarts and says
    nothing by itself)."""

    store: SharedStore
    key: FleetKey
    relay_id: str
    publish_interval: float


def open_shared(
    config: Config, hostname: str, *, on_state: Callable[[bool], None] | None = None
) -> SharedState | None:
    """``[shared]`` opened (no connection yet: Redis is reached lazily and may be away);
    None without ``redis_url``. A fleet key that cannot be read is a ``ConfigError``."""
    shared = config.shared
    if not shared.enabled:
        return None
    assert shared.key_file is not None  # the loader requires it with redis_url
    try:
        key = FleetKey.load(shared.key_file)
    except KeyFileError as err:
        raise ConfigError(config.source, "shared.key_file", str(err)) from None
    store = SharedStore(shared.redis_url, shared.timeout, on_state=on_state or _ignore)
    relay_id = key.name("relay", hostname, str(Path(config.home).resolve())).split(":")[-1]
    return SharedState(store, key, relay_id, shared.publish_interval)


def _ignore(_up: bool) -> None:
    """No gauge to tell."""
