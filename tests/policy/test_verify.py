"""verify_peer for every check kind, fingerprints, trust stores: real certificates, no sockets."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.errors import ConfigError
from mta.model import PeerAuth
from mta.policy.dane import TlsaRecord
from mta.policy.verify import (
    LeafKey,
    PeerCheck,
    TrustStore,
    leaf_key,
    load_trust_store,
    normalise_fingerprint,
    verify_peer,
)
from tests.policy.x509kit import HOST, NOW, Pki, build, ec_key, make_pki, pem, spki, tlsa

OTHER_HOST = "other.example.net"


@pytest.fixture(scope="module", params=[trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def pki(request: pytest.FixtureRequest) -> Pki:
    key_type: trustme.KeyType = request.param
    return make_pki(key_type)


@pytest.fixture(scope="module")
def trust(pki: Pki) -> TrustStore:
    return TrustStore.from_pem(pki.root.cert_pem.bytes())


def pkix(trust: TrustStore | None, *names: str) -> PeerCheck:
    return PeerCheck("pkix", names=names, trust=trust)


# --- fingerprints as configured ---

HEX = "ab" * 32


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{HEX}",
        f"SHA256:{HEX.upper()}",
        HEX,
        ":".join(HEX[i : i + 2] for i in range(0, 64, 2)).upper(),  # OpenSSL's -fingerprint form
        f"sha256:{':'.join(HEX[i : i + 2] for i in range(0, 64, 2))}",
        f"  sha256:{HEX}\n",
    ],
)
def test_normalise_fingerprint_accepts_the_common_forms(text: str) -> None:
    assert normalise_fingerprint(text) == f"sha256:{HEX}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        f"sha1:{'ab' * 20}",  # another algorithm
        f"sha512:{'ab' * 64}",
        f"sha256:{HEX[:-2]}",  # one byte short
        f"sha256:{HEX}ab",  # one byte long
        f"sha256:{HEX[:-1]}g",  # not hex
        f"md5:{HEX}",
    ],
)
def test_normalise_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        normalise_fingerprint(text)


# --- kind "none" ---


def test_none_needs_no_proof() -> None:
    result = verify_peer(PeerCheck("none"), [], NOW)
    assert result.ok
    assert result.reason is None


# --- kind "pkix" ---


def test_pkix_accepts_the_right_name(pki: Pki, trust: TrustStore) -> None:
    result = verify_peer(pkix(trust, HOST), pki.chain, NOW)
    assert result.ok, result.detail
    assert result.reason is None


def test_pkix_accepts_any_of_the_names(pki: Pki, trust: TrustStore) -> None:
    assert verify_peer(pkix(trust, "example.net", f"{HOST.upper()}."), pki.chain, NOW).ok


def test_pkix_other_name_is_a_host_mismatch(pki: Pki, trust: TrustStore) -> None:
    result = verify_peer(pkix(trust, OTHER_HOST), pki.chain, NOW)
    assert not result.ok
    assert result.reason == "certificate-host-mismatch"
    assert verify_peer(pkix(trust), pki.chain, NOW).reason == "certificate-host-mismatch"


def test_pkix_unrelated_store_is_not_trusted(pki: Pki) -> None:
    unrelated = TrustStore.from_pem(trustme.CA().cert_pem.bytes())
    result = verify_peer(pkix(unrelated, HOST), pki.chain, NOW)
    assert not result.ok
    assert result.reason == "certificate-not-trusted"


@pytest.mark.parametrize("store", [TrustStore(), None], ids=["empty", "missing"])
def test_pkix_without_anchors_is_not_trusted(pki: Pki, store: TrustStore | None) -> None:
    result = verify_peer(pkix(store, HOST), pki.chain, NOW)
    assert not result.ok
    assert result.reason == "certificate-not-trusted"


def test_pkix_needs_the_intermediate(pki: Pki, trust: TrustStore) -> None:
    result = verify_peer(pkix(trust, HOST), pki.chain[:1], NOW)
    assert result.reason == "certificate-not-trusted"


def test_pkix_trusting_the_intermediate_is_enough(pki: Pki) -> None:
    """A pinned private CA (a domain's ca_file) may be an intermediate."""
    store = TrustStore.from_pem(pki.intermediate.cert_pem.bytes())
    assert verify_peer(pkix(store, HOST), pki.chain[:1], NOW).ok


@pytest.mark.parametrize(
    ("days_before", "days_after"), [(-400, -35), (1, 90)], ids=["expired", "not-yet-valid"]
)
def test_pkix_leaf_outside_its_validity_is_expired(
    pki: Pki, trust: TrustStore, days_before: int, days_after: int
) -> None:
    chain = pki.issue(
        HOST,
        not_before=NOW + timedelta(days=days_before),
        not_after=NOW + timedelta(days=days_after),
    )
    result = verify_peer(pkix(trust, HOST), chain, NOW)
    assert not result.ok
    assert result.reason == "certificate-expired"


def test_pkix_self_signed_leaf_is_not_trusted(trust: TrustStore) -> None:
    leaf = build(HOST, ec_key(), names=(HOST,))
    assert verify_peer(pkix(trust, HOST), [leaf], NOW).reason == "certificate-not-trusted"


def test_pkix_refuses_a_weak_leaf_key() -> None:
    ca_key = ec_key()
    ca = build("Weak test CA", ca_key, ca=True)
    leaf = build(
        HOST,
        rsa.generate_private_key(65537, 1024),
        issuer=("Weak test CA", ca_key),
        names=(HOST,),
    )
    store = TrustStore.from_pem(pem(ca))
    result = verify_peer(pkix(store, HOST), [leaf, ca], NOW)
    assert not result.ok
    assert result.reason == "weak-key"


# --- kind "dane" ---


def test_dane_delegates_to_verify_dane(pki: Pki) -> None:
    ee = PeerCheck("dane", names=(HOST,), tlsa=(tlsa(3, 1, 1, pki.chain[0]),))
    assert verify_peer(ee, pki.chain, NOW).ok
    ta = PeerCheck("dane", names=(OTHER_HOST,), tlsa=(tlsa(2, 0, 1, pki.intermediate_der),))
    result = verify_peer(ta, pki.chain, NOW)
    assert (result.ok, result.reason) == (False, "certificate-host-mismatch")
    unusable = PeerCheck("dane", names=(HOST,), tlsa=(TlsaRecord(0, 0, 1, bytes(32)),))
    assert verify_peer(unusable, pki.chain, NOW).reason == "tlsa-invalid"


# --- kind "fingerprint" ---


@pytest.mark.parametrize("what", ["cert", "spki"])
def test_fingerprint_of_cert_or_key_matches(pki: Pki, what: str) -> None:
    data = pki.chain[0] if what == "cert" else spki(pki.chain[0])
    pin = "sha256:" + hashlib.sha256(data).hexdigest()
    decoy = "sha256:" + "00" * 32
    check = PeerCheck("fingerprint", fingerprints=(decoy, pin))
    result = verify_peer(check, pki.chain, NOW)
    assert result.ok, result.detail


def test_fingerprint_in_config_form_matches(pki: Pki) -> None:
    digest = hashlib.sha256(pki.chain[0]).hexdigest().upper()
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert verify_peer(PeerCheck("fingerprint", fingerprints=(colons,)), pki.chain, NOW).ok


def test_fingerprint_mismatch_is_not_trusted(pki: Pki) -> None:
    other = make_pki()
    pin = "sha256:" + hashlib.sha256(spki(other.chain[0])).hexdigest()
    result = verify_peer(PeerCheck("fingerprint", fingerprints=(pin,)), pki.chain, NOW)
    assert not result.ok
    assert result.reason == "certificate-not-trusted"
    # Pinning the intermediate does not authenticate the leaf.
    pin = "sha256:" + hashlib.sha256(pki.intermediate_der).hexdigest()
    assert not verify_peer(PeerCheck("fingerprint", fingerprints=(pin,)), pki.chain, NOW).ok
    # No pins, or an unparsable one, match nothing.
    assert not verify_peer(PeerCheck("fingerprint"), pki.chain, NOW).ok
    bad = PeerCheck("fingerprint", fingerprints=("sha256:zz",))
    assert not verify_peer(bad, pki.chain, NOW).ok


def test_fingerprint_ignores_names_and_expiry() -> None:
    """As Postfix's fingerprint level: the pin is the authentication."""
    leaf = build(
        "anything",
        ec_key(),
        names=("elsewhere.example.org",),
        not_before=NOW - timedelta(days=400),
        not_after=NOW - timedelta(days=30),
    )
    pin = "sha256:" + hashlib.sha256(leaf).hexdigest()
    assert verify_peer(PeerCheck("fingerprint", names=(HOST,), fingerprints=(pin,)), [leaf], NOW).ok


def test_fingerprint_refuses_a_weak_key() -> None:
    leaf = build(HOST, rsa.generate_private_key(65537, 1024), names=(HOST,))
    pin = "sha256:" + hashlib.sha256(leaf).hexdigest()
    result = verify_peer(PeerCheck("fingerprint", fingerprints=(pin,)), [leaf], NOW)
    assert (result.ok, result.reason) == (False, "weak-key")


# --- failing closed ---


@pytest.mark.parametrize("kind", ["pkix", "dane", "fingerprint"])
@pytest.mark.parametrize("chain", [[], [b"garbage"]], ids=["empty", "garbage"])
def test_no_usable_chain_fails_every_authenticating_kind(
    pki: Pki, trust: TrustStore, kind: str, chain: list[bytes]
) -> None:
    check = _full_check(kind, pki, trust)
    assert verify_peer(check, pki.chain, NOW).ok  # the same check passes with the real chain
    result = verify_peer(check, chain, NOW)
    assert not result.ok
    assert result.reason is not None


def _full_check(kind: str, pki: Pki, trust: TrustStore) -> PeerCheck:
    pin = "sha256:" + hashlib.sha256(pki.chain[0]).hexdigest()
    if kind == "pkix":
        return PeerCheck("pkix", names=(HOST,), trust=trust)
    if kind == "dane":
        return PeerCheck("dane", names=(HOST,), tlsa=(tlsa(3, 1, 1, pki.chain[0]),))
    return PeerCheck("fingerprint", fingerprints=(pin,))


def test_unknown_kind_fails_closed(pki: Pki) -> None:
    check = PeerCheck("bogus")  # type: ignore[arg-type]
    result = verify_peer(check, pki.chain, NOW)
    assert (result.ok, result.reason) == (False, "validation-failure")


RANDOM_TRUST = TrustStore.from_pem(trustme.CA().cert_pem.bytes())
checks_st = st.sampled_from(
    [
        PeerCheck("pkix", names=(HOST,), trust=RANDOM_TRUST),
        PeerCheck("pkix", names=(HOST,), trust=None),
        PeerCheck("dane", names=(HOST,), tlsa=(TlsaRecord(3, 1, 1, bytes(32)),)),
        PeerCheck("dane", names=(HOST,), tlsa=(TlsaRecord(2, 1, 0, b"\x30\x00"),)),
        PeerCheck("fingerprint", fingerprints=("sha256:" + "00" * 32,)),
    ]
)


@settings(max_examples=200, deadline=None)
@given(check=checks_st, chain=st.lists(st.binary(max_size=300), max_size=4))
def test_random_chains_never_raise_and_never_pass(check: PeerCheck, chain: list[bytes]) -> None:
    result = verify_peer(check, chain, NOW)
    assert result.ok is False
    assert result.reason is not None


# --- trust stores ---


def test_trust_store_deduplicates_and_knows_when_it_is_empty(pki: Pki) -> None:
    pem = pki.root.cert_pem.bytes()
    store = TrustStore.from_pem(pem + pem + pki.intermediate.cert_pem.bytes())
    assert len(store) == 2
    assert store.store is not None
    empty = TrustStore()
    assert len(empty) == 0
    assert empty.store is None


def test_trust_store_from_pem_rejects_a_bad_block() -> None:
    bad = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message varies
        TrustStore.from_pem(bad)


def test_load_trust_store_reads_extra_files(tmp_path: Path, pki: Pki) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(b"# our CA\n" + pki.root.cert_pem.bytes())
    store = load_trust_store([ca_file], system=False)
    assert len(store) == 1
    assert verify_peer(pkix(store, HOST), pki.chain, NOW).ok


def test_load_trust_store_adds_the_system_bundle(tmp_path: Path, pki: Pki) -> None:
    ca_file = tmp_path / "ca.pem"
    pki.root.cert_pem.write_to_path(str(ca_file))
    with_system = load_trust_store([ca_file])
    assert len(with_system) > 1  # the system's public roots are there too
    assert verify_peer(pkix(with_system, HOST), pki.chain, NOW).ok


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot load"),
        (b"", "no PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
            "cannot load",
        ),
    ],
    ids=["missing", "empty", "key-only", "bad-block"],
)
def test_load_trust_store_names_a_bad_file(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_trust_store([path], system=False)
    assert caught.value.source == str(path)


# --- how the peer was authenticated (issue 8 §4) and its key (§1) ---


def test_each_kind_says_how_the_peer_was_authenticated(pki: Pki, trust: TrustStore) -> None:
    pin = "sha256:" + hashlib.sha256(pki.chain[0]).hexdigest()
    checks = {
        PeerAuth.NONE: PeerCheck("none"),
        PeerAuth.PKIX: pkix(trust, HOST),
        PeerAuth.DANE_EE: PeerCheck("dane", names=(HOST,), tlsa=(tlsa(3, 1, 1, pki.chain[0]),)),
        PeerAuth.DANE_TA: PeerCheck(
            "dane", names=(HOST,), tlsa=(tlsa(2, 0, 1, pki.intermediate_der),)
        ),
        PeerAuth.FINGERPRINT: PeerCheck("fingerprint", fingerprints=(pin,)),
    }
    for auth, check in checks.items():
        result = verify_peer(check, pki.chain, NOW)
        assert (result.ok, result.auth) == (True, auth), check.kind
    failed = verify_peer(pkix(trust, OTHER_HOST), pki.chain, NOW)
    assert (failed.ok, failed.auth) == (False, PeerAuth.NONE)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            rsa.generate_private_key(65537, 1024),
            LeafKey("RSA-1024", "RSA key of 1024 bits is too weak (minimum 2048)"),
        ),
        (rsa.generate_private_key(65537, 2048), LeafKey("RSA-2048", None)),
        (
            ec.generate_private_key(ec.SECP224R1()),
            LeafKey("EC-224", "EC key of 224 bits is too weak (minimum 256)"),
        ),
        (ec.generate_private_key(ec.SECP256R1()), LeafKey("EC-256", None)),
        (ed25519.Ed25519PrivateKey.generate(), LeafKey("Ed25519", None)),
    ],
    ids=["rsa1024", "rsa2048", "p224", "p256", "ed25519"],
)
def test_leaf_key_names_the_key_and_applies_the_one_weak_key_rule(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    expected: LeafKey,
) -> None:
    leaf = build(HOST, key, issuer=("Key test CA", ec_key()), names=(HOST,))
    assert leaf_key(leaf) == expected


def test_leaf_key_of_garbage_is_none() -> None:
    assert leaf_key(b"not a certificate") is None
