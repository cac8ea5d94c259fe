"""Destination policy precedence: local > DANE > MTA-STS enforce > testing > default."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.config import DEFAULT_LEVELS
from mta.errors import TlsPolicyFailure
from mta.model import TlsLevel
from mta.policy.dane import TlsaRecord
from mta.policy.decide import (
    HostRequirement,
    PolicySource,
    StsFacts,
    TlsaFacts,
    TlsaStatus,
    TransportPolicy,
    decide_domain,
    decide_host,
)
from mta.policy.local import DomainPolicy
from mta.policy.mta_sts import StsMode, StsPolicy
from mta.policy.verify import PeerCheck, TrustStore

DOMAIN = "example.test"
MX = "mx.example.test"  # in the MTA-STS policy below
ROGUE = "mx.attacker.test"  # not in it
OUTSIDE = "mx.provider.test"  # in it, but not under DOMAIN
TRUST = TrustStore()  # the system store plus tls.ca_file
PINNED = TrustStore()  # a local entry's own ca_file
PIN = "sha256:" + "ab" * 32

EE = TlsaRecord(3, 1, 1, bytes(range(32)))
TA = TlsaRecord(2, 0, 1, bytes(32))
USABLE = TlsaFacts(TlsaStatus.USABLE, (EE, TA), base=MX)
CNAMED = TlsaFacts(TlsaStatus.USABLE, (EE,), base="mx.cname-target.test")  # RFC 7672 §2.2.2
UNUSABLE = TlsaFacts(TlsaStatus.UNUSABLE, base=MX, detail="only usage 0/1 records")
ABSENT = TlsaFacts(TlsaStatus.ABSENT, base=MX)
INSECURE = TlsaFacts(TlsaStatus.INSECURE)
FAILED = TlsaFacts(TlsaStatus.FAILED, detail="SERVFAIL")
NOT_LOOKED_UP = TlsaFacts(TlsaStatus.NOT_LOOKED_UP)
UNVERIFIABLE = TlsaFacts(
    TlsaStatus.UNVERIFIABLE, base=MX, detail="DNSSEC unverifiable: resolver 127.0.0.1:53"
)

ENFORCE = StsPolicy(StsMode.ENFORCE, (MX, "*.provider.test"), 86400)
TESTING = StsPolicy(StsMode.TESTING, (MX, "*.provider.test"), 86400)
MODE_NONE = StsPolicy(StsMode.NONE, (), 86400)
NO_STS = StsFacts(None)


def sts(policy: StsPolicy | None, state: str = "fresh") -> StsFacts:
    return StsFacts(policy, "id1" if policy else None, state)


def local(
    level: TlsLevel, *, fingerprints: tuple[str, ...] = (), ca_file: Path | None = None
) -> DomainPolicy:
    source = "policies/partners.toml"
    return DomainPolicy(DOMAIN, level, fingerprints, ca_file=ca_file, source=source)


def policy(
    entry: DomainPolicy | None = None,
    facts: StsFacts = NO_STS,
    default: TlsLevel = TlsLevel.ENCRYPT,
) -> TransportPolicy:
    return decide_domain(DOMAIN, entry, facts, default)


# --- the domain-level decision -----------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "facts", "default", "level", "source", "sts_policy"),
    [
        pytest.param(
            None, NO_STS, TlsLevel.ENCRYPT, TlsLevel.ENCRYPT, PolicySource.DEFAULT, None,
            id="no policy: default",
        ),
        pytest.param(
            None, NO_STS, TlsLevel.VERIFY, TlsLevel.VERIFY, PolicySource.DEFAULT, None,
            id="no policy: default verify",
        ),
        pytest.param(
            None, sts(ENFORCE), TlsLevel.ENCRYPT, TlsLevel.VERIFY, PolicySource.MTA_STS, ENFORCE,
            id="sts enforce",
        ),
        pytest.param(
            None, sts(ENFORCE), TlsLevel.SECURE, TlsLevel.SECURE, PolicySource.MTA_STS, ENFORCE,
            id="sts enforce keeps a default of secure",
        ),
        pytest.param(
            None, sts(ENFORCE, "cached"), TlsLevel.ENCRYPT, TlsLevel.VERIFY,
            PolicySource.MTA_STS, ENFORCE,
            id="a cached policy is still applied",
        ),
        pytest.param(
            None, StsFacts(ENFORCE, "id1", "fetch-error", "sts-policy-fetch-error"),
            TlsLevel.ENCRYPT, TlsLevel.VERIFY, PolicySource.MTA_STS, ENFORCE,
            id="cached policy while the policy server is down",
        ),
        pytest.param(
            None, sts(TESTING), TlsLevel.ENCRYPT, TlsLevel.ENCRYPT,
            PolicySource.MTA_STS_TESTING, TESTING,
            id="sts testing: default level",
        ),
        pytest.param(
            None, sts(TESTING), TlsLevel.MAY, TlsLevel.MAY, PolicySource.MTA_STS_TESTING, TESTING,
            id="sts testing: default level may",
        ),
        pytest.param(
            None, sts(MODE_NONE), TlsLevel.ENCRYPT, TlsLevel.ENCRYPT, PolicySource.DEFAULT, None,
            id="fresh mode none is no policy",
        ),
        pytest.param(
            None, StsFacts(None, None, "fetch-error", "sts-policy-fetch-error"),
            TlsLevel.ENCRYPT, TlsLevel.ENCRYPT, PolicySource.DEFAULT, None,
            id="fetch failed, nothing cached: no policy",
        ),
        pytest.param(
            None, StsFacts(None, state="disabled"), TlsLevel.SECURE, TlsLevel.SECURE,
            PolicySource.DEFAULT, None,
            id="sts disabled",
        ),
        pytest.param(
            local(TlsLevel.MAY), sts(ENFORCE), TlsLevel.ENCRYPT, TlsLevel.MAY,
            PolicySource.LOCAL, None,
            id="local beats sts enforce",
        ),
        pytest.param(
            local(TlsLevel.FINGERPRINT, fingerprints=(PIN,)), NO_STS, TlsLevel.VERIFY,
            TlsLevel.FINGERPRINT, PolicySource.LOCAL, None,
            id="local beats the default",
        ),
    ],
)  # fmt: skip
def test_decide_domain(
    entry: DomainPolicy | None,
    facts: StsFacts,
    default: TlsLevel,
    level: TlsLevel,
    source: PolicySource,
    sts_policy: StsPolicy | None,
) -> None:
    decided = decide_domain("Example.TEST.", entry, facts, default)
    assert (decided.domain, decided.level, decided.source) == (DOMAIN, level, source)
    assert decided.sts == sts_policy
    assert decided.local is entry
    assert decided.why


def test_why_names_the_rule_and_the_failure() -> None:
    assert "local policy" in policy(local(TlsLevel.VERIFY)).why
    assert "policies/partners.toml" in policy(local(TlsLevel.VERIFY)).why
    assert "enforce" in policy(facts=sts(ENFORCE, "cached")).why
    assert "cached" in policy(facts=sts(ENFORCE, "cached")).why
    failed = StsFacts(None, None, "fetch-error", "sts-policy-fetch-error")
    assert "sts-policy-fetch-error" in policy(facts=failed).why


@pytest.mark.parametrize(
    ("decided", "allowed", "refused"),
    [
        (policy(facts=sts(ENFORCE)), [MX, "a.provider.test"], [ROGUE, "a.b.provider.test"]),
        (policy(facts=sts(TESTING)), [MX, ROGUE, "a.provider.test", "a.b.provider.test"], []),
        (policy(), [MX, ROGUE, "a.provider.test", "a.b.provider.test"], []),
        (
            policy(local(TlsLevel.ENCRYPT), sts(ENFORCE)),
            [MX, ROGUE, "a.provider.test", "a.b.provider.test"],
            [],
        ),
    ],
    ids=["enforce", "testing", "default", "local"],
)
def test_candidates(decided: TransportPolicy, allowed: list[str], refused: list[str]) -> None:
    hosts = [MX, ROGUE, "a.provider.test", "a.b.provider.test"]
    assert decided.candidates(hosts) == (allowed, refused)


# --- what each host must prove -----------------------------------------------------------


@dataclass(frozen=True)
class Want:
    level: TlsLevel
    source: PolicySource
    check: PeerCheck
    sni: str = MX
    report_only: bool = False


NONE = PeerCheck("none")
PKIX_MX = PeerCheck("pkix", names=(MX,), trust=TRUST)
SECURE_MX = PeerCheck("pkix", names=(DOMAIN, MX), trust=TRUST)
DANE_MX = PeerCheck("dane", names=(MX, DOMAIN), tlsa=(EE, TA))
PINNED_LEAF = PeerCheck("fingerprint", fingerprints=(PIN,))


@pytest.mark.parametrize(
    ("decided", "host", "tlsa", "want"),
    [
        # The default, when nothing else applies.
        pytest.param(
            policy(), MX, NOT_LOOKED_UP, Want(TlsLevel.ENCRYPT, PolicySource.DEFAULT, NONE),
            id="default encrypt",
        ),
        pytest.param(
            policy(), MX, INSECURE, Want(TlsLevel.ENCRYPT, PolicySource.DEFAULT, NONE),
            id="insecure TLSA is not DANE",
        ),
        pytest.param(
            policy(), MX, ABSENT, Want(TlsLevel.ENCRYPT, PolicySource.DEFAULT, NONE),
            id="no TLSA (secure denial)",
        ),
        pytest.param(
            policy(default=TlsLevel.MAY), MX, ABSENT,
            Want(TlsLevel.MAY, PolicySource.DEFAULT, NONE),
            id="default may",
        ),
        pytest.param(
            policy(default=TlsLevel.VERIFY), MX, ABSENT,
            Want(TlsLevel.VERIFY, PolicySource.DEFAULT, PKIX_MX),
            id="default verify: pkix with the trust store",
        ),
        pytest.param(
            policy(default=TlsLevel.SECURE), MX, ABSENT,
            Want(TlsLevel.SECURE, PolicySource.DEFAULT, SECURE_MX),
            id="default secure: the domain and the host under it",
        ),
        # DANE, per host: beats MTA-STS and the default.
        pytest.param(
            policy(), MX, USABLE, Want(TlsLevel.DANE, PolicySource.DANE, DANE_MX),
            id="usable TLSA: DANE",
        ),
        pytest.param(
            policy(), MX, CNAMED,
            Want(
                TlsLevel.DANE, PolicySource.DANE,
                PeerCheck("dane", names=("mx.cname-target.test", MX, DOMAIN), tlsa=(EE,)),
                sni="mx.cname-target.test",
            ),
            id="CNAME'd host: SNI and first name are the TLSA base domain",
        ),
        pytest.param(
            policy(default=TlsLevel.VERIFY), MX, USABLE,
            Want(TlsLevel.DANE, PolicySource.DANE, DANE_MX),
            id="DANE beats default verify",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE)), MX, USABLE,
            Want(TlsLevel.DANE, PolicySource.DANE, DANE_MX),
            id="DANE beats sts enforce (RFC 8461 section 2)",
        ),
        pytest.param(
            policy(facts=sts(TESTING)), MX, USABLE,
            Want(TlsLevel.DANE, PolicySource.DANE, DANE_MX),
            id="DANE beats sts testing",
        ),
        pytest.param(
            policy(), MX, UNUSABLE, Want(TlsLevel.ENCRYPT, PolicySource.DANE, NONE),
            id="unusable TLSA: encrypt, source DANE",
        ),
        pytest.param(
            policy(default=TlsLevel.MAY), MX, UNUSABLE,
            Want(TlsLevel.ENCRYPT, PolicySource.DANE, NONE),
            id="unusable TLSA makes TLS mandatory over default may",
        ),
        pytest.param(
            policy(default=TlsLevel.VERIFY), MX, UNUSABLE,
            Want(TlsLevel.VERIFY, PolicySource.DEFAULT, PKIX_MX),
            id="unusable TLSA never lowers default verify",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE)), MX, UNUSABLE,
            Want(TlsLevel.VERIFY, PolicySource.MTA_STS, PKIX_MX),
            id="unusable TLSA never lowers sts enforce",
        ),
        pytest.param(
            policy(facts=sts(TESTING)), MX, UNUSABLE,
            Want(TlsLevel.ENCRYPT, PolicySource.DANE, PKIX_MX, report_only=True),
            id="unusable TLSA under sts testing: encrypt, still reported",
        ),
        # MTA-STS.
        pytest.param(
            policy(facts=sts(ENFORCE)), MX, ABSENT,
            Want(TlsLevel.VERIFY, PolicySource.MTA_STS, PKIX_MX),
            id="sts enforce: pkix for the host name",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE, "cached")), "A.Provider.Test.", NOT_LOOKED_UP,
            Want(
                TlsLevel.VERIFY, PolicySource.MTA_STS,
                PeerCheck("pkix", names=("a.provider.test",), trust=TRUST),
                sni="a.provider.test",
            ),
            id="cached sts enforce, wildcard mx",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE), default=TlsLevel.MAY), MX, INSECURE,
            Want(TlsLevel.VERIFY, PolicySource.MTA_STS, PKIX_MX),
            id="sts enforce beats default may",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE), default=TlsLevel.SECURE), OUTSIDE, ABSENT,
            Want(
                TlsLevel.SECURE, PolicySource.MTA_STS,
                PeerCheck("pkix", names=(DOMAIN,), trust=TRUST), sni=OUTSIDE,
            ),
            id="sts enforce over default secure: still secure",
        ),
        pytest.param(
            policy(facts=sts(TESTING)), MX, ABSENT,
            Want(TlsLevel.ENCRYPT, PolicySource.MTA_STS_TESTING, PKIX_MX, report_only=True),
            id="sts testing: default level, pkix report only",
        ),
        pytest.param(
            policy(facts=sts(TESTING)), ROGUE, ABSENT,
            Want(
                TlsLevel.ENCRYPT, PolicySource.MTA_STS_TESTING,
                PeerCheck("pkix", names=(ROGUE,), trust=TRUST), sni=ROGUE, report_only=True,
            ),
            id="sts testing: a host outside mx still gets mail",
        ),
        pytest.param(
            policy(facts=sts(TESTING), default=TlsLevel.VERIFY), MX, ABSENT,
            Want(TlsLevel.VERIFY, PolicySource.MTA_STS_TESTING, PKIX_MX),
            id="sts testing over default verify: enforced, not report only",
        ),
        pytest.param(
            policy(facts=sts(MODE_NONE)), ROGUE, ABSENT,
            Want(TlsLevel.ENCRYPT, PolicySource.DEFAULT, NONE, sni=ROGUE),
            id="fresh mode none: no policy",
        ),
        # A local policy entry outranks everything, TLSA facts included.
        pytest.param(
            policy(local(TlsLevel.FINGERPRINT, fingerprints=(PIN,))), MX, USABLE,
            Want(TlsLevel.FINGERPRINT, PolicySource.LOCAL, PINNED_LEAF),
            id="local fingerprint beats DANE",
        ),
        pytest.param(
            policy(local(TlsLevel.FINGERPRINT, fingerprints=(PIN,))), MX, FAILED,
            Want(TlsLevel.FINGERPRINT, PolicySource.LOCAL, PINNED_LEAF),
            id="local fingerprint does not depend on DNSSEC",
        ),
        pytest.param(
            policy(local(TlsLevel.SECURE)), MX, NOT_LOOKED_UP,
            Want(TlsLevel.SECURE, PolicySource.LOCAL, SECURE_MX),
            id="local secure: the domain and the host under it",
        ),
        pytest.param(
            policy(local(TlsLevel.SECURE)), OUTSIDE, NOT_LOOKED_UP,
            Want(
                TlsLevel.SECURE, PolicySource.LOCAL,
                PeerCheck("pkix", names=(DOMAIN,), trust=TRUST), sni=OUTSIDE,
            ),
            id="local secure: a host outside the domain is not a name",
        ),
        pytest.param(
            policy(local(TlsLevel.SECURE)), DOMAIN, NOT_LOOKED_UP,
            Want(
                TlsLevel.SECURE, PolicySource.LOCAL,
                PeerCheck("pkix", names=(DOMAIN,), trust=TRUST), sni=DOMAIN,
            ),
            id="local secure: implicit MX",
        ),
        pytest.param(
            policy(local(TlsLevel.VERIFY, ca_file=Path("dc2-ca.pem"))), MX, NOT_LOOKED_UP,
            Want(TlsLevel.VERIFY, PolicySource.LOCAL, PeerCheck("pkix", names=(MX,), trust=PINNED)),
            id="local verify with ca_file: pkix against the pinned CA",
        ),
        pytest.param(
            policy(local(TlsLevel.MAY), sts(ENFORCE)), ROGUE, USABLE,
            Want(TlsLevel.MAY, PolicySource.LOCAL, NONE, sni=ROGUE),
            id="local may beats DANE and sts enforce",
        ),
        pytest.param(
            policy(local(TlsLevel.ENCRYPT)), MX, UNUSABLE,
            Want(TlsLevel.ENCRYPT, PolicySource.LOCAL, NONE),
            id="local encrypt",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE)), MX, USABLE,
            Want(TlsLevel.DANE, PolicySource.LOCAL, DANE_MX),
            id="local dane with usable TLSA",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE)), MX, INSECURE,
            Want(TlsLevel.ENCRYPT, PolicySource.LOCAL, NONE),
            id="local dane without TLSA: encrypt",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE)), MX, UNUSABLE,
            Want(TlsLevel.ENCRYPT, PolicySource.LOCAL, NONE),
            id="local dane with unusable TLSA: encrypt",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, USABLE,
            Want(TlsLevel.DANE_ONLY, PolicySource.LOCAL, DANE_MX),
            id="local dane-only with usable TLSA",
        ),
    ],
)  # fmt: skip
def test_decide_host(decided: TransportPolicy, host: str, tlsa: TlsaFacts, want: Want) -> None:
    trust = PINNED if decided.local is not None and decided.local.ca_file else TRUST
    got = decide_host(decided, host, tlsa, trust=trust)
    assert isinstance(got, HostRequirement)
    assert Want(got.level, got.source, got.check, got.sni, got.report_only) == want
    assert got.host == host.lower().rstrip(".")
    assert got.why


@pytest.mark.parametrize(
    ("decided", "host", "tlsa", "reason"),
    [
        pytest.param(policy(), MX, FAILED, "dnssec-invalid", id="TLSA lookup failed"),
        pytest.param(
            policy(default=TlsLevel.MAY), MX, FAILED, "dnssec-invalid",
            id="TLSA lookup failed under default may",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE)), MX, FAILED, "dnssec-invalid",
            id="TLSA lookup failed: sts enforce does not rescue it",
        ),
        pytest.param(
            policy(facts=sts(TESTING)), MX, FAILED, "dnssec-invalid",
            id="TLSA lookup failed under sts testing",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE)), MX, FAILED, "dnssec-invalid",
            id="local dane, TLSA lookup failed",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, FAILED, "dnssec-invalid",
            id="local dane-only, TLSA lookup failed",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, ABSENT, "dane-required",
            id="dane-only, no TLSA",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, INSECURE, "dane-required",
            id="dane-only, insecure zone",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, UNUSABLE, "dane-required",
            id="dane-only, only unusable TLSA",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, NOT_LOOKED_UP, "dane-required",
            id="dane-only, DANE disabled or resolver untrusted",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE)), MX, UNVERIFIABLE, "dnssec-invalid",
            id="local dane, the resolver fails the DNSSEC probe",
        ),
        pytest.param(
            policy(local(TlsLevel.DANE_ONLY)), MX, UNVERIFIABLE, "dnssec-invalid",
            id="local dane-only, the resolver fails the DNSSEC probe",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE)), ROGUE, ABSENT, "validation-failure",
            id="sts enforce, host not in mx",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE, "cached")), "a.b.provider.test", ABSENT,
            "validation-failure",
            id="sts enforce, wildcard covers one label only",
        ),
        pytest.param(
            policy(facts=sts(ENFORCE)), ROGUE, USABLE, "validation-failure",
            id="sts enforce, host not in mx, even with DANE",
        ),
    ],
)  # fmt: skip
def test_decide_host_refuses(
    decided: TransportPolicy, host: str, tlsa: TlsaFacts, reason: str
) -> None:
    with pytest.raises(TlsPolicyFailure) as raised:
        decide_host(decided, host, tlsa, trust=TRUST)
    assert raised.value.reason == reason
    assert raised.value.reply.code == 451  # defer, never bounce
    assert host.lower() in str(raised.value)


STATUSES = list(TlsaStatus)
FACTS = {
    TlsaStatus.USABLE: USABLE,
    TlsaStatus.UNUSABLE: UNUSABLE,
    TlsaStatus.ABSENT: ABSENT,
    TlsaStatus.INSECURE: INSECURE,
    TlsaStatus.FAILED: FAILED,
    TlsaStatus.NOT_LOOKED_UP: NOT_LOOKED_UP,
    TlsaStatus.UNVERIFIABLE: UNVERIFIABLE,
}
STS_FACTS = [NO_STS, sts(ENFORCE), sts(ENFORCE, "cached"), sts(TESTING), sts(MODE_NONE)]


@pytest.mark.parametrize(
    ("default", "facts", "host", "status"),
    list(itertools.product(DEFAULT_LEVELS, STS_FACTS, [MX, ROGUE], STATUSES)),
)
def test_without_a_local_policy_nothing_downgrades(
    default: TlsLevel, facts: StsFacts, host: str, status: TlsaStatus
) -> None:
    """Every combination of default, MTA-STS and TLSA facts: the invariants that matter."""
    decided = policy(facts=facts, default=default)
    enforce = decided.source is PolicySource.MTA_STS
    if enforce and host == ROGUE:
        with pytest.raises(TlsPolicyFailure, match="not in the MTA-STS policy"):
            decide_host(decided, host, FACTS[status], trust=TRUST)
        return
    if status is TlsaStatus.FAILED:
        with pytest.raises(TlsPolicyFailure, match="TLSA lookup"):
            decide_host(decided, host, FACTS[status], trust=TRUST)
        return
    got = decide_host(decided, host, FACTS[status], trust=TRUST)
    if status is TlsaStatus.USABLE:
        assert (got.source, got.check.kind, got.sni) == (PolicySource.DANE, "dane", MX)
        return
    assert got.level >= default  # only DANE (above) may replace the default's check
    if status is TlsaStatus.UNUSABLE:
        assert got.level >= TlsLevel.ENCRYPT
    if status is TlsaStatus.UNVERIFIABLE:  # the decision says DANE was not checked
        assert "DNSSEC unverifiable, DANE not checked" in got.why
    if enforce:
        assert (got.check.kind, got.report_only) == ("pkix", False)
    if default in (TlsLevel.VERIFY, TlsLevel.SECURE):
        assert (got.check.kind, got.report_only) == ("pkix", False)
    if got.report_only:
        assert decided.source is PolicySource.MTA_STS_TESTING
        assert got.check.kind == "pkix"


def test_dane_why_names_the_tlsa_owner_for_the_port_in_use() -> None:
    """``outbound.port`` 2525: the records are at ``_2525._tcp``, and the words say so."""
    facts = TlsaFacts(TlsaStatus.USABLE, (EE,), base=MX, name=f"_2525._tcp.{MX}")
    got = decide_host(policy(), MX, facts, trust=TRUST)
    assert f"at _2525._tcp.{MX} " in got.why
    assert "_25._tcp" not in got.why
