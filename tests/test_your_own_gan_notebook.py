"""notebooks/your_own_gan.ipynb: a tutorial DCGAN and a user's segmenter, from dissection to the widgets.

Run top to bottom with nbclient; checked for what a user sees: the samples and segmentations as
pictures, the dissection, the ceiling warning naming sky, the table of ceilings and baselines, each
top unit's IoU beside its baseline, every unit against its baseline, an ACE with its interval and
the unit browser, the result saved and opened again.  The weights it loads are checked against their
record (script, seed, data, time, quality; under 1 MB).  Run All in JupyterLab (Chromium, where it is
installed) checks that nothing is clipped at 1100 px in either theme and the browser's cards are drawn."""
import json
import os
import re

import pytest
import torch

import lab as jl  # the JupyterLab launcher of the browser tests
from gandissect_widgets.world.train_dcgan import build_dcgan
from test_notebooks import ROOT, run_notebook

WEIGHTS = os.path.join(ROOT, "gandissect_widgets", "world", "weights")


def outputs(nb, i, kind=None):
    return [o for o in nb.cells[i].outputs if kind is None or o.output_type == kind]


def text(nb, i):
    return "".join(o.text for o in outputs(nb, i, "stream"))


def cell(nb, start):
    """Index of the code cell whose source starts with ``start``."""
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(start))


def test_shipped_weights_fit_the_tutorial_model_and_say_how_they_were_made():
    state = torch.load(os.path.join(WEIGHTS, "dcgan32.pt"), weights_only=True)
    build_dcgan().load_state_dict({k: v.float() for k, v in state.items()})  # strict: the same architecture
    assert os.path.getsize(os.path.join(WEIGHTS, "dcgan32.pt")) < 1 << 20
    record = json.load(open(os.path.join(WEIGHTS, "dcgan32.json")))
    assert record["command"].startswith("python -m gandissect_widgets.world.train_dcgan")
    assert {"seed", "data", "steps", "training_seconds", "machine", "quality"} <= set(record)
    assert record["quality"]["frechet_segmenter_features"] > 0


def test_your_own_gan_notebook_runs_and_shows_each_step(tmp_path):
    nb = run_notebook(os.path.join(ROOT, "notebooks", "your_own_gan.ipynb"), tmp_path, timeout=300)
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 5  # samples, segmentations, where concepts are, units against baselines, the browser
    scatter = outputs(nb, cell(nb, "from gandissect_widgets.report.figures import PngFigure"), "execute_result")
    assert "image/png" in scatter[0]["data"] and len(scatter[0]["data"]["image/png"]) > 5000
    layers = text(nb, cell(nb, "G = adapt_generator"))
    assert "5: ReLU," in layers and "8: ReLU," in layers and max(map(len, layers.splitlines())) <= 72
    result = outputs(nb, cell(nb, "d = gw.dissect"), "execute_result")[0]["data"]["text/plain"]
    assert re.match(r"<Dissection of dcgan32 vs SceneParts; 5: \d+/64 interpretable, 8: \d+/32 interpretable>", result)
    i = cell(nb, "print(d.ceiling_warning())")
    warning = text(nb, i)
    assert warning.startswith("at the top-1% threshold these concepts cannot reach the interpretability cut-off")
    assert re.search(r"sky 0\.0[0-3]\d", warning)
    table = outputs(nb, i, "display_data")[0]["data"]["text/html"]
    assert "<th>IoU ceiling</th><th>position-only baseline</th>" in table and table.count("<tr>") == 9
    units = text(nb, cell(nb, "ious, labels = d.unit_ious(layer)")).splitlines()
    assert len(units) == 10
    for line in units:
        assert re.match(r"unit +\d+ \w+ +IoU 0\.\d{3} \(position-only baseline 0\.\d{3}, ceiling [01]\.\d{3}\): "
                        r"(beats it|does not)$", line), line
    ace = text(nb, cell(nb, "from gandissect_widgets.engine.ace import measure_ace"))
    assert re.match(r"\w+ units \[\d+, \d+, \d+, \d+\] of layer 8:\nACE [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\], "
                    r"removal ratio -?\d+\.\d\d", ace), ace
    view = outputs(nb, cell(nb, "from gandissect_widgets.widgets import UnitBrowser"), "execute_result")[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in view and "image/png" in view
    reopened = text(nb, cell(nb, "import tempfile"))
    assert re.match(r"reopened \S+dcgan32\nlayers \['5', '8'\], 8 concepts; the models match its fingerprints$", reopened)


# What the walk in JupyterLab checks, per cell output: nothing beyond the output area's right edge (code
# and text clipped or scrolling), every picture loaded, and the unit browser's cards there with pictures.
OUTPUTS_FIT = r"""() => {
    const problems = [];
    const cells = window.jupyterapp.shell.currentWidget.content.widgets;
    cells.forEach((c, n) => {
        const scroller = c.node.querySelector('.cm-scroller');
        if (scroller && scroller.scrollWidth > scroller.clientWidth + 1)
            problems.push(`cell ${n}: code ${scroller.scrollWidth}px wide in ${scroller.clientWidth}px`);
        for (const o of c.node.querySelectorAll('.jp-OutputArea-output')) {
            if (o.scrollWidth > o.clientWidth + 1) problems.push(`cell ${n}: output ${o.scrollWidth}px in ${o.clientWidth}px`);
            for (const i of o.querySelectorAll('img'))
                if (i.getAttribute('src') && !(i.complete && i.naturalWidth)) problems.push(`cell ${n}: a picture not loaded`);
        }
    });
    const cards = [...document.querySelectorAll('.gandissect-view .gd-unit-card')].filter(e => e.checkVisibility());
    const drawn = cards.filter(e => { const i = e.querySelector('img'); return i && i.naturalWidth > 0; });
    return {problems, cards: cards.length, drawn: drawn.length};
}"""


def test_your_own_gan_notebook_in_jupyterlab(tmp_path):
    """Run All in JupyterLab (Chromium), 1100 px wide, light and dark theme: no code line or output clipped
    or scrolling sideways, every picture loaded, the unit browser's 8 cards drawn beside a unit's detail.
    Screenshots of the browser's cell: test-artifacts/{theme}_1100_your_own_gan_browser.png."""
    if jl.missing():
        pytest.skip(jl.missing())
    artifacts = os.path.join(ROOT, "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    errors = []
    with jl.jupyterlab(tmp_path, [os.path.join(ROOT, "notebooks", "your_own_gan.ipynb")]) as lab, \
            jl.chromium(1100, 1100, errors) as page:
        jl.open_notebook(page, lab, "your_own_gan.ipynb")
        jl.run_all(page)
        jl.wait_or_traceback(page, ".gandissect-view", 300_000)
        jl.wait_views_shown(page, 1, 300_000)
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.every("
                               "c => c.model.type !== 'code' || c.model.executionCount)", timeout=300_000)
        problems = []
        for theme in (jl.LIGHT, jl.DARK):
            jl.set_theme(page, theme)
            page.set_viewport_size({"width": 1100, "height": 1100})
            got = page.evaluate(OUTPUTS_FIT)
            problems += [f"{theme}: {p}" for p in got["problems"]]
            if got["cards"] != 8 or got["drawn"] != 8:
                problems.append(f"{theme}: {got['drawn']} of {got['cards']} unit cards drawn, 8 wanted")
            name = "light" if theme == jl.LIGHT else "dark"
            browser = page.locator(".jp-Cell", has=page.locator(".gandissect-view"))
            page.set_viewport_size({"width": 1100, "height": int(browser.bounding_box()["height"]) + 400})
            page.wait_for_timeout(400)
            browser.scroll_into_view_if_needed()
            browser.screenshot(path=os.path.join(artifacts, f"{name}_1100_your_own_gan_browser.png"))
    assert not problems, "\n".join(problems)
    real = [e for e in errors if "favicon" not in e and "status of 404" not in e]
    assert not real, "\n".join(real)
