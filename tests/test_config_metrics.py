"""``[metrics] listen``: IP:PORT (IPv6 in brackets), "" for off, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.errors import ConfigError


def parse(text: str) -> config.Config:
    return config.parse_text(text, "test.toml", Path("/data"))


def test_default_is_loopback_9464() -> None:
    metrics = config.load_default(Path("/data")).metrics
    assert (metrics.host, metrics.port, metrics.enabled) == ("127.0.0.1", 9464, True)
    assert parse("").metrics == config.MetricsConfig()


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9100", "127.0.0.1", 9100),
        ("[::1]:9464", "::1", 9464),
        ("0.0.0.0:9464", "0.0.0.0", 9464),
        ("", "", 0),
    ],
)
def test_listen_forms(listen: str, host: str, port: int) -> None:
    metrics = parse(f'[metrics]\nlisten = "{listen}"\n').metrics
    assert (metrics.host, metrics.port, metrics.enabled) == (host, port, bool(listen))


@pytest.mark.parametrize(
    "listen", ["127.0.0.1", "::1", "::1:9464", "localhost:9464", "127.0.0.1:0", "1.2.3.4:x"]
)
def test_bad_listen_names_the_key(listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f'[metrics]\nlisten = "{listen}"\n')
    assert caught.value.key == "metrics.listen"
    assert "IP:PORT" in caught.value.problem or "port" in caught.value.problem


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse('[metrics]\nlisten = ""\npath = "/metrics"\n')
    assert caught.value.key == "metrics.path"
