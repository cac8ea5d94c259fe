"""The transparency report end to end: a real receipt log, ``mta report``, and a real
browser (headless Chromium) looking at the page it made."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trustme
from PIL import Image, ImageStat

from mta import cli, config
from mta.events import Event
from mta.report.receipt_log import ReceiptLog, receipts_dir
from mta.report.transparency import Protection, build
from mta.report.transparency_cli import render_page
from mta.report.transparency_html import COLOURS, DEFERRAL_COLOURS
from mta.spool.keys import KeyRing
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, free_port, policy
from tests.report.transparency_sample import NOW, week

CHROMIUM = "/usr/bin/chromium"
BROWSER_WAIT = 90.0  # seconds for one headless run
WIDTH, HEIGHT = 1200, 2600  # the whole page, the deferral plot at its foot too


class FakeClock:
    def __init__(self, now: float) -> None:
        self.moment = now

    def now(self) -> float:
        return self.moment


def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, config.Config]:
    monkeypatch.setenv("MTA_HOME", str(tmp_path / "var"))
    policy = tmp_path / "relay.toml"
    policy.write_text('hostname = "relay.test"\n')
    cfg = config.load(policy)
    cfg.spool.key_file.parent.mkdir(parents=True, mode=0o700)
    cfg.spool.path.mkdir(parents=True, mode=0o700)
    return policy, cfg


def _store(cfg: config.Config, events: list[Event], now: float) -> KeyRing:
    """The events written by the relay's own sink, as a running relay would."""
    keyring = KeyRing.create(cfg.spool.key_file)
    log = ReceiptLog.open(receipts_dir(cfg), keyring, max_age=30 * 86400, clock=FakeClock(now))
    for event in events:
        log(event)
    assert asyncio.run(log.flush()) == len(events)
    return keyring


def _rows(page: str) -> list[str]:
    return re.findall(r"<tr><td>(\d{4}-\d\d-\d\d)</td>", page)


def test_mta_report_reads_the_receipt_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    policy, cfg = _home(tmp_path, monkeypatch)
    now = time.time()
    events = week(now)
    _store(cfg, events, now)  # no relay runs: the flush request finds no socket, quietly
    out = tmp_path / "report.html"
    assert cli.main(["report", "--config", str(policy), "--out", str(out)]) == cli.EXIT_OK
    page = out.read_text()
    figures = build(events, now=now, days=7)
    assert page.count("<svg") == 3
    assert _rows(page) == [day.day.isoformat() for day in figures.days]
    assert "<title>Transparency report: relay.test</title>" in page
    assert f'<div class="value">{figures.delivered.total:,}</div>' in page
    assert figures.delivered.total > 1500  # the week is there, not an empty page
    assert "report: 7 day(s) written to" in capsys.readouterr().err

    assert cli.main(["report", "--config", str(policy), "--days", "2"]) == cli.EXIT_OK
    shown = capsys.readouterr().out
    assert shown.startswith("<!DOCTYPE html>")
    assert _rows(shown) == [day.day.isoformat() for day in figures.days[-2:]]


@pytest.mark.parametrize("days", ["0", "367", "x"])
def test_mta_report_refuses_a_bad_day_count(
    days: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy, _ = _home(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--config", str(policy), "--days", days])
    assert exit_.value.code == 2


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_WAIT,
        check=True,
    )


def test_chromium_shows_the_plots_and_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cfg = _home(tmp_path, monkeypatch)
    keyring = _store(cfg, week(), NOW)
    page = render_page(receipts_dir(cfg), keyring, now=NOW, days=7, title="Transparency report")
    html = tmp_path / "report.html"
    html.write_text(page)
    profile = tmp_path / "chromium"

    dom = _chromium("--dump-dom", html.as_uri(), profile=profile).stdout
    dom = dom.replace("&nbsp;", "\u00a0")  # how the browser serialises the page's NBSPs
    assert dom.count("<svg") == 3  # parsed as SVG elements, each plot there
    assert re.findall(r"<tr><td>(2024-03-0\d)</td>", dom) == [f"2024-03-0{n}" for n in range(1, 8)]
    # what the browser shows for known days (from the seeded week): shares per protection
    assert "<td>2024-03-01</td><td>341</td><td>33.7\u00a0%</td><td>34.0\u00a0%</td>" in dom
    assert "<td>11.4\u00a0%</td><td>18.2\u00a0%</td><td>2.6\u00a0%</td>" in dom
    assert '<td class="name">gmail.example</td><td>472</td>' in dom
    assert '4.4.1</td><td class="text">no answer from host</td><td>41</td>' in dom
    assert 'starttls-not-supported</td><td class="text">STARTTLS not offered</td>' in dom
    assert "TLS reports (21 recipients in this period) are left out" in dom

    png = tmp_path / "report.png"
    _chromium(
        f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}", html.as_uri(), profile=profile
    )
    with Image.open(png) as image:
        assert image.size == (WIDTH, HEIGHT)
        rgb = image.convert("RGB")
    assert ImageStat.Stat(rgb.convert("L")).stddev[0] > 20  # not a blank page
    colours = {colour: 0 for colour in [*COLOURS.values(), *DEFERRAL_COLOURS.values()]}
    for count, pixel in rgb.getcolors(WIDTH * HEIGHT) or []:
        hex_colour = "#{:02x}{:02x}{:02x}".format(*pixel)
        if hex_colour in colours:
            colours[hex_colour] += count
    # every protection class is drawn (the bars' flat fill is exactly its colour), and
    # both kinds of deferral
    assert all(colours[COLOURS[p]] > 300 for p in Protection), colours
    assert all(colours[DEFERRAL_COLOURS[tls]] > 300 for tls in (True, False)), colours


@pytest.mark.timeout(120)
def test_a_running_relay_serves_the_page_at_get_report(tls_ca: trustme.CA, tmp_path: Path) -> None:
    port = free_port()
    with Receiver("127.0.0.1", tls="fs", ca=tls_ca) as rx:
        metrics = f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        relay = RelayProcess(tmp_path, policy(f"[127.0.0.1]:{rx.port}", extra=metrics))
        relay.start()
        try:
            with relay.smtp() as smtp:
                smtp.sendmail("alice@sender.test", ["bob@dest.test"], b"Subject: hi\r\n\r\nhi\r\n")
            rx.wait_for(1, timeout=20)
            # the attempt is still in the relay's receipt buffer: the page writes it out first
            url = f"http://127.0.0.1:{port}/report?days=1"
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(url, timeout=30) as response:
                    assert response.headers["Content-Type"].startswith("text/html")
                    page = response.read().decode()
                if (
                    '<td class="name">dest.test</td><td>1</td>' in page
                    or time.monotonic() > deadline
                ):
                    break
                time.sleep(0.2)  # the scheduler settles the attempt just after the 250
        finally:
            relay.stop()
    assert page.count("<svg") == 2  # per day and domains; no deferral, no deferral plot
    assert re.findall(r"<tr><td>(\d{4}-\d\d-\d\d)</td><td>1</td>", page)  # today: 1 delivered
    assert '<td class="name">dest.test</td><td>1</td>' in page
    assert "Transparency report: " in page
