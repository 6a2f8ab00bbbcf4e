"""The audit report in a real browser: headless Chromium (the Debian ``chromium`` package) opens
``index.html`` from disk with networking off, runs its script, and dumps the DOM and a screenshot.

Checks: the page's script ran (``data-ready``) and raised nothing (``window.onerror`` counts into
``data-errors``; Chromium's console log is searched too), the class table and the inlined images are
there, the finding leads with its evidence strips, and the flagged cluster comes first. The
screenshot of the demo's report is saved as ``benchmarks/audit_report.png`` for the README.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from run_support import invoke

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "audit_report.png"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package")]


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=180)


def test_report_renders_in_chromium(tmp_path):
    out = tmp_path / "demo"
    res = invoke(["demo", "-o", str(out), "--overlays", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    page = out / "audit" / "index.html"
    assert page.exists() and str(page) in res.output
    url = page.as_uri()

    dom = _chromium(tmp_path, url, "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    body = re.search(r"<body[^>]*>", html).group(0)
    assert 'data-ready="1"' in body, "the page's script did not run"
    assert "data-errors" not in body, "the page raised a JavaScript error"
    console_errors = [
        line for line in dom.stderr.splitlines() if "CONSOLE" in line and re.search(r"error|uncaught", line, re.I)
    ]
    assert not console_errors, console_errors
    assert '<table id="classes">' in html and html.count("data:image/png;base64,") >= 20
    # The finding first: the flagged disc cluster leads the findings, the table and the sections.
    assert "1 finding:" in html and "near the top-right corner" in html
    # The finding's evidence on the page: strength, the ringed prototype, overlays and attended crops
    # of the flagged images and of the class's unflagged cluster for contrast.
    card = html[html.index('<div class="fcard"') : html.index('<div class="legend">')]
    assert 'data-class="1"' in card and "strength 0." in card and "contrast: cluster" in card
    assert card.count('alt="attended"') >= 8 and card.count('alt="overlay"') >= 8
    rows = re.findall(r'<tr([^>]*)data-flagged="(\d+)"', html)
    assert rows and rows[0][1] != "0" and "flagged" in rows[0][0]
    first_section = re.search(r'<section class="cls( flagged)?" id="class-(\d+)-', html)
    assert first_section.group(1) and first_section.group(2) == "1"
    cards = re.findall(r'<div class="card( flagged)?" data-cluster', html[first_section.start() :])
    assert cards[0] == " flagged"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot = _chromium(tmp_path, url, f"--screenshot={SCREENSHOT}", "--window-size=1200,1500", "--hide-scrollbars")
    assert shot.returncode == 0 and SCREENSHOT.stat().st_size > 10_000, shot.stderr[-2000:]
