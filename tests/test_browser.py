"""The tour in a real JupyterLab 4 in Chromium: what a user sees, asserted.

One JupyterLab server and one page for the module; the tests run in this order and share it:
Run All; the first stroke (the kernel's first insertion) shows progress and changes the picture;
an ablation toggle re-renders; 50 rapid strokes alternating draw/erase are stored as drawn and the
picture equals a fresh render; every view fits its output area at 1600, 1500 and 1100 px, in the
light and the dark theme; the notebook saved with its widget state and reopened without its kernel
shows the last pictures and readable unit labels.

Screenshots of every view are kept in test-artifacts/ ({theme}_{width}_{view}.png; look at them).
Skips, with the reason, only where Chromium or Playwright is absent; .ci/run installs both.
"""
import json
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
# the views, by the constructor in their cell: (screenshot name, a selector inside the cell's output)
VIEWS = {"UnitBrowser(": "browser", "IouRanking(": "ranking", "AblationPanel(": "ablation",
         "PaintWidget(": "paint", "LayerSummary(": "summary"}
SCENE = 128  # CSS px: SceneWorld's 64x64 scenes are never shown below 2x
DARK, LIGHT = "JupyterLab Dark", "JupyterLab Light"
RAPID_BLOCKS, RAPID_STROKES = 5, 10

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
    docs = work / "settings" / "@jupyterlab" / "docmanager-extension"
    docs.mkdir(parents=True)
    (docs / "plugin.jupyterlab-settings").write_text('{"autosave": false}')  # the test saves when it means to
    widgets = work / "settings" / "@jupyter-widgets" / "jupyterlab-manager"
    widgets.mkdir(parents=True)
    (widgets / "plugin.jupyterlab-settings").write_text('{"saveState": true}')  # Settings > Save Widget State
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"))
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", "--allow-root",
                             f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={work}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.extension_manager=readonly",
                             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp: theme, kernel probes
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


class Tour:
    """The page with the tour run, shared by the tests (in file order), and what they leave."""

    def __init__(self, page, url, token, work, errors):
        self.page, self.url, self.token, self.work, self.errors = page, url, token, work, errors
        self.strokes = []  # (mode, image x, image y) of every stroke drawn, in order


@pytest.fixture(scope="module")
def tour(lab):
    url, token, work = lab
    os.makedirs(ARTIFACTS, exist_ok=True)
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(60_000)
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        t = Tour(page, url, token, work, errors)
        try:
            run_all(t)
        except Exception:
            page.screenshot(path=os.path.join(ARTIFACTS, "failure.png"))
            browser.close()
            raise
        yield t
        browser.close()


@pytest.fixture
def shot_on_failure(tour, request):
    """The tour; a screenshot of the page when the test fails."""
    failed = request.session.testsfailed
    yield tour
    if request.session.testsfailed > failed:
        try:
            tour.page.screenshot(path=os.path.join(ARTIFACTS, f"failure_{request.node.name}.png"))
        except Exception:
            pass


# -- helpers ----------------------------------------------------------------------------------
def accept_kernel_dialog(page):
    try:  # JupyterLab may ask which kernel to start
        page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=8_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except playwright.TimeoutError:
        pass


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


def img_sha256(page, selector):
    """sha256 (hex) of the bytes an <img> shows (its src is a fresh blob: URL on every render)."""
    return page.eval_on_selector(selector, """async e => {
        const b = await (await fetch(e.getAttribute('src'))).arrayBuffer();
        return Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', b)))
            .map(x => x.toString(16).padStart(2, '0')).join(''); }""")


def kernel(page, code):
    """Run ``code`` in the notebook's kernel (over its connection, outside the notebook's cells);
    its stdout.  A Python error fails the test with the traceback."""
    out, err = page.evaluate("""async code => {
        const app = window.jupyterapp;
        let panel = app.shell.currentWidget;
        if (!panel || !panel.sessionContext) {
            for (const w of app.shell.widgets('main')) { if (w.sessionContext) { panel = w; break; } }
        }
        const future = panel.sessionContext.session.kernel.requestExecute({code, store_history: false});
        let out = '', err = '';
        future.onIOPub = msg => {
            const t = msg.header.msg_type, c = msg.content;
            if (t === 'stream') out += c.text;
            else if (t === 'error') err += c.ename + ': ' + c.evalue + '\\n' + c.traceback.join('\\n');
        };
        await future.done;
        return [out, err]; }""", code)
    assert not err, re.sub(r"\x1b\[[0-9;]*m", "", err)
    return out


PAINT = "import gc as _gc\npaint = [o for o in _gc.get_objects() if type(o).__name__ == 'PaintWidget'][0]\n"


def set_theme(page, theme):
    page.evaluate("t => window.jupyterapp.commands.execute('apputils:change-theme', {theme: t})", theme)
    light = "false" if theme == DARK else "true"
    page.wait_for_function("l => document.body.dataset.jpThemeLight === l && document.body.dataset.jpThemeName",
                           arg=light, timeout=60_000)
    page.wait_for_function("n => document.body.dataset.jpThemeName === n", arg=theme, timeout=60_000)
    page.wait_for_timeout(500)  # the theme's stylesheet applies


def view_selector(name):
    """A selector for the view made in the cell whose code calls ``name``."""
    return f".gandissect-view[data-gd-view='{name}']"


def tag_views(page):
    """Mark each view with its name (data-gd-view), from the constructor in its cell's code."""
    names = page.evaluate("""views => {
        const out = [];
        for (const v of document.querySelectorAll('.gandissect-view')) {
            const cell = v.closest('.jp-Cell');
            const code = cell ? cell.querySelector('.jp-InputArea').textContent : '';
            for (const [call, name] of Object.entries(views)) {
                if (code.includes(call)) { v.dataset.gdView = name; out.push(name); }
            }
        }
        return out; }""", VIEWS)
    assert sorted(names) == sorted(VIEWS.values()), names
    return names


def images_loaded(page, scope=".gandissect-view"):
    """Wait until the pictures in ``scope`` are loaded (those out of sight may load only when
    scrolled to: JupyterLab skips the rendering of cells out of view)."""
    try:
        page.wait_for_function("""s => [...document.querySelectorAll(s + ' img')]
            .every(i => !i.getAttribute('src') || (i.complete && i.naturalWidth > 0))""", arg=scope, timeout=30_000)
    except playwright.TimeoutError:
        bad = page.evaluate("""s => [...document.querySelectorAll(s + ' img')]
            .filter(i => i.getAttribute('src') && !(i.complete && i.naturalWidth > 0))
            .map(i => i.className + ' ' + i.getAttribute('src').slice(0, 40) + ' complete=' + i.complete)""", scope)
        raise AssertionError(f"pictures not loaded in {scope}: {bad}")


# What must hold for a view, as the browser lays it out: a list of problems (empty when right).
LAYOUT = r"""([sel, scene]) => {
    const v = document.querySelector(sel), out = v.closest('.jp-OutputArea-output');
    const area = out.getBoundingClientRect(), problems = [];
    const shown = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
    const name = e => e.tagName.toLowerCase() + (e.className && typeof e.className === 'string'
        ? '.' + e.className.trim().split(/\s+/).join('.') : '') + (e.textContent ? ` "${e.textContent.trim().slice(0, 40)}"` : '');
    if (v.scrollWidth > out.clientWidth + 1) problems.push(`view ${v.scrollWidth}px wide in an output area of ${out.clientWidth}px`);
    for (const e of v.querySelectorAll('*')) {
        if (!shown(e)) continue;
        const r = e.getBoundingClientRect();
        if (r.width === 0 && r.height === 0) continue;
        if (r.right > area.right + 1) problems.push(`${name(e)}: right edge ${r.right.toFixed(0)} beyond the output area's ${area.right.toFixed(0)}`);
    }
    const images = [];
    for (const i of v.querySelectorAll('img')) {
        if (!shown(i) || !i.getAttribute('src')) continue;
        const r = i.getBoundingClientRect(), nw = i.naturalWidth, nh = i.naturalHeight;
        images.push({cls: i.className, w: r.width, h: r.height, nw, nh});
        if (!nw) { problems.push(`${name(i)}: not loaded`); continue; }
        if (Math.abs(r.height / r.width - nh / nw) > 0.02) problems.push(`${name(i)}: shown ${r.width}x${r.height}, aspect of ${nw}x${nh} not kept`);
        if (i.classList.contains('gd-fixed') && Math.abs(r.width - nw) > 0.5)
            problems.push(`${name(i)}: shown ${r.width}px wide, its picture is ${nw}px`);
        if (!i.classList.contains('gd-chart') && (r.width < scene || r.height < scene))  // scenes, strips, grids
            problems.push(`${name(i)}: a scene shown at ${r.width}x${r.height}, below ${scene}px`);
    }
    for (const e of v.querySelectorAll('.widget-readout')) {
        if (!shown(e)) { problems.push(`readout of ${e.parentElement.textContent.trim().slice(0, 20)} hidden`); continue; }
        const r = e.getBoundingClientRect();
        if (r.width <= 0 || !e.textContent.trim()) problems.push(`readout "${e.textContent}" has no width or text`);
        if (e.scrollWidth > e.clientWidth + 1) problems.push(`readout "${e.textContent}" overflows (${e.scrollWidth} > ${e.clientWidth})`);
        const box = e.parentElement.getBoundingClientRect();
        if (r.right > box.right + 1) problems.push(`readout "${e.textContent}" sticks out of its slider`);
    }
    for (const b of v.querySelectorAll('.jupyter-button')) {
        if (!shown(b)) continue;
        if (b.scrollWidth > b.clientWidth + 1 || b.scrollHeight > b.clientHeight + 1)
            problems.push(`button "${b.textContent.trim()}" clipped (${b.scrollWidth}x${b.scrollHeight} in ${b.clientWidth}x${b.clientHeight})`);
    }
    return {problems, images, width: out.clientWidth};
}"""

# Large light boxes inside the views in a dark theme: element backgrounds, and pictures whose
# shown colours (after their CSS filter) are mostly near white.
WHITE_BOXES = r"""async sel => {
    const v = document.querySelector(sel), found = [];
    const shown = e => e.getClientRects().length > 0;
    for (const e of [v, ...v.querySelectorAll('*')]) {
        if (!shown(e)) continue;
        const r = e.getBoundingClientRect(), m = getComputedStyle(e).backgroundColor.match(/[\d.]+/g);
        if (!m || r.width * r.height < 80 * 80) continue;
        const [R, G, B, A = 1] = m.map(Number);
        if (A > 0.5 && Math.min(R, G, B) > 200) found.push(`${e.tagName.toLowerCase()}.${e.className}: background ${m}`);
    }
    for (const i of v.querySelectorAll('img')) {
        if (!shown(i) || !i.naturalWidth) continue;
        const r = i.getBoundingClientRect();
        if (r.width * r.height < 80 * 80) continue;
        const c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext('2d');
        g.filter = getComputedStyle(i).filter === 'none' ? 'none' : getComputedStyle(i).filter;
        g.drawImage(i, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let light = 0;
        for (let k = 0; k < d.length; k += 4) if (Math.min(d[k], d[k + 1], d[k + 2]) > 200) light++;
        const share = light / (d.length / 4);
        if (share > 0.5) found.push(`img.${i.className} (${r.width}x${r.height}): ${(100 * share).toFixed(0)}% near white as shown`);
    }
    return found;
}"""


def check_layout(page, theme, width, shots=True):
    """Lay the tour out at ``width``; every view: screenshot and its problems."""
    page.set_viewport_size({"width": width, "height": 1100})
    page.wait_for_timeout(600)  # JupyterLab re-lays out on resize
    problems, shapes = [], {}
    for name in VIEWS.values():
        sel = view_selector(name)
        view = page.locator(sel)
        view.scroll_into_view_if_needed()
        images_loaded(page, sel)
        got = page.evaluate(LAYOUT, [sel, SCENE])
        problems += [f"{theme} {width}px {name}: {p}" for p in got["problems"]]
        shapes[name] = got
        if shots:
            shoot(page, view, os.path.join(ARTIFACTS, f"{theme}_{width}_{name}.png"), width)
    return problems, shapes


def stroke(page, box, fx, fy, length=0.04, steps=3):
    """A short horizontal stroke starting at (fx, fy) (fractions of the canvas); its start in
    image pixels (the canvas shows the picture at 4x)."""
    x, y = box["x"] + box["width"] * fx, box["y"] + box["height"] * fy
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(x + box["width"] * length * i / steps, y)
    page.mouse.up()
    return box["width"] * fx / 4, box["height"] * fy / 4


def click_mode(page, mode):
    page.locator(".gd-paint .gd-mode", has_text=re.compile(f"^{mode}$")).click()


def run_all(t):
    page = t.page
    page.goto(f"{t.url}/lab/tree/tour.ipynb?token={t.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    accept_kernel_dialog(page)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands", timeout=60_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
    page.locator("li.lm-Menu-item", has=page.locator(".lm-Menu-itemLabel",
                                                      has_text=re.compile("^Run All Cells$"))).click()
    for selector in (".gd-ablation img.gd-edited[src]", "canvas.gd-paint-canvas", ".gd-paint img.gd-paint-result[src]",
                     ".gd-browser .gd-unit-card img[src]", ".gd-browser .gd-panel img[src]"):
        wait_or_traceback(page, selector, timeout=300_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=300_000)
    wait_or_traceback(page, ".gandissect-view:not(.gd-browser):not(.gd-ranking):not(.gd-ablation):not(.gd-paint) img[src]",
                      timeout=120_000)
    tag_views(page)


# -- the tests, in order ------------------------------------------------------------------------
def test_first_stroke_shows_progress(shot_on_failure):
    """The kernel's first insertion computes insertion values: the paint view's progress line
    shows while it does, and the picture changes."""
    t = shot_on_failure
    page = t.page
    canvas = page.locator(".gd-paint-canvas").first
    canvas.scroll_into_view_if_needed()
    assert page.locator(".gd-paint .gd-progress").evaluate("e => getComputedStyle(e).display") == "none"
    before = img_sha256(page, ".gd-paint img.gd-paint-result")
    old_src = img_src(page, ".gd-paint img.gd-paint-result")
    page.evaluate("""() => {  // every state the progress line takes, as it takes it
        window.gdProgress = [];
        const line = document.querySelector('.gd-paint .gd-progress');
        const look = () => { if (getComputedStyle(line).display !== 'none') window.gdProgress.push(line.textContent.trim()); };
        new MutationObserver(look).observe(line, {attributes: true, childList: true, subtree: true, characterData: true}); }""")
    box = canvas.bounding_box()
    click_mode(page, "draw")
    t.strokes.append(("draw",) + stroke(page, box, 0.3, 0.8, length=0.3, steps=8))
    page.wait_for_function("() => window.gdProgress.length > 0", timeout=30_000, polling="raf")
    seen = page.evaluate("() => window.gdProgress")
    assert any(re.search(r"insertion values of .*: \d+/\d+", s) for s in seen), seen
    page.wait_for_function("() => getComputedStyle(document.querySelector('.gd-paint .gd-progress')).display === 'none'",
                           timeout=60_000)
    wait_src_change(page, ".gd-paint img.gd-paint-result", old_src)
    assert img_sha256(page, ".gd-paint img.gd-paint-result") != before
    page.locator(".gd-paint").first.screenshot(path=os.path.join(ARTIFACTS, "paint_after_stroke.png"))


def test_ablation_toggle_rerenders(shot_on_failure):
    page = shot_on_failure.page
    panel = page.locator(".gd-ablation").first
    panel.scroll_into_view_if_needed()
    page.screenshot(path=os.path.join(ARTIFACTS, "ablation_before.png"))
    before = img_src(page, ".gd-ablation img.gd-edited")
    page.locator(".gd-ablation .gd-unit-toggle").first.click()
    wait_src_change(page, ".gd-ablation img.gd-edited", before)
    panel.screenshot(path=os.path.join(ARTIFACTS, "ablation_after_toggle.png"))


def test_rapid_strokes_match_a_fresh_render(shot_on_failure):
    """5 blocks of 10 strokes, the mode switched by its buttons before each block, as fast as
    Playwright goes: the kernel stores every stroke with the mode it was drawn in, where it was
    drawn, and the picture shown equals a fresh render of the strokes."""
    t = shot_on_failure
    page = t.page
    canvas = page.locator(".gd-paint-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    for b in range(RAPID_BLOCKS):
        mode = ("draw", "erase")[b % 2]
        click_mode(page, mode)
        for i in range(RAPID_STROKES):
            t.strokes.append((mode,) + stroke(page, box, 0.06 + 0.09 * i, 0.1 + 0.18 * b))
    expected = len(t.strokes)
    probe = PAINT + ("ok = paint.wait(120)\nimport json as _json\n"
                     "print(_json.dumps({'ok': ok, 'n': len(paint.strokes), 'busy': paint.busy}))")
    deadline = time.time() + 180
    while True:  # the kernel handles the canvas's events between these probes
        state = json.loads(kernel(page, probe))
        if (state["n"] >= expected and not state["busy"]) or time.time() > deadline:
            break
        page.wait_for_timeout(500)
    assert state["n"] == expected, f"{state['n']} strokes stored, {expected} drawn"
    check = PAINT + f"""import json as _json, hashlib as _h
import numpy as _np
from gandissect_widgets.widgets.encode import encode_image as _enc
paint.wait(120)
_drawn = {json.dumps(t.strokes)}
_fresh = paint.session.images([paint.sample.value], paint.interventions())[0]
print(_json.dumps({{
    'modes': [st.mode for st in paint.strokes],
    'where': [[round(float(a.mean()), 1) for a in _np.nonzero(st.mask)[::-1]] for st in paint.strokes],
    'at_start': [bool(st.mask[int(y), int(x)]) for st, (_, x, y) in zip(paint.strokes, _drawn)],
    'equal': bool(_np.array_equal(_fresh, paint._image)),
    'sha': _h.sha256(_enc(_fresh, 'png', paint.scale)).hexdigest(),
    'error': repr(paint.last_error)}}))"""
    got = json.loads(kernel(page, check))
    wrong = [f"stroke {i} drawn as {d[0]} at ({d[1]:.1f}, {d[2]:.1f}), stored as {m} at {w}"
             for i, (d, m, w) in enumerate(zip(t.strokes, got["modes"], got["where"])) if d[0] != m]
    # (a stroke just after a mode click that keeps the old mode: the click was handled after the
    # stroke's mouse_down, e.g. on another kernel thread: JupyterLab 4.4+ sends comm messages over
    # a subshell, and ipykernel 7 routes each comm's messages by where the comm last published)
    assert not wrong, "\n".join(wrong)
    want = ["draw"] + [m for b in range(RAPID_BLOCKS) for m in [("draw", "erase")[b % 2]] * RAPID_STROKES]
    assert got["modes"] == want
    assert all(got["at_start"]), [i for i, ok in enumerate(got["at_start"]) if not ok]
    assert got["error"] == "None", got["error"]
    assert got["equal"], "the picture kept is not a fresh render of the strokes"
    for sel in (".gd-paint img.gd-paint-result", ".gd-paint img.gd-paint-picture"):
        page.wait_for_function("""async ([s, sha]) => {
            const e = document.querySelector(s), b = await (await fetch(e.getAttribute('src'))).arrayBuffer();
            const h = Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', b)))
                .map(x => x.toString(16).padStart(2, '0')).join('');
            return h === sha; }""", arg=[sel, got["sha"]], timeout=30_000, polling=500)
    page.locator(".gd-paint").first.screenshot(path=os.path.join(ARTIFACTS, "paint_after_rapid_strokes.png"))


GRID = """() => {  // the unit browser's grid: its columns, and how many cards fit in its width
    const g = document.querySelector('.gd-browser .widget-gridbox'), cs = getComputedStyle(g);
    const card = g.querySelector('.gd-unit-card'), gap = parseFloat(cs.columnGap) || 0;
    const cols = cs.gridTemplateColumns.split(' ').length, w = card.getBoundingClientRect().width;
    return {cols, fit: Math.max(1, Math.floor((g.clientWidth + gap) / (w + gap))), width: g.clientWidth, card: w}; }"""


def show_unit_detail(page):
    """Click the first unit card: the unit browser's detail shows (hidden until then)."""
    if page.locator(".gd-browser .gd-panel").first.evaluate("e => getComputedStyle(e).display") != "none":
        return
    page.locator(".gd-browser .gd-unit-card .jupyter-button").first.click()
    page.wait_for_function("""() => { const d = document.querySelector('.gd-browser .gd-panel');
        return getComputedStyle(d).display !== 'none' && [...d.querySelectorAll('img')]
            .every(i => i.complete && i.naturalWidth > 0); }""", timeout=60_000)


def test_layout_light(shot_on_failure):
    """Every view fits its output area; scenes at 2x or more, not squeezed, aspect kept;
    readouts and button labels whole; the unit browser's grid holds as many columns as fit and
    its detail goes below when narrow; pressed unit toggles stand out."""
    page = shot_on_failure.page
    set_theme(page, LIGHT)
    show_unit_detail(page)
    problems = []
    for width in (1600, 1500, 1100):
        got, shapes = check_layout(page, "light", width, shots=width != 1500)
        problems += got
        page.locator(view_selector("browser")).scroll_into_view_if_needed()
        grid = page.evaluate(GRID)
        if grid["cols"] != grid["fit"]:
            problems.append(f"light {width}px browser: {grid['cols']} card columns where {grid['fit']} fit ({grid})")
        g, d = (page.locator(f".gd-browser {s}").first.bounding_box() for s in (".widget-gridbox", ".gd-panel"))
        area = shapes["browser"]["width"]
        beside = d["x"] >= g["x"] + g["width"] - 1 and d["y"] < g["y"] + g["height"]
        if not beside and d["y"] < g["y"] + g["height"] - 1:
            problems.append(f"light {width}px browser: the detail overlaps the grid ({g}, {d})")
        if area < grid["card"] + d["width"] + 20 and beside:
            problems.append(f"light {width}px browser: the detail sits beside a grid that has no room")
        if width == 1100 and beside:
            problems.append(f"light {width}px browser: the detail is not below the grid in {area}px")
    problems += toggle_contrast(page, "light")
    assert not problems, "\n".join(problems)


def toggle_contrast(page, theme):
    """Pressed and unpressed toggles differ clearly: unit toggles, and the mode toggles."""
    pairs = page.evaluate("""() => {
        const rgb = e => getComputedStyle(e).backgroundColor.match(/[\\d.]+/g).slice(0, 3).map(Number);
        const out = {};
        for (const [name, sel, pressed] of [
                ['unit toggles', '.gd-ablation .gd-unit-toggle', 'mod-active'],
                ['ablation mode', '.gd-ablation .widget-toggle-buttons .widget-toggle-button', 'mod-active'],
                ['ranking metric', '.gd-ranking .widget-toggle-buttons .widget-toggle-button', 'mod-active'],
                ['paint mode', '.gd-paint .gd-mode', 'mod-primary']]) {  // ChoiceButtons: the chosen one is primary
            const on = document.querySelector(`${sel}.${pressed}`), off = document.querySelector(`${sel}:not(.${pressed})`);
            out[name] = on && off ? [rgb(on), rgb(off)] : null;
        }
        return out; }""")
    problems = []
    for name, colours in pairs.items():
        if colours is None:
            problems.append(f"{theme}: no pressed and unpressed {name} to compare")
            continue
        on, off = colours
        gap = sum((a - b) ** 2 for a, b in zip(on, off)) ** 0.5
        if gap < 80:
            problems.append(f"{theme}: pressed {name} {on} hardly differs from unpressed {off} (distance {gap:.0f})")
    return problems


def shoot(page, locator, path, width):
    """A screenshot of a whole view (the notebook scrolls inside the page: a view taller than
    the window gets a taller window for the shot)."""
    locator.scroll_into_view_if_needed()
    h = locator.bounding_box()["height"]
    if h > 900:
        page.set_viewport_size({"width": width, "height": int(h) + 300})
        page.wait_for_timeout(400)
        locator.scroll_into_view_if_needed()
    locator.screenshot(path=path)
    if h > 900:
        page.set_viewport_size({"width": width, "height": 1100})
        page.wait_for_timeout(400)


def test_layout_dark(shot_on_failure):
    """The dark theme: charts inverted, pressed toggles clear, no large white boxes."""
    page = shot_on_failure.page
    set_theme(page, DARK)
    show_unit_detail(page)
    try:
        problems = []
        for width in (1600, 1100):
            problems += check_layout(page, "dark", width)[0]
            for name in VIEWS.values():
                sel = view_selector(name)
                page.locator(sel).scroll_into_view_if_needed()
                problems += [f"dark {width}px {name}: {p}" for p in page.evaluate(WHITE_BOXES, sel)]
        filters = page.evaluate("""() => [...document.querySelectorAll('.gandissect-view img.gd-chart')]
            .map(i => [i.classList.contains('gd-key'), getComputedStyle(i).filter])""")
        charts, keys = [f for k, f in filters if not k], [f for k, f in filters if k]
        assert charts and all("invert" in f for f in charts), filters  # dark-on-white charts inverted
        assert len(keys) >= 2 and not any("invert" in f for f in keys), filters  # keys match the pictures
        problems += toggle_contrast(page, "dark")
        assert not problems, "\n".join(problems)
    finally:
        set_theme(page, LIGHT)


def test_reopened_notebook(shot_on_failure):
    """Saved with its widget state, closed, its kernel shut down, and opened again: the notebook
    shows the last edited images and the painted picture, unit labels are readable; every view's
    output also carries a static PNG."""
    t = shot_on_failure
    page, url, token, work = t.page, t.url, t.token, t.work
    page.set_viewport_size({"width": 1500, "height": 1100})
    edited = img_sha256(page, ".gd-ablation img.gd-edited")
    picture = img_sha256(page, ".gd-paint img.gd-paint-picture")
    page.locator(".jp-Notebook").first.click()
    path = work / "tour.ipynb"
    saved_before = path.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    # saved: the file was written and the tab is no longer marked as changed (only then may the
    # kernel go: the widget state is taken from the live models while saving)
    deadline = time.time() + 60
    while path.stat().st_mtime_ns == saved_before and time.time() < deadline:
        time.sleep(0.3)
    page.wait_for_function("() => !document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-dirty')",
                           timeout=60_000)
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("widgets"), "the notebook was saved without its widget state"
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(m["model_name"] == "ImageModel" for m in state.values())
    missing = set()
    for c in nb["cells"]:  # every view shown, and every model it refers to, is in the saved state
        for o in c.get("outputs", []):
            view = o.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view:
                missing |= model_refs({"": "IPY_MODEL_" + view["model_id"]}, state)
    assert not missing, f"the saved widget state lacks {len(missing)} models the outputs show"
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
    accept_kernel_dialog(page)
    page.wait_for_selector(".gd-ablation img.gd-edited[src]", state="attached", timeout=120_000)
    page.wait_for_selector(".gd-paint img.gd-paint-picture[src]", state="attached", timeout=60_000)
    panel = page.locator(".gd-ablation").first
    panel.scroll_into_view_if_needed()
    page.wait_for_function("s => { const e = document.querySelector(s); return e && e.complete; }",
                           arg=".gd-ablation img.gd-edited", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('.gd-ablation .gd-unit-toggle').length > 0")
    shoot(page, panel, os.path.join(ARTIFACTS, "ablation_reopened.png"), 1500)
    assert img_sha256(page, ".gd-ablation img.gd-edited") == edited
    labels = page.evaluate("""() => [...document.querySelectorAll('.gd-ablation .gd-unit-toggle')]
        .filter(e => e.getClientRects().length).map(e => {
            const r = e.getBoundingClientRect(), before = getComputedStyle(e, '::before');
            const range = document.createRange(); range.selectNodeContents(e);
            const text = [...range.getClientRects()];
            return {text: e.textContent.trim(), sw: e.scrollWidth, cw: e.clientWidth, sh: e.scrollHeight, ch: e.clientHeight,
                    disconnected: e.classList.contains('jupyter-widgets-disconnected'),
                    mark: before.content, position: before.position,
                    inside: text.every(t => t.left >= r.left - 0.5 && t.right <= r.right + 0.5)}; })""")
    assert labels, "no unit toggles after reopening"
    for lab in labels:
        assert lab["text"], lab
        assert lab["sw"] <= lab["cw"] + 1 and lab["sh"] <= lab["ch"] + 1 and lab["inside"], f"label clipped: {lab}"
        if lab["disconnected"] and lab["mark"] not in ("none", "normal"):
            assert lab["position"] == "absolute", f"the disconnected mark sits in the label's text: {lab}"
    assert any(lab["disconnected"] for lab in labels), labels  # what this checks: a view without its kernel
    paint = page.locator(".gd-paint").first
    paint.scroll_into_view_if_needed()
    page.wait_for_function("s => { const e = document.querySelector(s); return e && e.complete && e.naturalWidth > 0; }",
                           arg=".gd-paint img.gd-paint-picture", timeout=60_000)
    assert img_sha256(page, ".gd-paint img.gd-paint-picture") == picture
    paint.screenshot(path=os.path.join(ARTIFACTS, "paint_reopened.png"))


def model_refs(value, state, seen=None):
    """The models ``value`` refers to (IPY_MODEL_...), transitively, that ``state`` lacks."""
    seen = set() if seen is None else seen
    missing = set()
    if isinstance(value, str) and value.startswith("IPY_MODEL_"):
        mid = value[len("IPY_MODEL_"):]
        if mid not in seen:
            seen.add(mid)
            if mid not in state:
                return {mid}
            missing |= model_refs(state[mid]["state"], state, seen)
    elif isinstance(value, dict):
        for v in value.values():
            missing |= model_refs(v, state, seen)
    elif isinstance(value, list):
        for v in value:
            missing |= model_refs(v, state, seen)
    return missing


def test_no_browser_errors(tour):
    benign = ("favicon", "Failed to load resource: the server responded with a status of 404")
    real = [e for e in tour.errors if not any(b in e for b in benign)]
    assert not real, "\n".join(real)
