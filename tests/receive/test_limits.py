"""The inbound limits' bookkeeping (mta/receive/limits.py): pure, no sockets, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.receive.limits import (
    RCPT_OVERSHOOT,
    AuthFailures,
    ConnectionGate,
    ErrorBudget,
    client_key,
)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::/84"),
        ("2001:db8::ffff:1", "2001:db8::/84"),  # same /84
        ("2001:db8:0:0:0:1000::1", "2001:db8::1000:0:0/84"),  # another /84
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("", ""),
        ("not an address", "not an address"),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_gate_counts_per_client_and_in_total() -> None:
    gate = ConnectionGate(total=3, per_client=2)
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") == "too many connections from 192.0.2.1"
    assert gate.admit("2001:db8::1") is None
    assert gate.admit("192.0.2.2") == "too many connections"
    assert gate.count == 3
    gate.release("192.0.2.1")
    assert gate.count_for("192.0.2.1") == 1
    assert gate.admit("192.0.2.2") is None


def test_gate_counts_an_ipv6_prefix_as_one_client() -> None:
    gate = ConnectionGate(total=100, per_client=2)
    assert gate.admit("2001:db8::1") is None
    assert gate.admit("2001:db8::2") is None
    assert gate.admit("2001:db8::3") == "too many connections from 2001:db8::3"
    assert gate.admit("2001:db8:1::1") is None  # another /84


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c"])), max_size=60))
def test_gate_never_goes_negative_or_over(ops: list[tuple[bool, str]]) -> None:
    gate = ConnectionGate(total=4, per_client=2)
    held: list[str] = []
    for opening, client in ops:
        if opening:
            if gate.admit(client) is None:
                held.append(client)
        elif client in held:
            held.remove(client)
            gate.release(client)
        assert gate.count == len(held) <= 4
        assert all(gate.count_for(c) == held.count(c) <= 2 for c in "abc")


def test_auth_failures_block_within_the_window_only() -> None:
    failures = AuthFailures(limit=3, window=60.0)
    for now in (0.0, 10.0):
        failures.record("192.0.2.1", now)
        assert not failures.blocked("192.0.2.1", now)
    failures.record("192.0.2.1", 20.0)
    assert failures.blocked("192.0.2.1", 20.0)
    assert failures.blocked("192.0.2.1", 59.0)
    assert not failures.blocked("192.0.2.2", 20.0)
    assert not failures.blocked("192.0.2.1", 60.0)  # the first failure has left the window
    failures.record("192.0.2.1", 61.0)
    assert failures.blocked("192.0.2.1", 61.0)
    assert not failures.blocked("192.0.2.1", 200.0)
    assert len(failures) == 0  # forgotten once nothing is left in the window


def test_auth_failures_table_is_bounded() -> None:
    failures = AuthFailures(limit=1, window=60.0, max_clients=3)
    for n in range(10):
        failures.record(f"192.0.2.{n}", float(n))
    assert len(failures) == 3
    assert failures.blocked("192.0.2.9", 9.0)
    assert not failures.blocked("192.0.2.0", 9.0)  # the oldest were forgotten


@pytest.mark.parametrize(
    ("reply", "counts"),
    [
        ("250 2.0.0 OK", False),
        ("354 End data with <CR><LF>.<CR><LF>", False),
        ("334 VXNlcm5hbWU6", False),
        ("503 5.5.1 Error: need MAIL command", True),
        ("500 5.5.2 Command line too long", True),
        ("535 5.7.8 Authentication credentials invalid", True),
        ("550 5.5.2 Message contains bare CR or LF; line endings must be CRLF", True),
        ("554 5.7.1 Relay access denied", True),
        ("452 4.3.1 Insufficient system storage", False),  # ours, not the client's
        ("451 4.3.0 Local error in processing", False),
        ("421 4.7.0 mx.test Error: too many errors", False),
        ("502 EXPN not implemented", True),  # no enhanced code: still an error
    ],
)
def test_error_budget_counts_the_clients_errors(reply: str, counts: bool) -> None:
    budget = ErrorBudget(limit=100)
    budget.spend(reply)
    assert budget.errors == int(counts)


def test_error_budget_runs_out_at_the_limit() -> None:
    budget = ErrorBudget(limit=3)
    assert [budget.spend("503 5.5.1 Bad sequence") for _ in range(3)] == [False, False, True]


def test_recipient_overshoot_counts_only_past_its_allowance() -> None:
    budget = ErrorBudget(limit=2)
    assert not any(budget.spend("452 4.5.3 Too many recipients") for _ in range(RCPT_OVERSHOOT))
    assert budget.errors == 0
    assert not budget.spend("452 4.5.3 Too many recipients")
    assert budget.spend("452 4.5.3 Too many recipients")


def test_stress_starts_at_nine_tenths_and_ends_under_eight() -> None:
    gate = ConnectionGate(total=10, per_client=10)
    changes = []
    for _ in range(10):
        gate.admit("192.0.2.1")
        changes.append((gate.count, gate.stress_changed(), gate.stressed))
    for _ in range(10):
        gate.release("192.0.2.1")
        changes.append((gate.count, gate.stress_changed(), gate.stressed))
    assert [(count, stressed) for count, changed, stressed in changes if changed] == [
        (9, True),
        (7, False),
    ]
