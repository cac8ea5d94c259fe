"""TLSA usability and DANE matching (RFC 7672 §3, RFC 7671): pure, real certificates, no I/O."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.policy.dane import TlsaRecord, is_usable, verify_dane
from tests.policy.x509kit import HOST, NOW, Pki, build, ec_key, make_pki, spki, tlsa

KEY_TYPES = [trustme.KeyType.ECDSA, trustme.KeyType.RSA]
SELECTORS_MTYPES = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
FIXED_LEAF = build(HOST, ec_key(), names=(HOST,))  # for hypothesis (no function fixtures)


@pytest.fixture(scope="module", params=KEY_TYPES, ids=["ecdsa", "rsa"])
def pki(request: pytest.FixtureRequest) -> Pki:
    key_type: trustme.KeyType = request.param
    return make_pki(key_type)


@pytest.fixture(scope="module")
def other() -> Pki:
    """An unrelated PKI: its certificates and keys must never match ``pki``'s records."""
    return make_pki(trustme.KeyType.ECDSA)


# --- usability (RFC 7672 §3.1.3) ---


@pytest.mark.parametrize(
    ("record", "usable"),
    [
        (TlsaRecord(3, 1, 1, bytes(32)), True),
        (TlsaRecord(3, 0, 1, bytes(32)), True),
        (TlsaRecord(3, 1, 2, bytes(64)), True),
        (TlsaRecord(3, 0, 0, b"\x30\x00"), True),
        (TlsaRecord(2, 0, 1, bytes(32)), True),
        (TlsaRecord(2, 1, 0, b"\x30\x00"), True),
        (TlsaRecord(0, 0, 1, bytes(32)), False),  # PKIX-TA: unusable for SMTP
        (TlsaRecord(1, 1, 1, bytes(32)), False),  # PKIX-EE: unusable for SMTP
        (TlsaRecord(4, 1, 1, bytes(32)), False),  # unknown usage
        (TlsaRecord(3, 2, 1, bytes(32)), False),  # unknown selector
        (TlsaRecord(3, 1, 3, bytes(32)), False),  # unknown matching type
        (TlsaRecord(3, 1, 1, bytes(31)), False),  # SHA-256 digest of the wrong length
        (TlsaRecord(3, 1, 1, bytes(64)), False),
        (TlsaRecord(3, 1, 2, bytes(32)), False),  # SHA-512 digest of the wrong length
        (TlsaRecord(3, 0, 0, b""), False),  # no data at all
    ],
)
def test_is_usable(record: TlsaRecord, usable: bool) -> None:
    assert is_usable(record) is usable


def test_presentation_form() -> None:
    assert str(TlsaRecord(3, 1, 1, bytes.fromhex("ABCD01"))) == "3 1 1 abcd01"


# --- DANE-EE (RFC 7672 §3.1.1) ---


@pytest.mark.parametrize(("selector", "mtype"), SELECTORS_MTYPES)
def test_dane_ee_matches_the_leaf(pki: Pki, selector: int, mtype: int) -> None:
    record = tlsa(3, selector, mtype, pki.chain[0])
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert result.ok, result.detail
    assert result.reason is None
    assert result.matched == record


@pytest.mark.parametrize(("selector", "mtype"), SELECTORS_MTYPES)
def test_dane_ee_mismatch_fails(pki: Pki, other: Pki, selector: int, mtype: int) -> None:
    record = tlsa(3, selector, mtype, other.chain[0])
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"
    assert result.matched is None


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (NOW - timedelta(days=400), NOW - timedelta(days=35)),
        (NOW + timedelta(days=1), NOW + timedelta(days=90)),
    ],
    ids=["expired", "not-yet-valid"],
)
@pytest.mark.parametrize(("selector", "mtype"), [(0, 1), (1, 1)])
def test_dane_ee_ignores_names_and_expiry(
    not_before: datetime, not_after: datetime, selector: int, mtype: int
) -> None:
    # Self-signed, wrong name, outside its validity period: DANE-EE still authenticates it.
    leaf = build(
        "wrong", ec_key(), names=("wrong.example.org",), not_before=not_before, not_after=not_after
    )
    record = tlsa(3, selector, mtype, leaf)
    result = verify_dane([record], [leaf], [HOST], NOW)
    assert result.ok, result.detail
    assert verify_dane([record], [leaf], [], NOW).ok  # no names at all


def test_dane_ee_only_compares_the_leaf(pki: Pki) -> None:
    record = tlsa(3, 1, 1, pki.chain[1])  # the intermediate's key under usage 3
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"


def test_any_matching_record_suffices(pki: Pki, other: Pki) -> None:
    records = [
        TlsaRecord(1, 1, 1, bytes(32)),  # unusable, ignored
        tlsa(3, 1, 1, other.chain[0]),  # usable, does not match
        tlsa(3, 1, 1, pki.chain[0]),  # matches
    ]
    result = verify_dane(records, pki.chain, [HOST], NOW)
    assert result.ok
    assert result.matched == records[2]


def test_dane_ee_refuses_a_weak_key() -> None:
    weak = build(HOST, rsa.generate_private_key(65537, 1024), names=(HOST,))
    result = verify_dane([tlsa(3, 1, 1, weak)], [weak], [HOST], NOW)
    assert not result.ok
    assert result.reason == "weak-key"


# --- DANE-TA (RFC 7672 §3.1.2) ---


@pytest.mark.parametrize(("selector", "mtype"), SELECTORS_MTYPES)
def test_dane_ta_matches_the_presented_intermediate(pki: Pki, selector: int, mtype: int) -> None:
    record = tlsa(2, selector, mtype, pki.intermediate_der)
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert result.ok, result.detail
    assert result.matched == record


@pytest.mark.parametrize(("selector", "mtype"), [(0, 1), (1, 1), (0, 2), (1, 2)])
def test_dane_ta_matches_the_root_when_presented(pki: Pki, selector: int, mtype: int) -> None:
    record = tlsa(2, selector, mtype, pki.root_der)
    result = verify_dane([record], [*pki.chain, pki.root_der], [HOST], NOW)
    assert result.ok, result.detail


@pytest.mark.parametrize(("selector", "mtype"), [(0, 1), (1, 1), (0, 0)])
def test_dane_ta_fails_when_the_anchor_is_not_presented(
    pki: Pki, selector: int, mtype: int
) -> None:
    record = tlsa(2, selector, mtype, pki.root_der)  # the root, but the server omits it
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"


def test_dane_ta_full_key_need_not_be_presented(pki: Pki, other: Pki) -> None:
    """``2 1 0`` publishes the whole key: the certificate it signed becomes the anchor."""
    record = TlsaRecord(2, 1, 0, spki(pki.root_der))
    result = verify_dane([record], pki.chain, [HOST], NOW)
    assert result.ok, result.detail
    assert "signed by the published key" in result.detail
    # Someone else's key signed nothing here.
    assert not verify_dane([TlsaRecord(2, 1, 0, spki(other.root_der))], pki.chain, [HOST], NOW).ok
    # The full key still needs the names and the chain below it.
    wrong = verify_dane([record], pki.chain, ["other.example.net"], NOW)
    assert wrong.reason == "certificate-host-mismatch"


def test_dane_ta_full_key_signing_the_leaf_directly() -> None:
    ta_key = ec_key()
    leaf = build(HOST, ec_key(), issuer=("Private TA", ta_key), names=(HOST,))
    ta_der = build("Private TA", ta_key, ca=True)
    result = verify_dane([TlsaRecord(2, 1, 0, spki(ta_der))], [leaf], [HOST], NOW)
    assert result.ok, result.detail
    expired = build(
        HOST,
        ec_key(),
        issuer=("Private TA", ta_key),
        names=(HOST,),
        not_after=NOW - timedelta(days=1),
    )
    result = verify_dane([TlsaRecord(2, 1, 0, spki(ta_der))], [expired], [HOST], NOW)
    assert result.reason == "certificate-expired"


def test_dane_ta_digest_of_an_absent_key_cannot_match(pki: Pki) -> None:
    record = tlsa(2, 1, 1, pki.root_der)  # only the full key (2 1 0) may be absent
    assert not verify_dane([record], pki.chain, [HOST], NOW).ok


def test_dane_ta_checks_names(pki: Pki) -> None:
    record = tlsa(2, 0, 1, pki.intermediate_der)
    result = verify_dane([record], pki.chain, ["other.example.net"], NOW)
    assert not result.ok
    assert result.reason == "certificate-host-mismatch"
    no_names = verify_dane([record], pki.chain, [], NOW)
    assert no_names.reason == "certificate-host-mismatch"


def test_dane_ta_accepts_any_reference_name(pki: Pki) -> None:
    """TLSA base domain, MX host, next-hop domain: any one in a SAN will do (§3.2.2)."""
    record = tlsa(2, 0, 1, pki.intermediate_der)
    names = ["tlsa-base.example.org", "example.net", f"{HOST.upper()}."]
    assert verify_dane([record], pki.chain, names, NOW).ok


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("mx1.example.net", True),
        ("MX2.EXAMPLE.NET", True),
        ("a.mx1.example.net", False),  # the wildcard covers exactly one label
        ("example.net", False),
    ],
)
def test_dane_ta_wildcards_cover_the_left_most_label(host: str, ok: bool) -> None:
    pki = make_pki(trustme.KeyType.ECDSA, "*.example.net")
    record = tlsa(2, 1, 1, pki.intermediate_der)
    assert verify_dane([record], pki.chain, [host], NOW).ok is ok


@pytest.mark.parametrize(
    ("days_before", "days_after"), [(-400, -35), (1, 90)], ids=["expired", "not-yet-valid"]
)
def test_dane_ta_checks_the_leaf_validity(pki: Pki, days_before: int, days_after: int) -> None:
    chain = pki.issue(
        HOST,
        not_before=NOW + timedelta(days=days_before),
        not_after=NOW + timedelta(days=days_after),
    )
    record = tlsa(2, 0, 1, pki.intermediate_der)
    result = verify_dane([record], chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "certificate-expired"


def test_dane_ta_is_never_matched_against_the_leaf() -> None:
    key = ec_key()
    leaf = build(HOST, key, names=(HOST,), ca=True)  # self-signed, even claims to be a CA
    result = verify_dane([tlsa(2, 0, 1, leaf)], [leaf], [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"


def test_dane_ta_anchor_must_be_a_ca() -> None:
    ta_key = ec_key()
    not_ca = build("Not a CA", ta_key, ca=False)
    leaf = build(HOST, ec_key(), issuer=("Not a CA", ta_key), names=(HOST,))
    result = verify_dane([tlsa(2, 0, 1, not_ca)], [leaf, not_ca], [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"
    real_ca = build("Not a CA", ta_key, ca=True)  # same key and name, now a CA
    assert verify_dane([tlsa(2, 0, 1, real_ca)], [leaf, real_ca], [HOST], NOW).ok


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.mark.parametrize("cert_sign", [True, False])
def test_dane_ta_anchor_key_usage_must_allow_cert_signing(cert_sign: bool) -> None:
    ta_key = ec_key()
    anchor = build("TA", ta_key, ca=True, extra=(_key_usage(cert_sign=cert_sign),))
    leaf = build(HOST, ec_key(), issuer=("TA", ta_key), names=(HOST,))
    assert verify_dane([tlsa(2, 1, 1, anchor)], [leaf, anchor], [HOST], NOW).ok is cert_sign


@pytest.mark.parametrize(
    ("purposes", "ok"),
    [
        ((ExtendedKeyUsageOID.SERVER_AUTH,), True),
        ((ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH), True),
        ((ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,), True),
        ((ExtendedKeyUsageOID.CLIENT_AUTH,), False),  # a client certificate is not a server's
        ((ExtendedKeyUsageOID.EMAIL_PROTECTION,), False),
    ],
)
def test_dane_ta_leaf_usage_must_allow_tls_servers(
    purposes: tuple[x509.ObjectIdentifier, ...], ok: bool
) -> None:
    ta_key = ec_key()
    anchor = build("TA", ta_key, ca=True)
    leaf = build(
        HOST,
        ec_key(),
        issuer=("TA", ta_key),
        names=(HOST,),
        extra=(x509.ExtendedKeyUsage(list(purposes)),),
    )
    result = verify_dane([tlsa(2, 1, 1, anchor)], [leaf, anchor], [HOST], NOW)
    assert result.ok is ok
    # DANE-EE does not care what the leaf says it is for.
    assert verify_dane([tlsa(3, 1, 1, leaf)], [leaf, anchor], [HOST], NOW).ok


def test_dane_ta_signature_must_verify(pki: Pki, other: Pki) -> None:
    """A presented "intermediate" that matches the record but did not sign the leaf."""
    record = tlsa(2, 0, 1, other.intermediate_der)
    result = verify_dane([record], [pki.chain[0], other.intermediate_der], [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"


# --- failing closed ---


def test_only_unusable_records_is_tlsa_invalid(pki: Pki) -> None:
    records = [
        TlsaRecord(1, 1, 1, tlsa(3, 1, 1, pki.chain[0]).data),  # would match, but PKIX-EE
        TlsaRecord(3, 1, 1, b"\x00" * 20),
        TlsaRecord(3, 2, 0, pki.chain[0]),
    ]
    result = verify_dane(records, pki.chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "tlsa-invalid"
    assert verify_dane([], pki.chain, [HOST], NOW).reason == "tlsa-invalid"


@pytest.mark.parametrize(
    "chain",
    [
        [],  # a resumed session presents nothing
        [b""],
        [b"\x30\x03\x02\x01\x01"],  # DER, but not a certificate
        [b"not a certificate at all"],
    ],
    ids=["empty", "empty-der", "not-a-cert", "garbage"],
)
def test_unusable_chains_fail_closed(chain: list[bytes]) -> None:
    record = TlsaRecord(3, 1, 1, bytes(32))
    result = verify_dane([record], chain, [HOST], NOW)
    assert not result.ok
    assert result.reason == "validation-failure"


def test_garbage_after_a_good_leaf_fails_closed(pki: Pki) -> None:
    record = tlsa(3, 1, 1, pki.chain[0])
    result = verify_dane([record], [pki.chain[0], b"\xff\x00garbage"], [HOST], NOW)
    assert not result.ok


def test_overlong_chain_fails_closed(pki: Pki) -> None:
    record = tlsa(2, 0, 1, pki.intermediate_der)
    chain = [*pki.chain, *[pki.intermediate_der] * 20]
    assert not verify_dane([record], chain, [HOST], NOW).ok


def test_naive_now_is_utc(pki: Pki) -> None:
    record = tlsa(2, 0, 1, pki.intermediate_der)
    assert verify_dane([record], pki.chain, [HOST], NOW.replace(tzinfo=None)).ok


records_st = st.builds(
    TlsaRecord,
    usage=st.integers(0, 255),
    selector=st.integers(0, 255),
    mtype=st.integers(0, 255),
    data=st.binary(max_size=80),
)


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(records_st, max_size=4),
    chain=st.lists(st.binary(max_size=200), max_size=4),
    names=st.lists(st.text(max_size=20), max_size=3),
)
def test_random_input_never_raises_and_never_authenticates(
    records: list[TlsaRecord], chain: list[bytes], names: list[str]
) -> None:
    result = verify_dane(records, chain, names, NOW)
    assert result.ok is False
    assert result.reason in {"tlsa-invalid", "validation-failure"}


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=32, max_size=32), selector=st.integers(0, 1))
def test_random_records_never_match_a_real_chain(data: bytes, selector: int) -> None:
    chain = [FIXED_LEAF]
    for usage in (2, 3):
        assert not verify_dane([TlsaRecord(usage, selector, 1, data)], chain, [HOST], NOW).ok


def test_sha512_is_really_sha512(pki: Pki) -> None:
    record = tlsa(3, 0, 2, pki.chain[0])
    assert record.data == hashlib.sha512(pki.chain[0]).digest()
