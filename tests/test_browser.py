"""The tour in a real JupyterLab 4 in Chromium: widgets render, a toggle and a stroke re-render.

Screenshots are kept in test-artifacts/ (look at them).  Skips, with the reason, only where
Chromium or Playwright is absent; .ci/run installs both.
"""
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(os.path.join(ROOT, "notebooks", "tour.ipynb"), work / "tour.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    widgets = work / "settings" / "@jupyter-widgets" / "jupyterlab-manager"
    widgets.mkdir(parents=True)
    (widgets / "plugin.jupyterlab-settings").write_text('{"saveState": true}')  # Settings > Save Widget State
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", "--allow-root",
                             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={work}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.extension_manager=readonly"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("JupyterLab did not start: " + open(work / "lab.log").read()[-3000:])
            time.sleep(0.5)
    yield url, token, work
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def img_src(page, selector):
    return page.eval_on_selector(selector, "e => e.getAttribute('src')")


def wait_or_traceback(page, selector, timeout):
    """Wait for ``selector`` to be attached; fail at once, with its text, if a cell shows a
    Python traceback instead (Run All stops at an error, and the widgets would never come)."""
    found = page.wait_for_function("""s => {
        if (document.querySelector(s)) return 'ok';
        for (const e of document.querySelectorAll('.jp-OutputArea-output')) {
            if (e.textContent.includes('Traceback (most recent call last)')) return e.textContent;
        }
        return false; }""", arg=selector, timeout=timeout, polling=500).json_value()
    assert found == "ok", f"a cell failed while waiting for {selector}:\n{found[-3000:]}"


def wait_src_change(page, selector, old, timeout=60_000):
    page.wait_for_function("([s, old]) => { const e = document.querySelector(s); "
                           "return e && e.getAttribute('src') && e.getAttribute('src') !== old; }",
                           arg=[selector, old], timeout=timeout)


def img_digest(page, selector):
    """A digest of the bytes an <img> shows (its src is a fresh blob: URL on every render)."""
    return page.eval_on_selector(selector, """async e => {
        const b = new Uint8Array(await (await fetch(e.getAttribute('src'))).arrayBuffer());
        let h = 0; for (const x of b) { h = (h * 31 + x) >>> 0; } return b.length + ':' + h; }""")


def test_tour_in_jupyterlab(lab):
    url, token, work = lab
    os.makedirs(ARTIFACTS, exist_ok=True)
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        try:
            edited = drive(page, url, token)
            reopen(page, url, token, work, edited)
        except Exception:
            page.screenshot(path=os.path.join(ARTIFACTS, "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    benign = ("favicon", "Failed to load resource: the server responded with a status of 404")
    real = [e for e in errors if not any(b in e for b in benign)]
    assert not real, "\n".join(real)


def drive(page, url, token):
    page.goto(f"{url}/lab/tree/tour.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    try:  # JupyterLab may ask which kernel to start
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=8_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except playwright.TimeoutError:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.locator("li.lm-Menu-item", has=page.locator(".lm-Menu-itemLabel",
                                                      has_text=re.compile("^Run All Cells$"))).click()
    for selector in (".gd-ablation img.gd-edited[src]", "canvas.gd-paint-canvas", ".gd-paint img.gd-paint-result[src]",
                     ".gd-browser .gd-unit-card img[src]"):
        wait_or_traceback(page, selector, timeout=300_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=300_000)
    page.screenshot(path=os.path.join(ARTIFACTS, "tour_full.png"), full_page=True)

    # ablation: switch off the first toggled unit; the edited strip must re-render
    panel = page.locator(".gd-ablation").first
    panel.scroll_into_view_if_needed()
    page.screenshot(path=os.path.join(ARTIFACTS, "ablation_before.png"))
    before = img_src(page, ".gd-ablation img.gd-edited")
    page.locator(".gd-ablation .gd-unit-toggle").first.click()
    wait_src_change(page, ".gd-ablation img.gd-edited", before)
    panel.screenshot(path=os.path.join(ARTIFACTS, "ablation_after_toggle.png"))

    # paint: one stroke across the canvas; the result must re-render
    canvas = page.locator(".gd-paint-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    before = img_src(page, ".gd-paint img.gd-paint-result")
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.7)
    page.mouse.down()
    for i in range(1, 9):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * i), box["y"] + box["height"] * 0.7, steps=2)
    page.mouse.up()
    wait_src_change(page, ".gd-paint img.gd-paint-result", before)
    page.locator(".gd-paint").first.screenshot(path=os.path.join(ARTIFACTS, "paint_after_stroke.png"))
    return img_digest(page, ".gd-ablation img.gd-edited")


def reopen(page, url, token, work, edited):
    """Saved with its widget state, closed, its kernel shut down, and opened again: the notebook
    shows the last edited images; every view's output also carries a static PNG."""
    import json
    page.locator(".jp-Notebook").first.click()
    page.keyboard.press("Control+s")
    path = work / "tour.ipynb"
    deadline = time.time() + 60
    while True:
        nb = json.loads(path.read_text())
        if nb["metadata"].get("widgets") or time.time() > deadline:
            break
        time.sleep(0.5)
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "ImageModel" for m in state.values())
    views = {"".join(o["data"]["text/plain"]).split()[0]: o["data"] for c in nb["cells"] if c["cell_type"] == "code"
             for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})}
    for name in ("UnitBrowser", "IouRanking", "AblationPanel", "PaintWidget", "LayerSummary"):
        assert views[name]["image/png"], name
    sessions = json.loads(urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=10).read())
    for s in sessions:
        req = urllib.request.Request(f"{url}/api/sessions/{s['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req, timeout=30)
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    try:
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=8_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except playwright.TimeoutError:
        pass
    page.wait_for_selector(".gd-ablation img.gd-edited[src]", state="attached", timeout=120_000)
    panel = page.locator(".gd-ablation").first
    panel.scroll_into_view_if_needed()
    page.wait_for_function("s => { const e = document.querySelector(s); return e && e.complete; }",
                           arg=".gd-ablation img.gd-edited", timeout=60_000)
    panel.screenshot(path=os.path.join(ARTIFACTS, "ablation_reopened.png"))
    assert img_digest(page, ".gd-ablation img.gd-edited") == edited
