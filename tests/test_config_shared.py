"""``[shared]``: Redis off by default; with a URL, a fleet key file is required; one-line
errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta import config
from mta.errors import ConfigError


def parse(text: str) -> config.Config:
    return config.parse_text(text, "test.toml", Path("/data"))


def test_default_is_local_files() -> None:
    shared = config.load_default(Path("/data")).shared
    assert shared == config.SharedConfig()
    assert not shared.enabled
    assert parse("").shared == config.SharedConfig()


def test_a_url_and_a_key_file() -> None:
    shared = parse(
        '[shared]\nredis_url = "redis://127.0.0.1:6379/0"\nkey_file = "keys/shared.key"\n'
        'timeout = "1s"\npublish_interval = "1m"\n'
    ).shared
    assert shared.enabled
    assert shared.redis_url == "redis://127.0.0.1:6379/0"
    assert shared.key_file == Path("/data/keys/shared.key")
    assert (shared.timeout, shared.publish_interval) == (1.0, 60.0)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('redis_url = "http://x"', "shared.redis_url", "expected redis://"),
        ('redis_url = "redis://h"', "shared.key_file", "required with shared.redis_url"),
        ('timeout = "10s"', "shared.timeout", "at most 5s"),
        ('timeout = "0s"', "shared.timeout", "positive"),
        ('publish_interval = "1h"', "shared.publish_interval", "at most 10m"),
        ("publish_interval = 0", "shared.publish_interval", "expected a string"),
        ("redis = 1", "shared.redis", "unknown key"),
    ],
)
def test_bad_values_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[shared]\n{text}\n")
    assert "\n" not in str(caught.value)
    assert caught.value.key == key
    assert problem in caught.value.problem
