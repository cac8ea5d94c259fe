"""The per-host record of an attempt (``model.HostPolicy``): what TLS-RPT and the
``deliver.result`` line read from it. Pure."""

from __future__ import annotations

import pytest

from mta.model import CheckKind, HostPolicy, PeerAuth, PolicySource, TlsLevel


@pytest.mark.parametrize(
    ("source", "level", "check", "auth", "label", "policy_type"),
    [
        (PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE, "dane/dane", "tlsa"),
        # a secure TLSA RRset without usable records: TLS mandatory, still a DANE policy
        (PolicySource.DANE, TlsLevel.ENCRYPT, "none", PeerAuth.NONE, "dane/encrypt", "tlsa"),
        (PolicySource.LOCAL, TlsLevel.DANE, "dane", PeerAuth.DANE_TA, "local/dane", "tlsa"),
        (PolicySource.MTA_STS, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX, "mta-sts/verify", "sts"),
        (
            PolicySource.MTA_STS_TESTING,
            TlsLevel.ENCRYPT,
            "pkix",
            PeerAuth.NONE,
            "mta-sts-testing/encrypt",
            "sts",
        ),
        (
            PolicySource.DEFAULT,
            TlsLevel.ENCRYPT,
            "none",
            PeerAuth.NONE,
            "default/encrypt",
            "no-policy-found",
        ),
        (
            PolicySource.LOCAL,
            TlsLevel.FINGERPRINT,
            "fingerprint",
            PeerAuth.FINGERPRINT,
            "local/fingerprint",
            "no-policy-found",
        ),
    ],
)
def test_host_policy_label_verified_and_tls_rpt_policy_type(
    source: PolicySource,
    level: TlsLevel,
    check: CheckKind,
    auth: PeerAuth,
    label: str,
    policy_type: str,
) -> None:
    policy = HostPolicy(source, level, check, auth)
    assert policy.label == label
    assert policy.verified is (auth is not PeerAuth.NONE)
    assert policy.rpt_policy_type == policy_type
