"""The Grafana dashboard shipped with the package uses only what the relay exports."""

from __future__ import annotations

import json
import re
from importlib import resources

from mta.policy.dnssec import DnssecStatus
from mta.report.metrics import Metrics

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPS = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)|\{([^}]*)\}")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_PROMQL = {"sum", "rate", "histogram_quantile", "by", "without", "le"}


class _Clock:
    def now(self) -> float:
        return 0.0


class _Queue:
    queued = 0
    oldest_received_at = None


def dashboard() -> dict[str, object]:
    text = resources.files("mta.report").joinpath("grafana-dashboard.json").read_text()
    doc: dict[str, object] = json.loads(text)
    return doc


def expressions() -> list[str]:
    panels = dashboard()["panels"]
    assert isinstance(panels, list)
    return [target["expr"] for panel in panels for target in panel["targets"]]


def exported() -> tuple[set[str], set[str]]:
    """The series names and label names a relay exports (``up`` is Prometheus's own)."""
    metrics = Metrics(_Clock())
    metrics.watch(_Queue(), lambda: DnssecStatus(last_checked=0.0))
    names, labels = {"up"}, {"job", "instance", "le"}
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    for counter in ("_received", "_attempts", "_tls_failures", "_sts_fetches", "_dns"):
        labels.update(getattr(metrics, counter)._labelnames)
    return names, labels


def metric_names(expr: str) -> set[str]:
    bare = _GROUPS.sub(" ", _STRINGS.sub('""', expr))
    found = set()
    for match in _NAME.finditer(bare):
        rest = bare[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _PROMQL:
            continue  # a function or an aggregation
        found.add(match.group())
    return found


def test_every_panel_has_a_query_and_the_issue_names_are_all_shown() -> None:
    exprs = expressions()
    assert len(exprs) >= 12
    used = set().union(*(metric_names(expr) for expr in exprs))
    names, _labels = exported()
    shown = {name for name in names if not name.endswith(("_sum", "_count"))}
    assert shown <= used, shown - used


def test_every_metric_and_label_in_the_dashboard_is_exported() -> None:
    names, labels = exported()
    for expr in expressions():
        used = metric_names(expr)
        assert used, expr
        assert used <= names, (expr, used - names)
        for by, selector in _LABELS.findall(expr):
            keys = {k.strip() for k in by.split(",") if k.strip()}
            keys |= {m.group(1) for m in re.finditer(r"(\w+)\s*!?=~?", selector)}
            assert keys <= labels, (expr, keys - labels)


def test_the_parser_sees_a_wrong_name() -> None:
    """The check above would catch a typo (it is not vacuous)."""
    names, _labels = exported()
    assert metric_names('sum by (tls) (rate(mta_mesages_received_total{tls="x"}[5m]))') == {
        "mta_mesages_received_total"
    }
    assert "mta_mesages_received_total" not in names
