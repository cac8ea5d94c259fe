"""``mta check DOMAIN``: what will happen to mail for a domain, and why.

Like Postfix's ``posttls-finger``, with the policy reasoning shown. It asks the same
``DestinationResolver`` the delivery agent asks, and with ``--connect`` it runs the
same session code up to the moment mail would be sent (``session.probe_session``), so
its verdict is the relay's: ``deliver``, ``defer`` or ``bounce``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.config import Config
from mta.deliver.agent import (
    MAX_ADDRESSES,
    TlsContexts,
    refusal_failure,
    session_settings,
    targets,
)
from mta.deliver.session import HostFailed, Probed, probe_session
from mta.model import Outcome
from mta.policy.decide import PolicySource
from mta.policy.dnssec import DnssecStatus
from mta.policy.resolver import DestinationResolver, DomainPlan, HostPlan
from mta.tlsbase import is_forward_secret

VERDICTS = {Outcome.SENT: "deliver", Outcome.DEFERRED: "defer", Outcome.BOUNCED: "bounce"}


@dataclass
class Verdict:
    """The first outcome a delivery would reach, walking the hosts in order."""

    verdict: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass
class Report:
    """The facts and decisions, as ``--json`` prints them."""

    doc: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=Verdict)


def certificate_summary(der: bytes) -> dict[str, Any]:
    """Subject, issuer, names, validity and pins of one certificate (for the operator)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {"error": "unparseable certificate"}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "dns_names": names,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": "sha256:" + hashlib.sha256(der).hexdigest(),
        "spki_sha256": "sha256:" + hashlib.sha256(spki).hexdigest(),
    }


def _policy_doc(plan: DomainPlan, hosts: list[HostPlan]) -> dict[str, Any]:
    """The effective policy: a local policy names itself; DANE shows when any host has it."""
    policy = plan.policy
    source, level, why = policy.source, policy.level, policy.why
    if source is not PolicySource.LOCAL:
        dane = [
            h.requirement
            for h in hosts
            if h.requirement and h.requirement.source is PolicySource.DANE
        ]
        if dane:
            source, level, why = PolicySource.DANE, dane[0].level, dane[0].why
    local = policy.local
    return {
        "source": source.value,
        "level": level.label,
        "why": why,
        "local": None if local is None else {"name": local.name, "file": local.source},
    }


def _sts_doc(plan: DomainPlan) -> dict[str, Any]:
    facts = plan.sts
    doc: dict[str, Any] = {"state": facts.state, "id": facts.policy_id, "error": facts.error}
    if facts.policy is not None:
        doc |= {
            "mode": facts.policy.mode.value,
            "mx": list(facts.policy.mx),
            "max_age": facts.policy.max_age,
        }
    return doc


def _dnssec_doc(plan: DomainPlan, status: DnssecStatus, *, dane: bool) -> dict[str, Any]:
    """The MX RRset's DNSSEC status and whether the resolver validates at all (its probe):
    with a resolver that fails the probe nothing is "insecure", it is "unverifiable"."""
    mx: str | None = None
    if plan.mx_lookup:
        mx = "secure" if plan.mx_secure else "insecure" if status.ok else "unverifiable"
    return {
        "mx": mx,
        "validation": status.state if dane else "not-used",
        "probe": status.probe or None,
        "resolver": status.resolver or None,
        "detail": status.detail or None,
        "last_checked": status.last_checked,
        "failures": status.failures,
    }


def _host_doc(host: HostPlan) -> dict[str, Any]:
    requirement = host.requirement
    return {
        "host": host.host,
        "addresses": list(host.addresses),
        "dns_error": host.dns_failure.reason if host.dns_failure else None,
        "tlsa": {
            "status": host.tlsa.status.value,
            "base": host.tlsa.base or None,
            "records": [str(r) for r in host.tlsa.records],
            "detail": host.tlsa.detail,
        },
        "requirement": None
        if requirement is None
        else {
            "level": requirement.level.label,
            "source": requirement.source.value,
            "check": requirement.check.kind,
            "sni": requirement.sni,
            "report_only": requirement.report_only,
            "why": requirement.why,
        },
        "refused": None
        if host.refusal is None
        else {"reason": host.refusal.reason, "detail": str(host.refusal)},
    }


def _probe_doc(address: str, outcome: Probed | HostFailed) -> dict[str, Any]:
    if isinstance(outcome, HostFailed):
        tls = outcome.tls
        return {
            "address": address,
            "result": "failed",
            "reason": outcome.reason,
            "reply": str(outcome.reply),
            "protocol": tls.version if tls else None,
            "cipher": tls.cipher if tls else None,
        }
    tls = outcome.tls
    verify = outcome.verify
    return {
        "address": address,
        "result": "ok",
        "protocol": tls.version if tls else None,
        "cipher": tls.cipher if tls else None,
        "forward_secret": is_forward_secret(tls.version, tls.cipher) if tls else False,
        "certificate": certificate_summary(outcome.chain[0]) if outcome.chain else None,
        "chain_length": len(outcome.chain),
        "verification": None
        if verify is None
        else {"ok": verify.ok, "reason": verify.reason, "detail": verify.detail},
    }


async def check_domain(
    config: Config, destinations: DestinationResolver, domain: str, *, connect: bool
) -> Report:
    """Gather the plan for ``domain`` (and with ``connect``, probe every address)."""
    domain = domain.lower().rstrip(".")
    plan = await destinations.domain(domain)
    hosts = [await destinations.host(plan, name) for name in plan.hosts]
    dnssec = await destinations.dnssec_status()
    report = Report()
    report.doc = {
        "domain": domain,
        "policy": _policy_doc(plan, hosts),
        "mta_sts": _sts_doc(plan),
        "nexthop": plan.nexthop,
        "port": plan.port,
        "dnssec": _dnssec_doc(plan, dnssec, dane=destinations.dane),
        "mx": [_host_doc(h) for h in hosts],
        "refused_by_mta_sts": list(plan.refused),
        "terminal": None
        if plan.terminal is None
        else {
            "outcome": plan.terminal.outcome.value,
            "reply": str(plan.terminal.reply),
            "reason": plan.terminal.reason,
        },
    }
    if connect:
        report.verdict = await _probe_all(config, plan, hosts, report.doc["mx"])
        report.doc["verdict"] = report.verdict.verdict
        report.doc["reason"] = report.verdict.reason
        report.doc["detail"] = report.verdict.detail
    return report


async def _probe_all(
    config: Config, plan: DomainPlan, hosts: list[HostPlan], docs: list[dict[str, Any]]
) -> Verdict:
    """Probe the addresses the relay would try (at most ``MAX_ADDRESSES``), in delivery
    order; the first success decides."""
    if plan.terminal is not None:
        end = plan.terminal
        return Verdict(VERDICTS[end.outcome], end.reason, str(end.reply))
    settings = session_settings(config)
    contexts = TlsContexts(config)
    verdict = Verdict()
    last = Verdict("defer", None, f"no usable host for {plan.nexthop}")
    tried = 0
    for host, doc in zip(hosts, docs, strict=True):
        doc["connect"] = []
        if host.refusal is not None:
            failed = refusal_failure(host)
            last = Verdict("defer", failed.reason, str(failed.reply))
            continue
        if host.requirement is None:
            continue
        for target in targets(plan, host)[: MAX_ADDRESSES - tried]:  # as the relay does
            tried += 1
            outcome = await probe_session(target, settings, contexts.for_target(target))
            doc["connect"].append(_probe_doc(target.address, outcome))
            if isinstance(outcome, HostFailed):
                last = Verdict("defer", outcome.reason, str(outcome.reply))
            elif verdict.verdict is None:
                verdict = Verdict("deliver", None, f"{host.host} [{target.address}]")
    return verdict if verdict.verdict is not None else last


def render_text(report: Report) -> str:
    """The report for a terminal: one fact per line, reasons in words."""
    doc = report.doc
    policy = doc["policy"]
    lines = [
        f"domain        {doc['domain']}",
        f"policy        {policy['level']} (from {policy['source']}): {policy['why']}",
        f"next hop      {doc['nexthop']} port {doc['port']}"
        + (f", MX RRset {doc['dnssec']['mx']}" if doc["dnssec"]["mx"] else ""),
    ]
    dnssec_line = _dnssec_line(doc["dnssec"])
    if dnssec_line:
        lines.append(dnssec_line)
    sts = doc["mta_sts"]
    sts_line = f"mta-sts       {sts['state']}"
    if "mode" in sts:
        sts_line += (
            f": id={sts['id']} mode={sts['mode']} mx={','.join(sts['mx'])} max_age={sts['max_age']}"
        )
    if sts["error"]:
        sts_line += f" (last error: {sts['error']})"
    lines.append(sts_line)
    if doc["terminal"]:
        lines.append(f"result        {doc['terminal']['outcome']}: {doc['terminal']['reply']}")
    for host in doc["mx"]:
        lines.append(
            f"mx            {host['host']} {' '.join(host['addresses']) or host['dns_error'] or ''}"
        )
        tlsa = host["tlsa"]
        records = " | ".join(tlsa["records"])
        lines.append(f"  tlsa        {tlsa['status']} {records} {tlsa['detail']}".rstrip())
        if host["refused"]:
            lines.append(f"  refused     {host['refused']['reason']}: {host['refused']['detail']}")
        elif host["requirement"]:
            req = host["requirement"]
            lines.append(
                f"  requires    {req['level']} ({req['source']}, check {req['check']}, "
                f"sni {req['sni']})" + (" report-only" if req["report_only"] else "")
            )
        for probe in host.get("connect", []):
            lines.append(_probe_line(probe))
    for refused in doc["refused_by_mta_sts"]:
        lines.append(f"mx            {refused} (not in the MTA-STS policy: never used)")
    if "verdict" in doc:
        lines.append(
            f"verdict       {doc['verdict']}" + (f" ({doc['reason']})" if doc["reason"] else "")
        )
        lines.append(f"              {doc['detail']}")
    return "\n".join(lines)


def _dnssec_line(dnssec: dict[str, Any]) -> str | None:
    """Whether the resolver validates: the DNSSEC probe's verdict, in words."""
    state = dnssec["validation"]
    if state == "unverifiable":
        return (
            f"dnssec        DNSSEC unverifiable: resolver {dnssec['resolver']} fails the probe "
            f"{dnssec['probe']} ({dnssec['detail']}); DANE cannot be checked"
        )
    if state == "validating":
        return f"dnssec        validating (probe {dnssec['probe']} via {dnssec['resolver']})"
    if state == "not-probed":
        return "dnssec        not probed (dns.dnssec_probe is off): the AD bit is believed"
    return None


def _probe_line(probe: dict[str, Any]) -> str:
    if probe["result"] == "failed":
        return f"  connect     {probe['address']}: failed ({probe['reason']}): {probe['reply']}"
    if probe["protocol"] is None:  # level "may", to a server without STARTTLS
        line = f"  connect     {probe['address']}: plaintext (no STARTTLS offered)"
    else:  # a session without forward secrecy never gets this far (no-forward-secrecy)
        line = f"  connect     {probe['address']}: {probe['protocol']} {probe['cipher']}"
    cert = probe["certificate"]
    if cert:
        line += f"\n  cert        {cert['subject']} (issuer {cert['issuer']})"
        line += f"\n              valid until {cert['not_after']}"
        line += f"\n              {cert['spki_sha256']} (SPKI)"
    verification = probe["verification"]
    if verification:
        state = "ok" if verification["ok"] else f"FAILED ({verification['reason']})"
        line += f"\n  verified    {state}: {verification['detail']}"
    return line
