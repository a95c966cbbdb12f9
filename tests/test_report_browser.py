"""The report and compare pages in a real browser (headless Chromium driven by Playwright): no console
errors, every image loads, nothing wider than a 1280 px window, and the report's first screen (1280 x 800)
shows a leaderboard, its Pareto front and the MFU heat map. Screenshots go to ``$REPORT_SCREENSHOTS``
(CI keeps them as artifacts) or the test's temporary folder.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; .ci/run installs it) and the ``playwright`` package
(the dev extra); without them the test is skipped, except under CI, where it fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}
# Chromium as root in a closed network: no sandbox, no background connections that would fail
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _need_browser():
    missing = [what for what, ok in (("chromium", os.path.exists(CHROMIUM)),
                                     ("playwright", _importable("playwright"))) if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {', '.join(missing)} is missing (.ci/run installs them)")
        pytest.skip(f"{', '.join(missing)} not installed")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("REPORT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def make(out: Path, *args: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "reports", *args, f"out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out / "index.html"


def inspect(browser, page_path: Path, shot: Path) -> tuple[dict, object]:
    """Open the page at 1280 x 800; returns (facts, page): console errors, broken images, widths."""
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_path.as_uri(), wait_until="load")
    facts = page.evaluate("""() => ({
        images: document.images.length,
        broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
        scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
        wide: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right >
              window.innerWidth + 0.5 && !e.closest('.tw')).map(e => e.tagName + '.' + e.className).slice(0, 5),
    })""")
    facts["errors"] = errors
    page.screenshot(path=str(shot))
    page.screenshot(path=str(shot.with_name(shot.stem + "-full.png")), full_page=True)
    return facts, page


def _on_first_screen(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["y"] < VIEWPORT["height"] and box["x"] + box["width"] <= VIEWPORT["width"]


@pytest.mark.parametrize("results", ["gpu", "cpu-sweep", "hf-vs-native"])
def test_report_page_in_chromium(browser, shots, tmp_path, results):
    index = make(tmp_path / "report", f"results=results/{results}")
    facts, page = inspect(browser, index, shots / f"report-{results}.png")
    assert facts["errors"] == []
    assert facts["images"] >= 3 and facts["broken"] == []
    assert facts["scrollWidth"] <= facts["innerWidth"] and facts["wide"] == []
    # the first screen: the leaderboard, its Pareto front and the heat map
    assert page.locator("h2").first.inner_text() == "At a glance"
    assert _on_first_screen(page, "section:first-of-type table")
    assert _on_first_screen(page, "figure[id^='glance-pareto-']")
    assert _on_first_screen(page, "figure[id^='glance-mfu-']")
    first_row = page.locator("section:first-of-type table tr").nth(1).inner_text()
    assert first_row.split("\t")[0]  # a strategy, the fastest
    if results == "hf-vs-native":  # both implementations side by side, right after the glance
        assert page.locator("h2").nth(1).inner_text().startswith("The family's model and Hugging Face's")
        assert page.locator("section:nth-of-type(2) table tr").count() >= 2 + 4  # two header rows + 4 pairs
        assert page.locator("figure#implementations img").evaluate("i => i.naturalWidth") > 0
    page.close()


def test_compare_page_in_chromium(browser, shots, tmp_path):
    index = make(tmp_path / "compare", "baseline=results/gpu/before-head-compile", "candidate=results/gpu")
    facts, page = inspect(browser, index, shots / "compare-gpu.png")
    assert facts["errors"] == [] and facts["broken"] == [] and facts["images"] >= 2
    assert facts["scrollWidth"] <= facts["innerWidth"] and facts["wide"] == []
    # the widest table fits without scrolling inside its box
    widths = page.evaluate("[...document.querySelectorAll('.tw')].map(d => [d.scrollWidth, d.clientWidth])")
    assert widths and all(sw <= cw for sw, cw in widths)
    page.close()
