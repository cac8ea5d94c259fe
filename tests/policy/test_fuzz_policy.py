"""Fuzzing what destinations publish, beyond tests/policy/test_mta_sts.py and test_dane.py:
MTA-STS policy bodies as bytes off the wire, MX names against policy patterns, the
policy cache file, and TLSA records that are near misses of the real ones.

Only ``StsError`` may escape the MTA-STS parsers; the cache loads (empty, if it must)
whatever the file holds; a TLSA record that differs from the right one in any byte or
parameter never authenticates, and never reaches ``verify_dane``'s fail-closed catch-all
(which would mean an exception we did not foresee).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.policy.dane import TlsaRecord, verify_dane
from mta.policy.mta_sts import StsError, StsMode, StsPolicy, mx_matches, parse_policy
from mta.policy.sts_cache import StsCache, is_policy_domain
from tests.policy.x509kit import HOST, NOW, make_pki, tlsa

PKI = make_pki()  # module level: hypothesis does not mix with function fixtures
CHAIN = PKI.chain
GOOD = [tlsa(3, 1, 1, CHAIN[0]), tlsa(2, 0, 1, CHAIN[1]), tlsa(2, 1, 0, CHAIN[1])]


@settings(deadline=None)  # what is raised matters here, not how fast: no timing flakes
@given(st.binary(max_size=2000))
@example(b"version: STSv1\r\nmode: enforce\r\nmx: \xff.example\r\nmax_age: 1\r\n")
@example(b"version: STSv1\nmode: enforce\nmx: mx.example\nmax_age: " + b"9" * 5000 + b"\n")
def test_policy_body_bytes_raise_only_sts_errors(body: bytes) -> None:
    """The fetcher hands over strict UTF-8 only; anything else never reaches the parser."""
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return
    try:
        policy = parse_policy(text)
    except StsError:
        return
    assert 0 <= policy.max_age <= 31557600
    assert policy.mx or policy.mode is StsMode.NONE


@given(st.text(max_size=60), st.text(max_size=60))
@example("*.", "a.")
@example("*.*.example", "a.b.example")
def test_mx_matches_never_raises(pattern: str, host: str) -> None:
    matched = mx_matches(pattern, host)
    if matched and pattern.startswith("*."):
        assert host.lower().rstrip(".").count(".") == pattern.lower().rstrip(".").count(".")


@given(st.lists(st.text(max_size=30), max_size=4), st.text(max_size=60))
def test_policy_allows_never_raises(patterns: list[str], host: str) -> None:
    StsPolicy(StsMode.ENFORCE, tuple(patterns), 86400).allows(host)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=15,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=40), json_values),
        "policy": st.one_of(
            st.sampled_from(
                ["version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 86400\n", "garbage"]
            ),
            json_values,
        ),
        "fetched_at": st.one_of(st.floats(), st.integers(), json_values),
    },
)
cache_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"version": st.one_of(st.just(1), json_values)},
        optional={"policies": st.dictionaries(st.text(max_size=30), entries, max_size=3)},
    ),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(cache_docs.map(lambda doc: json.dumps(doc).encode()), st.binary(max_size=300)))
@example(b"[" * 5000)  # deeper than the interpreter's recursion limit
@example(b'{"version": 1, "policies": {"a.test": ' + b"[" * 5000 + b"}}")
def test_cache_file_loads_whatever_it_holds(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cache.json"
        path.write_bytes(data)
        cache = StsCache.load(path)
    for domain, entry in cache.items():  # whatever it kept is usable as it stands
        assert is_policy_domain(domain), domain
        assert 0 <= entry.policy.max_age <= 31557600
        assert entry.policy.mx or entry.policy.mode is StsMode.NONE


def _mutations() -> st.SearchStrategy[TlsaRecord]:
    """A right record with one thing changed: a byte of its data, or a parameter."""

    def change(index: int, data: st.DataObject) -> TlsaRecord:
        good = GOOD[index]
        how = data.draw(
            st.sampled_from(["byte", "truncate", "extend", "usage", "selector", "mtype"])
        )
        if how == "byte" and good.data:
            at = data.draw(st.integers(0, len(good.data) - 1))
            flip = data.draw(st.integers(1, 255))
            raw = bytearray(good.data)
            raw[at] ^= flip
            return TlsaRecord(good.usage, good.selector, good.mtype, bytes(raw))
        if how == "truncate":
            return TlsaRecord(good.usage, good.selector, good.mtype, good.data[:-1])
        if how == "extend":
            extra = data.draw(st.binary(min_size=1, max_size=4))
            return TlsaRecord(good.usage, good.selector, good.mtype, good.data + extra)
        if how == "usage":
            usage = data.draw(st.integers(0, 255).filter(lambda u: u != good.usage))
            return TlsaRecord(usage, good.selector, good.mtype, good.data)
        if how == "selector":
            selector = data.draw(st.integers(0, 255).filter(lambda s: s != good.selector))
            return TlsaRecord(good.usage, selector, good.mtype, good.data)
        mtype = data.draw(st.integers(0, 255).filter(lambda m: m != good.mtype))
        return TlsaRecord(good.usage, good.selector, mtype, good.data)

    return st.builds(change, st.integers(0, len(GOOD) - 1), st.data())


@pytest.mark.parametrize("record", GOOD, ids=["3-1-1", "2-0-1", "2-1-0"])
def test_the_right_records_authenticate(record: TlsaRecord) -> None:
    assert verify_dane([record], CHAIN, [HOST], NOW).ok


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(_mutations(), min_size=1, max_size=3),
    names=st.lists(st.text(max_size=30), max_size=2),
)
def test_near_miss_records_never_authenticate(records: list[TlsaRecord], names: list[str]) -> None:
    """(A ``2 x x`` record whose usage became 3 could in principle match the leaf only if
    it named the leaf; none of ours does, so nothing here may authenticate.)"""
    result = verify_dane(records, CHAIN, [HOST, *names], NOW)
    assert not result.ok
    assert not result.detail.startswith("DANE check failed:")  # the catch-all is for bugs
