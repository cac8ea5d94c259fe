"""Fuzzing the delivery-state record reader (mta/schedule/state.py ``decode_state``): the
plaintext of a ``spool/state/<qid>`` record. Only ``StateError`` (a ``SpoolCorrupt``)
may escape."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.schedule.state import StateError, decode_state

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
recipients = st.fixed_dictionaries(
    {},
    optional={
        "rcpt": json_values,
        "status": st.one_of(st.sampled_from(["pending", "sent", "bounced", "lost"]), json_values),
        "attempts": json_values,
        "next_attempt": json_values,
        "last_error": json_values,
        "reply": st.one_of(st.tuples(st.integers(), st.text(), st.text()).map(list), json_values),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), json_values),
        "received_at": json_values,
        "rcpts": st.one_of(st.lists(recipients, max_size=3), json_values),
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(documents.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)))
def test_decode_state_raises_only_state_error(data: bytes) -> None:
    with contextlib.suppress(StateError):
        decode_state(data)


def test_decode_state_on_very_deep_nesting() -> None:
    with pytest.raises(StateError):
        decode_state(b'{"v":1,"received_at":0,"rcpts":' + b"[" * 5000 + b"}")
