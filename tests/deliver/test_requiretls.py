"""RFC 8689's per-host decision and the ``TLS-Required: No`` header, as tables."""

from __future__ import annotations

import pytest

from mta.deliver.requiretls import refusal, tls_required_no
from mta.model import HostPolicy, PeerAuth, PolicySource, TlsLevel

DANE = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.DANE_EE)
STS = HostPolicy(PolicySource.MTA_STS, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)
LOCAL_VERIFY = HostPolicy(PolicySource.LOCAL, TlsLevel.VERIFY, "pkix", PeerAuth.PKIX)
PINNED = HostPolicy(PolicySource.LOCAL, TlsLevel.FINGERPRINT, "fingerprint", PeerAuth.FINGERPRINT)
ENCRYPT = HostPolicy(PolicySource.DEFAULT, TlsLevel.ENCRYPT, "none")
# MTA-STS testing: even a certificate that passed proves nothing (the MX list is unenforced)
TESTING = HostPolicy(
    PolicySource.MTA_STS_TESTING, TlsLevel.ENCRYPT, "pkix", PeerAuth.PKIX, report_only=True
)
FAILED_DANE = HostPolicy(PolicySource.DANE, TlsLevel.DANE, "dane", PeerAuth.NONE, True, "x")


@pytest.mark.parametrize(
    ("tls", "policy", "advertised", "why"),
    [
        (True, DANE, True, None),
        (True, STS, True, None),
        (True, LOCAL_VERIFY, True, None),
        (True, PINNED, True, None),
        (True, DANE, False, "REQUIRETLS not offered"),
        (True, ENCRYPT, True, "certificate not authenticated (policy default/encrypt)"),
        (True, TESTING, True, "certificate not authenticated (policy mta-sts-testing/encrypt)"),
        (True, FAILED_DANE, True, "certificate not authenticated (policy dane/dane)"),
        (False, ENCRYPT, False, "no TLS"),
    ],
)
def test_refusal(tls: bool, policy: HostPolicy, advertised: bool, why: str | None) -> None:
    assert refusal(tls=tls, policy=policy, advertised=advertised) == why


@pytest.mark.parametrize(
    ("content", "relaxed"),
    [
        (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
        (b"tls-required:   no  \r\nSubject: x\r\n\r\n", True),
        (b"Subject: x\r\nTLS-Required:\r\n No\r\n\r\n", True),  # folded
        (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body
        (b"TLS-Required: Yes\r\n\r\n", False),
        (b"TLS-Required: No\r\nTLS-Required: No\r\n\r\n", False),  # §3: one field at most
        (b"TLS-Required: No thanks\r\n\r\n", False),
        (b"X-TLS-Required: No\r\n\r\n", False),
        (b"Subject: x\r\n\r\n", False),
    ],
)
def test_tls_required_no(content: bytes, relaxed: bool) -> None:
    assert tls_required_no(content) is relaxed
