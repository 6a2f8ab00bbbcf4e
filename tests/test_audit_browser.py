"""The audit report in a real browser: headless Chromium (the Debian ``chromium`` package) opens
``index.html`` from disk with networking off, runs its script, and dumps the DOM and a screenshot.

Checks: the page's script ran (``data-ready``) and raised nothing (``window.onerror`` counts into
``data-errors``; Chromium's console log is searched too), the class table and the inlined images are
there, the finding leads with its evidence strips, and the flagged cluster comes first. The
screenshot of the demo's report is saved as ``benchmarks/audit_report.png`` for the README.

The interactive 2-D views are driven through Playwright (its Python package, with the system's
Chromium as the browser): hover a point and see its overlay, switch the clustering, drag a
selection and copy its ids. Without Playwright those tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_support import invoke

from gradcam_batch.engine.audit import audit
from gradcam_batch.engine.audit.synthetic import write_synthetic_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "audit_report.png"
SCATTER_SHOT = SCREENSHOT.with_name("audit_scatter.png")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the chromium package")


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


@pytest.mark.slow
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


# -- the interactive views, through Playwright -------------------------------------------------------

SCRIPT_ID = "</script><script>window.pwned=1</script>&amp;"  # an id that would end the data block if not escaped


@contextlib.contextmanager
def _browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 1400})
            context.grant_permissions(["clipboard-read", "clipboard-write"])
            yield context
        finally:
            browser.close()


def _open(context, page_path: Path):
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(page_path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def _point_xy(page, scatter, index: int) -> tuple[float, float]:
    """Where point ``index`` of this view is drawn, in page pixels (the script's layout: 10 px padding)."""
    d = json.loads(scatter.locator("script.scatter-data").text_content())
    box = scatter.locator("canvas").bounding_box()
    inner = box["width"] - 20
    return box["x"] + 10 + d["x"][index] / 1000 * inner, box["y"] + 10 + (1 - d["y"][index] / 1000) * inner


def _hostile_ids_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 60, 1: 40}, planted={0: 0.5}, rows_per_file=100, seed=7)
    path = out / "part-00000.parquet"
    t = pq.read_table(path)
    ids = t["id"].to_pylist()
    ids[t["class_index"].to_pylist().index(0)] = SCRIPT_ID
    pq.write_table(t.set_column(0, "id", pa.array(ids)), path)
    return out


def test_scatter_hover_switch_select_copy(tmp_path):
    out = _hostile_ids_run(tmp_path)
    result = audit(out, tmp_path / "rep", spray={"view": "spectral"})
    c0 = result[0]
    assert c0.k == 2 and sorted(c0.clusterings) == [1, 2, 3, 4, 5]
    with _browser() as context:
        page, errors = _open(context, tmp_path / "rep" / "index.html")
        scatter = page.locator("section#class-0-gradcam div.scatter")
        scatter.scroll_into_view_if_needed()
        assert scatter.get_attribute("data-k") == "2"
        data = json.loads(scatter.locator("script.scatter-data").text_content())
        assert len(data["ids"]) == 60 and SCRIPT_ID in data["ids"]

        # Hover a point that carries an overlay: its id and its picture show.
        i = int(next(iter(data["thumbs"])))
        page.mouse.move(*_point_xy(page, scatter, i))
        assert scatter.get_attribute("data-shown") == str(data["ids"][i])
        assert scatter.locator(".hover img").get_attribute("src").startswith("data:image/")
        # The hostile id is text in the card, never markup.
        j = data["ids"].index(SCRIPT_ID)
        page.mouse.move(*_point_xy(page, scatter, j))
        page.mouse.click(*_point_xy(page, scatter, j))  # a click pins it
        page.mouse.move(1, 1)
        assert scatter.get_attribute("data-shown") == SCRIPT_ID
        assert scatter.locator(".hover-text b").text_content() == SCRIPT_ID
        assert page.evaluate("window.pwned") is None

        # Switch the clustering: the legend follows, the chosen k stays marked.
        scatter.locator(".ks button[data-k='4']").click()
        assert scatter.get_attribute("data-k") == "4"
        assert scatter.locator(".legend-k .chip").count() == 4
        scatter.locator(".ks button[data-k='2']").click()
        chips = scatter.locator(".legend-k .chip")
        assert chips.count() == 2 and "⚑" in chips.nth(int(c0.flagged[0].cluster)).text_content()

        # Select the flagged cluster from the legend, then copy its ids.
        chips.nth(int(c0.flagged[0].cluster)).click()
        want = [str(data["ids"][n]) for n, ch in enumerate(data["labels"]["2"]) if int(ch, 36) == c0.flagged[0].cluster]
        assert scatter.get_attribute("data-selected") == str(len(want))
        assert scatter.locator("textarea").input_value().split("\n") == want
        scatter.locator(".sel-copy").click()
        page.wait_for_function("document.querySelector('section#class-0-gradcam .sel-status').textContent !== ''")
        assert page.evaluate("navigator.clipboard.readText()").split("\n") == want

        # A dragged rectangle over the whole view selects every point; Clear empties it.
        box = scatter.locator("canvas").bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=4)
        page.mouse.up()
        assert scatter.get_attribute("data-selected") == "60"
        scatter.locator(".sel-clear").click()
        assert scatter.get_attribute("data-selected") == "0"
        assert not errors, errors


def test_page_caps_the_points_and_says_so(tmp_path, monkeypatch):
    from gradcam_batch.engine.audit import report

    monkeypatch.setattr(report, "POINTS_PER_PAGE", 50)
    monkeypatch.setattr(report, "MIN_POINTS_PER_CLASS", 25)
    monkeypatch.setattr(report, "THUMBS_PER_PAGE", 6)
    monkeypatch.setattr(report, "SAMPLES_PER_PAGE", 4)
    out = tmp_path / "run"
    write_synthetic_run(out, rows_per_class={0: 60, 1: 40}, planted={0: 0.5}, seed=8)
    audit(out, tmp_path / "rep", spray={"view": "spectral"})
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "a uniform sample of 25 of the 60 heatmaps" in page and "a uniform sample of 25 of the 40" in page
    assert "each card shows 2 of its 8 samples" in page
    cards = page.split('<div class="card')[1:]
    assert len(cards) == 3 and all(card.count("data-id=") == 2 for card in cards)
    with _browser() as context:
        p, errors = _open(context, tmp_path / "rep" / "index.html")
        views = p.locator("div.scatter")
        assert [views.nth(i).get_attribute("data-points") for i in range(2)] == ["25", "25"]
        data = json.loads(views.nth(0).locator("script.scatter-data").text_content())
        assert len(data["thumbs"]) == 3  # 6 for the page, over two classes
        assert not errors, errors


@pytest.mark.slow
def test_demo_scatter_screenshot(tmp_path):
    """The demo's disc class in the browser, one point hovered, the flagged cluster selected: the README's picture."""
    out = tmp_path / "demo"
    res = invoke(["demo", "-o", str(out), "--overlays", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with _browser() as context:
        page, errors = _open(context, out / "audit" / "index.html")
        scatter = page.locator("section.cls.flagged div.scatter").first
        scatter.scroll_into_view_if_needed()
        flagged = json.loads(scatter.locator("script.scatter-data").text_content())["flagged"][0]
        scatter.locator(f".legend-k .chip[data-cluster='{flagged}']").click()
        data = json.loads(scatter.locator("script.scatter-data").text_content())
        chosen = data["labels"][str(data["k"])]
        i = next(int(t) for t in data["thumbs"] if int(chosen[int(t)], 36) == flagged)  # a watermarked disc
        page.mouse.move(*_point_xy(page, scatter, i))
        assert scatter.locator(".hover img").get_attribute("src").startswith("data:image/jpeg")  # over its image
        scatter.screenshot(path=str(SCATTER_SHOT))
        assert not errors, errors
    assert SCATTER_SHOT.stat().st_size > 10_000
