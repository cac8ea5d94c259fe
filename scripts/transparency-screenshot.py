#!/usr/bin/env python3
"""Make docs/transparency-report.png: the transparency page of the seeded sample week
(tests/report/transparency_sample.py) as headless Chromium shows it.

Run from the repository: ``.venv/bin/python scripts/transparency-screenshot.py``.
The page is drawn tall, the white below it cut off, and the PNG reduced to a palette
so that it stays small in the repository.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageChops  # noqa: E402

from mta.report.transparency import build  # noqa: E402
from mta.report.transparency_html import render_html  # noqa: E402
from tests.report.transparency_sample import NOW, week  # noqa: E402

OUT = ROOT / "docs" / "transparency-report.png"
WIDTH, TALL = 1200, 3600


def main() -> int:
    page = render_html(build(week(), now=NOW, days=7), title="Transparency report: relay.example")
    with tempfile.TemporaryDirectory() as scratch:
        html = Path(scratch) / "report.html"
        html.write_text(page, encoding="utf-8")
        shot = Path(scratch) / "shot.png"
        subprocess.run(  # noqa: S603 - a fixed program, our own arguments
            [
                "/usr/bin/chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={Path(scratch) / 'profile'}",
                f"--screenshot={shot}",
                f"--window-size={WIDTH},{TALL}",
                html.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        with Image.open(shot) as image:
            rgb = image.convert("RGB")
    white = Image.new("RGB", rgb.size, "white")
    box = ImageChops.difference(rgb, white).getbbox()
    bottom = min(rgb.height, (box[3] if box else rgb.height) + 40)
    cropped = rgb.crop((0, 0, WIDTH, bottom))
    OUT.parent.mkdir(exist_ok=True)
    cropped.quantize(colors=96).save(OUT, optimize=True)
    print(f"{OUT}: {cropped.width}x{cropped.height}, {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
