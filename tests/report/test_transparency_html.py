"""The transparency page: self-contained, escaped, three plots each with its table."""

from __future__ import annotations

import re
from dataclasses import replace

from mta.model import Outcome, QueueId
from mta.report.transparency import build
from mta.report.transparency_html import DEFERRAL_COLOURS, render_html
from tests.report.test_transparency import DANE_EE, EVENTS, NOW, _attempt
from tests.report.transparency_sample import NOW as WEEK_NOW
from tests.report.transparency_sample import week

NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_the_page_fetches_nothing_and_holds_three_plots() -> None:
    page = render_html(build(week(), now=WEEK_NOW, days=7))
    assert page.count("<svg") == 3
    assert "<?xml" not in page
    assert "<!DOCTYPE svg" not in page
    assert "<metadata>" not in page
    # the only URLs are the SVG namespace names, which are never fetched
    assert set(re.findall(r"https?://[^\"'\s)]*", page)) <= NAMESPACES
    assert not re.search(r"<(script|link|img|iframe|object)\b", page)
    assert not re.search(r"\bsrc=|@import|url\((?!#)", page)
    assert "default-src 'none'" in page  # the browser would refuse a fetch anyway
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # three SVGs inline: no id clashes between them
    assert "per recipient delivered" in page
    assert "TLS reports (21 recipients in this period) are left out" in page


def test_the_page_is_deterministic() -> None:
    figures = build(EVENTS, now=NOW, days=2)
    assert render_html(figures) == render_html(figures)


def test_the_tables_carry_the_numbers() -> None:
    page = render_html(build(EVENTS, now=NOW, days=2))
    assert "<tr><td>2024-03-01</td><td>5</td><td>60.0\u00a0%</td><td>20.0\u00a0%</td>" in page
    assert '<td class="name">dane.test</td><td>3</td><td>3 (100.0\u00a0%)</td>' in page
    tls, other = (_swatch(DEFERRAL_COLOURS[kind]) for kind in (True, False))
    assert (
        f"<td>{tls}starttls-not-supported</td>"
        '<td class="text">STARTTLS not offered</td><td>2</td><td>66.7\u00a0%</td>' in page
    )
    assert f'<td>{other}4.4.1</td><td class="text">no answer from host</td><td>1</td>' in page


def _swatch(colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>'


def test_the_deferral_plot_tells_tls_failures_from_others() -> None:
    page = render_html(build(EVENTS, now=NOW, days=2))
    plot = page[page.index('<section id="deferrals">') :]
    plot = plot[: plot.index("</svg>")]
    tls, other = (DEFERRAL_COLOURS[kind] for kind in (True, False))
    assert plot.count(f"fill: {tls}") == 2  # the starttls-not-supported bar, its legend key
    assert plot.count(f"fill: {other}") == 2  # the 4.4.1 bar, its legend key


def test_strings_from_the_network_are_escaped() -> None:
    hostile = "<script>alert(1)</script>$x$--><img src=x><!--.test"
    events = [*EVENTS, _attempt(NOW - 60, hostile, DANE_EE, (Outcome.SENT,) * 9)]
    deferral = _attempt(NOW - 30, "d.test", DANE_EE, (Outcome.DEFERRED,), reason="<b>&bad")
    events.append(replace(deferral, qid=QueueId("x")))
    page = render_html(build(events, now=NOW, days=2))
    assert "<script" not in page
    assert "<b>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;$x$--&gt;&lt;img src=x&gt;&lt;!--.test" in page
    # matplotlib writes each text it draws into an SVG comment: none are left on the page
    assert "<!--" not in page
    assert "-->" not in page.replace("--&gt;", "")
    assert "&lt;b&gt;&amp;bad" in page


def test_a_long_domain_name_does_not_shrink_its_plot() -> None:
    def widths(domain: str) -> list[float]:
        events = [*EVENTS, _attempt(NOW - 60, domain, DANE_EE, (Outcome.SENT,) * 9)]
        page = render_html(build(events, now=NOW, days=2))
        return [float(w) for w in re.findall(r'<svg\b[^>]*\bwidth="([\d.]+)pt"', page)]

    long = ("a" * 60 + ".") * 4 + "test"  # 248 characters, a valid name
    short, wide = widths("b.test"), widths(long)
    assert len(short) == len(wide) == 3
    assert wide[1] <= short[1] * 1.25  # the domains plot: its label is cut, not the scale


def test_an_empty_period_renders_without_plots_of_nothing() -> None:
    page = render_html(build([], now=NOW, days=1))
    assert "No mail was delivered in this period." in page
    assert "No deferrals in this period." in page
    assert page.count("<svg") == 1  # the daily chart, empty bars
