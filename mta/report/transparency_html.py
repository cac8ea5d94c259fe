"""The transparency report as one self-contained HTML page (issue 10 §4).

Three plots drawn with matplotlib as SVG, inlined, each followed by a table of its
numbers (the page reads without the pictures). Nothing on the page is fetched: inline
CSS, inline SVG with text drawn as paths (no font), no script, and a Content-Security-
Policy that would refuse any fetch anyway. Every string from the events (domain names
come from the network) is escaped. Deterministic for the same figures (fixed SVG ids).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Final

from mta.report.transparency import PROTECTIONS, Mix, Protection, Transparency

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["render_html"]

COLOURS: Final = {
    Protection.DANE: "#1b7837",
    Protection.MTA_STS: "#5aae61",
    Protection.LOCAL: "#2166ac",
    Protection.ENCRYPTED: "#f4a536",
    Protection.CLEAR: "#d73027",
}
DEFERRAL_COLOURS: Final = {  # by ReasonCount.tls
    True: "#b2182b",  # the TLS requirement was not met (RFC 8460 result type)
    False: "#8c6bb1",  # anything else (the reply's status code)
}
LABEL_CHARS: Final = 40  # of data text in a plot label
DEFERRAL_LABELS: Final = {True: "TLS requirement not met", False: "Other temporary failure"}
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_PROLOG = re.compile(r"\A.*?(?=<svg\b)", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)
_COMMENT = re.compile(r"[ \t]*<!--.*?-->\n?", re.S)  # matplotlib names each text drawn
_ID = re.compile(r'\bid="([^"]+)"')
_RC_LOCK = threading.Lock()  # rc_context changes matplotlib's global settings: one at a time

STYLE: Final = """
:root { --ink: #1f2328; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr));
         gap: 12px; margin: 22px 0 8px; }
.card { background: var(--bg); border: 1px solid var(--line); border-radius: 8px;
        padding: 12px 14px; }
.card .value { font-size: 24px; font-weight: 650; }
.card .what { color: var(--muted); font-size: 13px; }
section { margin-top: 34px; }
h2 { font-size: 19px; margin: 0 0 6px; border-bottom: 1px solid var(--line);
     padding-bottom: 4px; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0 10px; }
figure { margin: 8px 0 12px; }
figure svg { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px;
        font-variant-numeric: tabular-nums; }
th, td { padding: 5px 6px; border-bottom: 1px solid var(--line); text-align: right; }
td { white-space: nowrap; }
th:first-child, td:first-child, .text { text-align: left; white-space: nowrap; }
td.name { white-space: normal; overflow-wrap: anywhere; max-width: 260px; }
thead th { background: var(--bg); font-weight: 600; font-size: 12.5px; vertical-align: bottom; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
          margin-right: 5px; vertical-align: baseline; }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; }
"""


def render_html(figures: Transparency, *, title: str = "Transparency report") -> str:
    """The whole page for ``figures``."""
    first = figures.days[0].day.isoformat()
    last = figures.days[-1].day.isoformat()
    made = datetime.fromtimestamp(figures.end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<header><h1>{escape(title)}</h1>",
        f"<p>{len(figures.days)} UTC days, {first} to {last}; made {made}.</p></header>",
        _cards(figures),
        _daily_section(figures),
        _domains_section(figures),
        _deferrals_section(figures),
        _footer(figures),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# --- sections ----------------------------------------------------------------------------


def _cards(figures: Transparency) -> str:
    total = figures.delivered
    cards = [
        (f"{total.total:,}", "recipients delivered"),
        (_percent(_ratio(total.authenticated, total.total)), "delivered authenticated"),
        (_percent(_ratio(total.encrypted, total.total)), "delivered encrypted"),
        (f"{figures.received:,}", "messages received"),
        (_percent(_ratio(figures.received_tls, figures.received)), "received over TLS"),
        (f"{figures.deferred:,}", "recipients deferred (per attempt)"),
    ]
    body = "".join(
        f'<div class="card"><div class="value">{value}</div><div class="what">{what}</div></div>'
        for value, what in cards
    )
    return f'<div class="cards">{body}</div>'


def _daily_section(figures: Transparency) -> str:
    head = "".join(f"<th>{_swatch(p)}{escape(p.label)}</th>" for p in PROTECTIONS)
    rows = []
    for day in figures.days:
        shares = "".join(f"<td>{_percent(day.delivered.share(p))}</td>" for p in PROTECTIONS)
        rows.append(
            f"<tr><td>{day.day.isoformat()}</td><td>{day.delivered.total:,}</td>{shares}"
            f"<td>{day.deferred:,}</td><td>{day.bounced:,}</td><td>{day.received:,}</td>"
            f"<td>{_percent(day.received_tls_share)}</td></tr>"
        )
    return (
        '<section id="daily"><h2>How delivered mail was protected, per day</h2>'
        '<p class="note">Share of recipients delivered (per recipient delivered, not per '
        "message) by the protection of the connection that took the mail.</p>"
        f"{_figure(_daily_plot(figures), 'Stacked bars: protection shares per day')}"
        "<table><thead><tr><th>Day (UTC)</th><th>Delivered</th>"
        f"{head}<th>Deferred</th><th>Bounced</th><th>Received</th><th>Received over TLS</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _domains_section(figures: Transparency) -> str:
    head = "".join(f"<th>{_swatch(p)}{escape(p.label)}</th>" for p in PROTECTIONS)
    rows = []
    for domain in figures.domains:
        cells = "".join(f"<td>{_count_share(domain.delivered, p)}</td>" for p in PROTECTIONS)
        rows.append(
            f'<tr><td class="name">{escape(domain.domain)}</td>'
            f"<td>{domain.delivered.total:,}</td>{cells}"
            f"<td>{domain.deferred:,}</td></tr>"
        )
    shown = len(figures.domains)
    note = f"The {shown} busiest of {figures.domain_count} destination domains"
    if not shown:
        return (
            '<section id="domains"><h2>Top destination domains</h2>'
            '<p class="note">No mail was delivered in this period.</p></section>'
        )
    return (
        '<section id="domains"><h2>Top destination domains</h2>'
        f'<p class="note">{note}, by recipients delivered, with how each was protected.</p>'
        f"{_figure(_domains_plot(figures), 'Horizontal bars: recipients per domain')}"
        f"<table><thead><tr><th>Domain</th><th>Delivered</th>{head}<th>Deferred</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _deferrals_section(figures: Transparency) -> str:
    if not figures.deferrals:
        return (
            '<section id="deferrals"><h2>Deferrals by reason</h2>'
            '<p class="note">No deferrals in this period.</p></section>'
        )
    total = figures.deferred
    rows = "".join(
        f"<tr><td>{_deferral_swatch(item.tls)}{escape(item.reason)}</td>"
        f'<td class="text">{escape(item.meaning)}</td>'
        f"<td>{item.count:,}</td><td>{_percent(_ratio(item.count, total))}</td></tr>"
        for item in figures.deferrals
    )
    return (
        '<section id="deferrals"><h2>Deferrals by reason</h2>'
        '<p class="note">Recipients deferred, per attempt: the RFC 8460 result type when '
        "the TLS requirement was not met, otherwise the reply's enhanced status code.</p>"
        f"{_figure(_deferrals_plot(figures), 'Bars: deferrals per reason')}"
        '<table><thead><tr><th>Reason</th><th class="text">Meaning</th><th>Deferrals</th>'
        "<th>Share</th>"
        f"</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _footer(figures: Transparency) -> str:
    excluded = (
        f"The relay's own TLS reports ({figures.reports_excluded:,} recipients in this "
        "period) are left out: they are not mail carried for anyone."
    )
    return (
        "<footer><p><strong>How to read it.</strong> DANE: the receiving server proved "
        "its key with DNSSEC-signed TLSA records. MTA-STS: its certificate was verified "
        "under the domain's MTA-STS policy. Local policy: verified under a rule of this "
        "relay's operator. Encrypted: TLS without checking who answered. In the clear: no "
        f"TLS at all. {excluded}</p></footer>"
    )


# --- helpers -----------------------------------------------------------------------------


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.1f}\u00a0%"


def _count_share(mix: Mix, protection: Protection) -> str:
    count = mix.count(protection)
    return f"{count:,} ({_percent(mix.share(protection))})" if count else "0"


def _swatch(protection: Protection) -> str:
    return f'<span class="swatch" style="background:{COLOURS[protection]}"></span>'


def _deferral_swatch(tls: bool) -> str:
    return f'<span class="swatch" style="background:{DEFERRAL_COLOURS[tls]}"></span>'


def _figure(svg: str, label: str) -> str:
    return f'<figure role="img" aria-label="{escape(label)}">{svg}</figure>'


# --- plots -------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    import matplotlib  # imported here: heavy, and only pages need it

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _to_svg(figure: Figure, prefix: str) -> str:
    """The figure as an inline ``<svg>``: no prolog or metadata, ids made page-unique."""
    import matplotlib

    buffer = io.StringIO()
    with _RC_LOCK, matplotlib.rc_context({"svg.hashsalt": f"mta-{prefix}", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = _COMMENT.sub("", _METADATA.sub("", _PROLOG.sub("", buffer.getvalue(), count=1)))
    for name in set(_ID.findall(text)):
        new = f"{prefix}-{name}"
        text = text.replace(f'id="{name}"', f'id="{new}"')
        text = text.replace(f'"#{name}"', f'"#{new}"').replace(f"url(#{name})", f"url(#{new})")
    return text


def _style(axes: Axes) -> None:
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    axes.spines["left"].set_color("#888888")
    axes.spines["bottom"].set_color("#888888")
    axes.tick_params(colors="#333333", labelsize=9)


def _plain(text: str) -> str:
    """Data text for a plot label: no mathtext (a ``$`` from the network stays a ``$``),
    and at most ``LABEL_CHARS`` long (a 253-character domain name would otherwise widen
    the plot and shrink everything in it; the table has the whole name)."""
    if len(text) > LABEL_CHARS:
        text = text[: LABEL_CHARS - 1] + "…"
    return text.replace("$", r"\$")


def _daily_plot(figures: Transparency) -> str:
    figure = _new_figure(10.0, 3.6)
    axes = figure.add_subplot()
    _style(axes)
    labels = [day.day.strftime("%a %m-%d") for day in figures.days]
    positions = list(range(len(labels)))
    bottoms = [0.0] * len(labels)
    for protection in PROTECTIONS:
        values = [(day.delivered.share(protection) or 0.0) * 100 for day in figures.days]
        axes.bar(
            positions,
            values,
            0.7,
            bottom=bottoms,
            color=COLOURS[protection],
            label=protection.label,
            edgecolor="white",
            linewidth=0.6,
        )
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 100)
    axes.set_ylabel("% of recipients delivered", fontsize=9)
    axes.yaxis.grid(True, color="#e5e5e5", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9, reverse=True
    )
    return _to_svg(figure, "daily")


def _domains_plot(figures: Transparency) -> str:
    domains = list(reversed(figures.domains))  # the busiest on top
    figure = _new_figure(10.0, 0.9 + 0.36 * len(domains))
    axes = figure.add_subplot()
    _style(axes)
    positions = list(range(len(domains)))
    lefts = [0.0] * len(domains)
    for protection in PROTECTIONS:
        values = [float(d.delivered.count(protection)) for d in domains]
        axes.barh(
            positions,
            values,
            0.7,
            left=lefts,
            color=COLOURS[protection],
            label=protection.label,
            edgecolor="white",
            linewidth=0.6,
        )
        lefts = [a + v for a, v in zip(lefts, values, strict=True)]
    axes.set_yticks(positions, [_plain(d.domain) for d in domains])
    axes.set_xlabel("recipients delivered", fontsize=9)
    axes.xaxis.grid(True, color="#e5e5e5", linewidth=0.6)
    axes.set_axisbelow(True)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _to_svg(figure, "domains")


def _deferrals_plot(figures: Transparency) -> str:
    items = list(reversed(figures.deferrals))  # the most on top
    names: Sequence[str] = [  # a code gets its meaning; a result type reads as it is
        item.reason + (f" ({item.meaning})" if item.meaning and not item.tls else "")
        for item in items
    ]
    figure = _new_figure(10.0, 0.9 + 0.36 * len(items))
    axes = figure.add_subplot()
    _style(axes)
    counts = [float(item.count) for item in items]
    bars = axes.barh(
        range(len(items)), counts, 0.65, color=[DEFERRAL_COLOURS[item.tls] for item in items]
    )
    axes.bar_label(bars, [f"{int(c):,}" for c in counts], padding=3, fontsize=9)
    axes.set_yticks(range(len(items)), [_plain(name) for name in names])
    axes.set_xlabel("recipients deferred", fontsize=9)
    axes.xaxis.grid(True, color="#e5e5e5", linewidth=0.6)
    axes.set_axisbelow(True)
    from matplotlib.patches import Patch

    kinds = sorted({item.tls for item in items}, reverse=True)  # TLS first
    axes.legend(
        handles=[Patch(color=DEFERRAL_COLOURS[k], label=DEFERRAL_LABELS[k]) for k in kinds],
        loc="lower right",  # beside the shortest bars: the plot keeps its width
        frameon=False,
        fontsize=9,
    )
    return _to_svg(figure, "deferrals")
