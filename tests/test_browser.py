"""The tour in a real JupyterLab 4 in Chromium: what a user sees, asserted.

One JupyterLab server and one page for the module (tests/lab.py starts them, as it does for
benchmarks/widget_latency.py); the tests run in this order and share it: Run All; the first
stroke (the kernel's first insertion) shows progress and changes the picture; an ablation toggle
re-renders; 50 rapid strokes alternating draw/erase are stored as drawn and the picture equals a
fresh render; every view fits its output area at 1600, 1500 and 1100 px, in the light and the
dark theme; charts and keys show their theme's copy on a transparent background with readable
text, in the same colours in both themes (a concept's colour in LayerSummary); no white seams
between the scenes of strips and grids in the dark theme; every line of the ablation panel's
wrapped sample columns names its rows, in ablate and insert mode; the notebook saved with its
widget state and reopened without its kernel shows the last pictures and readable unit labels;
the teaching notebook's figure cells show pictures.

Screenshots of every view are kept in test-artifacts/ ({theme}_{width}_{view}.png, the ablation
panel in insert mode as {theme}_{width}_ablation_insert.png, the teaching notebook's figures as
{theme}_{width}_teaching_{n}.png; look at them).
Skips, with the reason, only where Chromium or Playwright is absent; .ci/run installs both.
"""
import json
import os
import re
import shutil
import time

import pytest

import lab as jl  # the JupyterLab launcher, shared with benchmarks/widget_latency.py

ARTIFACTS = os.path.join(jl.ROOT, "test-artifacts")
# the views, by the constructor in their cell: (screenshot name, a selector inside the cell's output)
VIEWS = {"UnitBrowser(": "browser", "IouRanking(": "ranking", "AblationPanel(": "ablation",
         "PaintWidget(": "paint", "LayerSummary(": "summary"}
SCENE = 128  # CSS px: SceneWorld's 64x64 scenes are never shown below 2x
DARK, LIGHT = jl.DARK, jl.LIGHT
RAPID_BLOCKS, RAPID_STROKES = 5, 10

if jl.missing():
    pytest.skip(jl.missing(), allow_module_level=True)
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    with jl.jupyterlab(work, [os.path.join(jl.ROOT, "notebooks", "tour.ipynb")]) as server:
        yield server


class Tour:
    """The page with the tour run, shared by the tests (in file order), and what they leave."""

    def __init__(self, page, lab, errors):
        self.page, self.lab, self.errors = page, lab, errors
        self.url, self.token, self.work = lab.url, lab.token, lab.work
        self.strokes = []  # (mode, image x, image y) of every stroke drawn, in order


@pytest.fixture(scope="module")
def tour(lab):
    os.makedirs(ARTIFACTS, exist_ok=True)
    errors = []
    with jl.chromium(1500, 1100, errors) as page:
        t = Tour(page, lab, errors)
        try:
            run_all(t)
        except Exception:
            page.screenshot(path=os.path.join(ARTIFACTS, "failure.png"))
            raise
        yield t


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
def img_src(page, selector):
    return page.eval_on_selector(selector, "e => e.getAttribute('src')")


wait_or_traceback = jl.wait_or_traceback


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


set_theme = jl.set_theme


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
    except PlaywrightTimeout:
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


# Seams: rows or columns of white across a picture made of several (the gaps of strips and grids,
# filled with white by default), which in a dark theme cut the scenes apart with white lines.
SEAMS = r"""async ([sel, scene]) => {
    const v = document.querySelector(sel), found = [];
    for (const i of v.querySelectorAll('img')) {
        if (!i.checkVisibility() || !i.naturalWidth || i.classList.contains('gd-chart')) continue;
        if (i.naturalWidth < 1.5 * scene && i.naturalHeight < 1.5 * scene) continue;  // one scene: no gaps
        const W = i.naturalWidth, H = i.naturalHeight, c = document.createElement('canvas');
        c.width = W; c.height = H;
        const g = c.getContext('2d');
        g.drawImage(i, 0, 0);
        const d = g.getImageData(0, 0, W, H).data;
        const light = k => d[k + 3] > 200 && d[k] > 200 && d[k + 1] > 200 && d[k + 2] > 200;
        let cols = 0, rows = 0;
        for (let x = 0; x < W; x++) { let n = 0; for (let y = 0; y < H; y++) if (light(4 * (y * W + x))) n++; if (n >= 0.9 * H) cols++; }
        for (let y = 0; y < H; y++) { let n = 0; for (let x = 0; x < W; x++) if (light(4 * (y * W + x))) n++; if (n >= 0.9 * W) rows++; }
        if (cols || rows) found.push(`img.${[...i.classList].join('.')} (${W}x${H}): ${cols} white columns, ${rows} white rows`);
    }
    return found; }"""

# Charts and keys as shown: the theme's copy, through no CSS filter, on a transparent background,
# their text and axes (the ink: the most common grey of the half transparent pixels, glyphs and
# lines drawn over nothing) in a colour that reads on the cell's background (WCAG contrast >= 4.5);
# and the colours they are drawn in (opaque, saturated pixels), to compare between the themes.
CHARTS = r"""async ([sel, dark]) => {
    const v = document.querySelector(sel), problems = [], charts = [];
    const bgOf = e => { for (; e; e = e.parentElement) {
        const m = getComputedStyle(e).backgroundColor.match(/[\d.]+/g);
        if (m && (m.length < 4 || +m[3] > 0.5)) return m.slice(0, 3).map(Number); } return [255, 255, 255]; };
    const lum = rgb => rgb.map(c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; })
        .reduce((s, c, k) => s + c * [0.2126, 0.7152, 0.0722][k], 0);
    const contrast = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
    for (const i of v.querySelectorAll('img.gd-chart')) {
        if (!i.checkVisibility() || !i.naturalWidth) continue;
        const name = [...i.classList].filter(c => c.startsWith('gd-')).join('.'), filter = getComputedStyle(i).filter;
        if (filter !== 'none') problems.push(`${name}: shown through a CSS filter (${filter}), not in the colours drawn`);
        if (!i.classList.contains(dark ? 'gd-for-dark' : 'gd-for-light')) problems.push(`${name}: the other theme's copy shows`);
        const W = i.naturalWidth, H = i.naturalHeight, c = document.createElement('canvas');
        c.width = W; c.height = H;
        const g = c.getContext('2d');
        g.filter = filter;
        g.drawImage(i, 0, 0);
        const d = g.getImageData(0, 0, W, H).data, colours = {}, greys = new Array(32).fill(0);
        let clear = 0;
        for (let k = 0; k < d.length; k += 4) {
            const a = d[k + 3], mx = Math.max(d[k], d[k + 1], d[k + 2]), mn = Math.min(d[k], d[k + 1], d[k + 2]);
            if (a < 10) clear++;
            else if (a === 255 && mx - mn > 60) { const key = `${d[k]},${d[k + 1]},${d[k + 2]}`; colours[key] = (colours[key] || 0) + 1; }
            else if (a > 30 && a < 255 && mx - mn < 16) greys[mx >> 3]++;
        }
        const bg = bgOf(i.parentElement), level = greys.indexOf(Math.max(...greys)) * 8 + 4;
        const ink = bg.map(b => 0.87 * level + 0.13 * b), ratio = contrast(ink, bg), share = clear / (W * H);
        if (share < 0.3) problems.push(`${name}: ${(100 * share).toFixed(0)}% transparent: a box of its own colour`);
        if (!(ratio >= 4.5)) problems.push(`${name}: text and axes ${ink.map(Math.round)} on ${bg}: contrast ${ratio.toFixed(1)} < 4.5`);
        const big = Object.fromEntries(Object.entries(colours).filter(([, n]) => n >= 150));
        charts.push({name, size: [W, H], colours: big, ink: ink.map(Math.round), bg, contrast: ratio});
    }
    return {problems, charts}; }"""

# The ablation panel's rows (original, edited, difference): on every line of sample columns the
# first column's row names show, beside their pictures; the others' stay hidden under pictures.
ROW_NAMES = r"""sel => {
    const v = document.querySelector(sel), problems = [], lines = new Map();
    for (const c of v.querySelectorAll('.gd-sample')) {
        if (!c.checkVisibility()) continue;
        const top = Math.round(c.querySelector('.gd-sample-pictures').getBoundingClientRect().top + window.scrollY);
        if (!lines.has(top)) lines.set(top, []);
        lines.get(top).push(c);
    }
    let n = 0;
    for (const line of lines.values()) {
        n++;
        line.sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left);
        line[0].scrollIntoView({block: 'center'});
        line.forEach((c, j) => {
            const pictures = [...c.querySelectorAll('.gd-sample-pictures img')];
            [...c.querySelectorAll('.gd-sample-label')].forEach((label, r) => {
                const range = document.createRange();
                range.selectNodeContents(label);
                const t = range.getBoundingClientRect(), p = pictures[r].getBoundingClientRect(), y = t.top + t.height / 2;
                const seen = [t.left + 1, t.left + t.width / 2, t.right - 1].map(x => {
                    const hit = document.elementFromPoint(x, y);
                    return !!hit && label.contains(hit); });
                const what = `line ${n} column ${j + 1}: "${label.textContent.trim()}"`;
                if (j === 0) {
                    const text = document.createRange(), box = label.getBoundingClientRect();
                    text.selectNodeContents(label.querySelector('b') || label);
                    if (new Set([...text.getClientRects()].map(r => Math.round(r.top))).size > 1)
                        problems.push(`${what} broken over lines`);
                    if (label.scrollWidth > label.clientWidth + 1 || t.right > box.right + 0.5) problems.push(`${what} clipped`);
                    if (!seen.every(Boolean)) problems.push(`${what} not visible (covered: ${seen})`);
                    if (t.top < p.top - 1 || t.bottom > p.bottom + 1) problems.push(`${what} not beside its pictures`);
                    if (t.right > p.left) problems.push(`${what} runs into its pictures`);
                    if (t.width < 10) problems.push(`${what} has no text`);
                } else if (seen.some(Boolean)) problems.push(`${what} shows between the pictures`);
            });
        });
    }
    return {problems, lines: n, columns: [...lines.values()].map(l => l.length)}; }"""


def theme_checks(page, theme, width):
    """What the theme must show in every view: charts (``CHARTS``), no white seams in the dark
    theme (``SEAMS``), the ablation panel's row names (``ROW_NAMES``); (problems, charts by view)."""
    problems, charts = [], {}
    for name in VIEWS.values():
        sel = view_selector(name)
        page.locator(sel).scroll_into_view_if_needed()
        got = page.evaluate(CHARTS, [sel, theme == "dark"])
        problems += [f"{theme} {width}px {name}: {p}" for p in got["problems"]]
        charts[name] = got["charts"]
        if theme == "dark":
            problems += [f"{theme} {width}px {name}: white seams in {p}" for p in page.evaluate(SEAMS, [sel, SCENE])]
    problems += row_names(page, theme, width)
    return problems, charts


def row_names(page, theme, width):
    got = page.evaluate(ROW_NAMES, view_selector("ablation"))
    problems = [f"{theme} {width}px ablation: {p}" for p in got["problems"]]
    if width <= 1100 and got["lines"] < 2:  # the tour's 8 samples wrap there: the check must see it
        problems.append(f"{theme} {width}px ablation: the sample columns did not wrap ({got['columns']})")
    return problems


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
    jl.open_notebook(page, t.lab, "tour.ipynb")
    jl.run_all(page)
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
    its detail goes below when narrow; pressed unit toggles stand out; charts and keys on a
    transparent background with readable text; every line of the ablation panel's wrapped sample
    columns names its rows."""
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
        if width != 1500:
            problems += theme_checks(page, "light", width)[0]
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
    """The dark theme: the charts' and keys' dark copies, through no filter, transparent, with
    light text; their colours (a concept's in LayerSummary, the selected units' in IouRanking, the
    keys' ramps) the very ones of the light theme; no white seams between the scenes of strips and
    grids; pressed toggles clear; no large white boxes; row names on every line of samples."""
    page = shot_on_failure.page
    set_theme(page, LIGHT)
    show_unit_detail(page)
    page.set_viewport_size({"width": 1600, "height": 1100})
    page.wait_for_timeout(600)
    light = theme_checks(page, "light", 1600)[1]
    set_theme(page, DARK)
    try:
        problems = []
        for width in (1600, 1100):
            problems += check_layout(page, "dark", width)[0]
            got, charts = theme_checks(page, "dark", width)
            problems += got
            for name in VIEWS.values():
                sel = view_selector(name)
                page.locator(sel).scroll_into_view_if_needed()
                problems += [f"dark {width}px {name}: {p}" for p in page.evaluate(WHITE_BOXES, sel)]
                if width != 1600:
                    continue
                if [c["name"] for c in charts[name]] != [c["name"].replace("gd-for-light", "gd-for-dark")
                                                         for c in light[name]]:
                    problems.append(f"dark {name}: charts {[c['name'] for c in charts[name]]}, "
                                    f"light {[c['name'] for c in light[name]]}")
                    continue
                for d, l in zip(charts[name], light[name]):
                    if d["colours"] != l["colours"]:  # the same layout: the same pixels, colour for colour
                        problems.append(f"dark {name} {d['name']}: drawn in {sorted(d['colours'])}, "
                                        f"in the light theme {sorted(l['colours'])}")
        summary = [c for c in light["summary"] if "gd-key" not in c["name"]]
        assert summary and len(summary[0]["colours"]) >= 4, summary  # a concept, a colour: there to compare
        assert light["ablation"] and light["browser"], light  # keys compared too (difference, heat maps)
        problems += toggle_contrast(page, "dark")
        assert not problems, "\n".join(problems)
    finally:
        set_theme(page, LIGHT)


def test_insert_mode(shot_on_failure):
    """The ablation panel in insert mode, in both themes and widths: it fits, its rows are
    named on every line, its key is the theme's; then back to ablate."""
    page = shot_on_failure.page
    panel = page.locator(view_selector("ablation"))

    def mode(name):
        panel.scroll_into_view_if_needed()
        before = img_src(page, ".gd-ablation img.gd-edited")
        page.locator(".gd-ablation .widget-toggle-button", has_text=re.compile(f"^{name}$")).click()
        wait_src_change(page, ".gd-ablation img.gd-edited", before)
        page.wait_for_function("() => getComputedStyle(document.querySelector('.gd-ablation .gd-progress')).display === 'none'"
                               " && !document.querySelector('.gd-ablation').textContent.includes('rendering…')",
                               timeout=60_000)
        images_loaded(page, view_selector("ablation"))

    mode("insert")
    problems = []
    try:
        for theme in ("dark", "light"):  # ends in the light theme, as the tests after it expect
            set_theme(page, LIGHT if theme == "light" else DARK)
            for width in (1600, 1100):
                page.set_viewport_size({"width": width, "height": 1100})
                page.wait_for_timeout(600)
                panel.scroll_into_view_if_needed()
                images_loaded(page, view_selector("ablation"))
                got = page.evaluate(LAYOUT, [view_selector("ablation"), SCENE])
                problems += [f"{theme} {width}px ablation (insert): {p}" for p in got["problems"]]
                problems += row_names(page, theme, width)
                charts = page.evaluate(CHARTS, [view_selector("ablation"), theme == "dark"])
                problems += [f"{theme} {width}px ablation (insert): {p}" for p in charts["problems"]]
                if theme == "dark":
                    problems += [f"dark {width}px ablation (insert): white seams in {p}"
                                 for p in page.evaluate(SEAMS, [view_selector("ablation"), SCENE])]
                shoot(page, panel, os.path.join(ARTIFACTS, f"{theme}_{width}_ablation_insert.png"), width)
        assert "insert" in page.locator(".gd-ablation").first.text_content()
    finally:
        set_theme(page, LIGHT)
        page.set_viewport_size({"width": 1500, "height": 1100})
        mode("ablate")
    assert not problems, "\n".join(problems)


def test_reopened_notebook(shot_on_failure):
    """Saved with its widget state, closed, its kernel shut down, and opened again: the notebook
    shows the last edited images and the painted picture, unit labels are readable; every view's
    output also carries a static PNG."""
    t = shot_on_failure
    page, work = t.page, t.work
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
    t.lab.shut_down_kernels()
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    jl.accept_kernel_dialog(page)
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
    for label in labels:
        assert label["text"], label
        assert label["sw"] <= label["cw"] + 1 and label["sh"] <= label["ch"] + 1 and label["inside"], \
            f"label clipped: {label}"
        if label["disconnected"] and label["mark"] not in ("none", "normal"):
            assert label["position"] == "absolute", f"the disconnected mark sits in the label's text: {label}"
    assert any(label["disconnected"] for label in labels), labels  # what this checks: a view without its kernel
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


TEACHING_FIGURES = ("image_grid_figure(", "unit_histogram_figure(maps")  # sections 2 and 3


def test_teaching_figures(shot_on_failure, lab):
    """The teaching notebook's figure cells (activation maps, threshold histogram), run in the
    lab: each shows a picture, never "<Figure size ...>"; screenshots in both themes and widths."""
    page = shot_on_failure.page
    shutil.copy(os.path.join(jl.ROOT, "notebooks", "teaching.ipynb"), lab.work / "teaching.ipynb")
    jl.open_notebook(page, lab, "teaching.ipynb")
    cells = page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.map(c => c.model.sharedModel.source)")
    figures = [next(i for i, c in enumerate(cells) if marker in c) for marker in TEACHING_FIGURES]
    panel = page.evaluate("() => window.jupyterapp.shell.currentWidget.node.id")  # the tour's tab stays open
    # Run > Run All Above Selected Cell, once JupyterLab enables it for this notebook
    page.wait_for_function("""n => { const app = window.jupyterapp, nb = app.shell.currentWidget.content;
        nb.activeCellIndex = n;
        return app.commands.isEnabled('notebook:run-all-above') && nb.activeCellIndex === n; }""",
                           arg=max(figures) + 1, timeout=60_000, polling=500)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-above')")
    page.wait_for_function("ns => ns.every(n => window.jupyterapp.shell.currentWidget.content.widgets[n].model.executionCount"
                           " || window.jupyterapp.shell.currentWidget.content.widgets[n].node.querySelector('.jp-InputPrompt')"
                           ".textContent.includes('*'))", arg=figures, timeout=60_000, polling=500)  # queued or run
    try:
        page.wait_for_function("""ns => ns.every(n => { const c = window.jupyterapp.shell.currentWidget.content.widgets[n];
            return c.model.executionCount && c.node.querySelector('.jp-OutputArea-output img'); })
            || [...document.querySelectorAll('.jp-OutputArea-output')].some(e => e.textContent.includes('Traceback'))""",
                               arg=figures, timeout=1_200_000, polling=1000)
        problems = []
        for theme in ("light", "dark"):
            set_theme(page, LIGHT if theme == "light" else DARK)
            for width in (1600, 1100):
                page.set_viewport_size({"width": width, "height": 1100})
                page.wait_for_timeout(600)
                for k, n in enumerate(figures):
                    page.evaluate("n => window.jupyterapp.shell.currentWidget.content.widgets[n].node.scrollIntoView()", n)
                    out = page.locator(f"[id='{panel}'] .jp-Notebook .jp-Cell").nth(n).locator(".jp-OutputArea")
                    got = out.evaluate("""e => ({text: e.textContent, tb: e.textContent.includes('Traceback'),
                        images: [...e.querySelectorAll('img')].map(i => [i.naturalWidth, i.naturalHeight,
                            i.getBoundingClientRect().width, i.closest('.jp-OutputArea-output').clientWidth])})""")
                    what = f"{theme} {width}px teaching figure {k + 1} (cell {n})"
                    if got["tb"] or not got["images"] or "<Figure size" in got["text"]:
                        problems.append(f"{what}: no picture: {got['text'][-500:]}")
                    for nw, nh, w, room in got["images"]:
                        if not nw or w > room + 1:
                            problems.append(f"{what}: picture {nw}x{nh} shown {w}px wide in {room}px")
                    out.screenshot(path=os.path.join(ARTIFACTS, f"{theme}_{width}_teaching_{k + 1}.png"))
        assert not problems, "\n".join(problems)
    finally:
        set_theme(page, LIGHT)
        page.set_viewport_size({"width": 1500, "height": 1100})
        lab.shut_down_kernels()


def test_no_browser_errors(tour):
    benign = ("favicon", "Failed to load resource: the server responded with a status of 404")
    real = [e for e in tour.errors if not any(b in e for b in benign)]
    assert not real, "\n".join(real)
