"""What RFC 8689 asks of one delivery: may a REQUIRETLS message go to this host, and does
a message ask, with ``TLS-Required: No``, that DANE and MTA-STS failures be forgiven.

Pure: no I/O. ``session`` asks ``refusal`` before MAIL FROM; ``agent`` reads the header.

REQUIRETLS (§4.2.1): the host must have negotiated TLS, proved its certificate as a
policy demanded (DANE, MTA-STS ``enforce``, or a local verify/secure/fingerprint/dane
entry: MTA-STS ``testing`` only reports, so it proves nothing), and offered
``REQUIRETLS`` in its EHLO reply after STARTTLS. Otherwise the message must not be
sent there; the agent tries the other MX hosts and then bounces (``5.7.30``).

``TLS-Required: No`` (§3, §4.2.2) is a header anyone can write, so it is honoured only
where the operator said so (``outbound.honour_tls_required_no``), and never on a
REQUIRETLS message: the MAIL parameter wins and the header is ignored (§4.1).
"""

from __future__ import annotations

import email.parser
import email.policy
from typing import Final

from mta.model import HostPolicy, PolicySource
from mta.report.dsn import header_block

KEYWORD: Final = "REQUIRETLS"  # EHLO keyword and MAIL FROM parameter (§2)
HEADER: Final = "TLS-Required"
STATUS: Final = "5.7.30"  # "REQUIRETLS support required" (§6, RFC 5248 registry)
# The policies a "TLS-Required: No" message may be delivered in spite of (§4.2.2): the
# recipient domain's own; a local entry is the operator's and stays as it is.
RELAXABLE: Final = frozenset({PolicySource.DANE, PolicySource.MTA_STS})


def refusal(*, tls: bool, policy: HostPolicy, advertised: bool) -> str | None:
    """Why a REQUIRETLS message may not go to this host; None when it may.

    Parameters:
        tls: TLS was negotiated on the connection.
        policy: what the host had to prove and how it proved it (``session.policy()``).
        advertised: the EHLO reply after STARTTLS listed ``REQUIRETLS``.
    """
    if not tls:
        return "no TLS"
    if policy.report_only or not policy.verified:
        return f"certificate not authenticated (policy {policy.label})"
    if not advertised:
        return "REQUIRETLS not offered"
    return None


def tls_required_no(content: bytes) -> bool:
    """The message's header section holds ``TLS-Required: No`` (one such field, any case)."""
    head = header_block(content)
    if HEADER.lower().encode() not in head.lower():
        return False  # the common case, without parsing
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    values = parser.parsebytes(head + b"\r\n\r\n").get_all(HEADER) or []
    return len(values) == 1 and str(values[0]).strip().lower() == "no"
