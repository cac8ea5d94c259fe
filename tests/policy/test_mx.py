"""MX ordering, null MX and implicit MX (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.mx import MxRecord, hosts_for, is_null_mx, normalise_host, order_hosts


@pytest.mark.parametrize(
    ("records", "null"),
    [
        ([MxRecord(0, "")], True),  # RFC 7505 §3: "0 ."
        ([MxRecord(10, "")], True),  # only root targets: nothing to connect to
        ([MxRecord(0, ""), MxRecord(0, "")], True),
        ([MxRecord(0, ""), MxRecord(10, "mx.example.test")], False),  # misconfigured mixture
        ([MxRecord(10, "mx.example.test")], False),
        ([], False),  # NODATA is an implicit MX, not a null MX
    ],
)
def test_is_null_mx(records: list[MxRecord], null: bool) -> None:
    assert is_null_mx(records) is null


def test_lower_preference_first() -> None:
    records = [MxRecord(30, "c.test"), MxRecord(10, "a.test"), MxRecord(20, "b.test")]
    assert order_hosts(records, random.Random(1)) == ["a.test", "b.test", "c.test"]


def test_equal_preferences_are_shuffled_by_the_injected_random() -> None:
    records = [MxRecord(10, f"mx{i}.test") for i in range(4)] + [MxRecord(5, "first.test")]
    orders = {tuple(order_hosts(records, random.Random(seed))) for seed in range(50)}
    assert all(order[0] == "first.test" for order in orders)
    assert len(orders) > 1  # ties do not always come out in the same order
    assert order_hosts(records, random.Random(7)) == order_hosts(records, random.Random(7))


def test_root_targets_and_repeats_are_dropped() -> None:
    records = [
        MxRecord(0, ""),
        MxRecord(10, "MX.Example.Test."),
        MxRecord(20, "mx.example.test"),
        MxRecord(20, "backup.example.test"),
    ]
    assert order_hosts(records, random.Random(0)) == ["mx.example.test", "backup.example.test"]


def test_no_records_is_the_implicit_mx() -> None:
    assert hosts_for("Example.Test.", [], random.Random(0)) == ["example.test"]


def test_null_mx_gives_no_hosts() -> None:
    assert hosts_for("example.test", [MxRecord(0, "")], random.Random(0)) == []


@pytest.mark.parametrize(
    ("name", "normal"),
    [("MX.Example.TEST.", "mx.example.test"), (".", ""), ("", ""), (" a.test ", "a.test")],
)
def test_normalise_host(name: str, normal: str) -> None:
    assert normalise_host(name) == normal


records_strategy = st.lists(
    st.builds(
        MxRecord,
        st.integers(0, 65535),
        st.sampled_from(["", "a.test", "b.test", "c.test", "d.test", "e.test"]),
    ),
    max_size=12,
)


@given(records_strategy, st.integers())
def test_every_host_once_in_preference_order(records: list[MxRecord], seed: int) -> None:
    hosts = order_hosts(records, random.Random(seed))
    assert len(hosts) == len(set(hosts))
    assert set(hosts) == {r.exchange for r in records} - {""}
    best = {h: min(r.preference for r in records if r.exchange == h) for h in hosts}
    assert [best[h] for h in hosts] == sorted(best[h] for h in hosts)
