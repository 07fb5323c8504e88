"""`gandissect report DIR`: a self-contained HTML page that renders, sorts and makes no network request.

Built from a planted-world dissection and tiny causal runs through the CLI; checked as text and
in headless Chromium (skipped, with the reason, where Chromium or Playwright is absent).  The
screenshot is kept in test-artifacts/report.png (look at it).
"""
import json
import os
import re
import shutil

import pytest

from gandissect_widgets.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "planted"
    assert main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1", "layer2",
                 "--samples", "200", "--out", str(d), "--device", "cpu", "--quiet"]) == 0
    common = ["--generator", "planted", "--segmenter", "planted", "--layer", "layer1", "--device", "cpu", "--quiet",
              "--dissection", str(d)]
    assert main(["ace", *common, "--concept", "red", "--top", "2", "--samples", "16", "--unit-samples", "8",
                 "--ks", "1", "2", "4", "--random-draws", "2", "--out", str(d / "causal" / "ace_red")]) == 0
    assert main(["context", *common, "--concept", "green", "--top", "1", "--samples", "4", "--locations", "0",
                 "--out", str(d / "causal" / "context_green")]) == 0
    assert main(["report", str(d), "--quiet"]) == 0
    return d


def cards(page_html, layer):
    section = page_html.split(f"id='layer-{layer}'", 1)[1].split("</section>", 1)[0]
    return [int(u) for u in re.findall(r"class='card[^']*' data-unit='(\d+)'", section)]


def test_report_contents(report_dir):
    page = (report_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    # self-contained: nothing fetched from anywhere but the page itself
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:|#)""", page)
    assert "http://" not in page and "https://" not in page
    # per-layer summary, and one card per unit, with pictures, first ordered by IoU
    d = json.load(open(report_dir / "dissect.json"))
    assert "Interpretable units per layer" in page
    for layer in d["layers"]:
        units = cards(page, layer["layer"])
        assert sorted(units) == list(range(len(layer["units"])))
        ious = [layer["units"][u]["iou"] for u in units]
        assert ious == sorted(ious, reverse=True)
    assert cards(page, "layer1")[:4] == sorted(range(4), key=lambda u: -d["layers"][0]["units"][u]["iou"])
    assert page.count("class='strip'") == 32
    assert "no-pictures" not in page
    # causal results found in subdirectories
    assert "data-kind='ace'" in page and "data-kind='context'" in page
    assert "causal/ace_red/ace.json" in page and "Removal ratio by number of units ablated" in page


def test_report_without_the_model(report_dir, tmp_path, capsys):
    out = tmp_path / "nomodel.html"
    assert main(["report", str(report_dir), "--generator", "no-such-gan", "--out", str(out), "--quiet"]) == 0
    page = out.read_text()
    assert "id='no-pictures'" in page and "no-such-gan" in page
    assert "class='strip'" not in page
    assert page.count("data-unit=") == 32
    out = tmp_path / "nopictures.html"
    assert main(["report", str(report_dir), "--no-pictures", "--out", str(out), "--quiet"]) == 0
    page = out.read_text()
    assert "--no-pictures" in page and "class='strip'" not in page and "data-kind='ace'" in page
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no dissect.json" in capsys.readouterr().err


def drawn(page_html, layer):
    section = page_html.split(f"id='layer-{layer}'", 1)[1].split("</section>", 1)[0]
    return [int(u) for u in re.findall(r"data-unit='(\d+)'[^>]*>(?:(?!class='card).)*?class='strip'", section)]


def test_report_draws_the_interpretable_and_the_top_units(report_dir, tmp_path, capsys):
    """By default the pictures are of the interpretable units and the top N by IoU of each layer (a page of
    every unit of large layers weighs tens of MB); --all-units draws them all; the size is printed."""
    d = json.load(open(report_dir / "dissect.json"))
    out = tmp_path / "top2.html"
    capsys.readouterr()
    assert main(["report", str(report_dir), "--top-units", "2", "--out", str(out), "--quiet"]) == 0
    page = out.read_text()
    want_total = 0
    for layer in d["layers"]:
        units = layer["units"]
        by_iou = sorted(range(len(units)), key=lambda u: (-units[u]["iou"], u))
        want = [u for u in by_iou if units[u]["interpretable"] or u in by_iou[:2]]  # brute force, in card order
        assert drawn(page, layer["layer"]) == want
        assert 2 < len(want) < len(units)
        want_total += len(want)
        assert sorted(cards(page, layer["layer"])) == list(range(len(units)))  # every unit keeps its card
    assert page.count("class='strip'") == want_total
    assert f"Pictures of {want_total} of 32 units" in page and "--all-units" in page
    kb = os.path.getsize(out) / 1000
    assert capsys.readouterr().out == f"wrote {out} ({kb:.1f} KB; pictures of {want_total} of 32 units)\n"
    out = tmp_path / "all.html"
    assert main(["report", str(report_dir), "--top-units", "0", "--all-units", "--out", str(out), "--quiet"]) == 0
    assert out.read_text().count("class='strip'") == 32 and "Pictures of" not in out.read_text()
    assert main(["report", str(report_dir), "--top-units", "-1", "--out", str(out)]) == 2
    assert "--top-units must be an integer >= 0" in capsys.readouterr().err


def test_report_in_chromium(report_dir):
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((report_dir / "report.html").as_uri())
        page.wait_for_load_state("load")
        grid = "#cards-layer1"
        order = lambda: page.eval_on_selector_all(f"{grid} .card", "cs => cs.map(c => +c.dataset.unit)")
        # every picture decoded and drawn
        assert page.eval_on_selector_all("img", "is => is.every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator(".card img.strip").count() == 32
        by_iou = order()
        page.locator("#layer-layer1 .sorter button[data-sort='unit']").click()
        by_unit = order()
        assert by_unit == list(range(16)) and by_unit != by_iou
        page.screenshot(path=os.path.join(ARTIFACTS, "report.png"), full_page=True)
        page.locator("#layer-layer1 .sorter button[data-sort='concept']").click()
        labels = page.eval_on_selector_all(f"{grid} .card", "cs => cs.map(c => c.dataset.concept)")
        assert labels == sorted(labels)
        page.locator("#layer-layer1 .sorter button[data-sort='iou']").click()
        assert order() == by_iou
        page.locator("#layer-layer1 .sorter input.only-interp").check()
        assert page.locator(f"{grid} .card:visible").count() == 4  # the four planted concept units
        browser.close()
    assert not errors, "\n".join(errors)
    foreign = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not foreign, foreign
