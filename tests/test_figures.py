"""The report figures: shown as PNG in any kernel, one y range and one concept colour map when
dissections are compared, integer unit counts, labelled cut-offs, and colour bars that match the
engine's pictures.  Built from small synthetic dissections (no model, no dissection run)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from gandissect_widgets.engine import imaging
from gandissect_widgets.engine.artifacts import ArtifactResult
from gandissect_widgets.engine.context import ContextResult
from gandissect_widgets.engine.results import Dissection
from gandissect_widgets.report import figures as F

LABELS = ["-", "sky", "tree", "grass", "door", "wall"]
HERE = os.path.dirname(os.path.abspath(__file__))


def dissection(best, labels=LABELS):
    """A Dissection whose layers' units have the given (concept, IoU) best matches."""
    layers = {}
    for name, units in best.items():
        U, C = len(units), len(labels)
        iou = np.zeros((U, C))
        for u, (concept, value) in enumerate(units):
            iou[u, labels.index(concept)] = value
        z = np.zeros(U)
        layers[name] = dict(iou=iou, intersection=np.zeros((U, C), np.int64), mask_pixels=z.astype(np.int64),
                            concept_pixels=np.zeros(C, np.int64), n_pixels=np.int64(64),
                            thresholds=np.linspace(0.5, 1.5, U).astype(np.float32), fraction_above=z + 0.01,
                            topk_indices=np.tile(np.arange(3), (U, 1)), topk_values=np.ones((U, 3), np.float32),
                            mean=z, std=z + 1, min=z - 1, max=z + 2, shape=np.array([U, 4, 4]))
    return Dissection(labels, layers, {"seed": 1})


TRAINED = dissection({"layer1": [("sky", 0.3), ("tree", 0.2), ("tree", 0.1), ("door", 0.05), ("wall", 0.02)] * 4,
                      "layer2": [("grass", 0.25), ("sky", 0.15), ("wall", 0.08)] * 5})
UNTRAINED = dissection({"layer1": [("wall", 0.05), ("sky", 0.01)] * 4, "layer2": [("door", 0.06)] + [("sky", 0.0)] * 9})


def examples():
    """{public figure helper: a call making one figure}, for every helper in figures.__all__."""
    rng = np.random.default_rng(0)
    pics = rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    gallery = {u: (pics, rng.random((3, 4, 4)) > 0.5, rng.random((3, 4, 4))) for u in (0, 1)}
    ctx = ContextResult("layer1", "door", [0, 1], LABELS, np.array([0, 9, 7, 6, 0, 12]), rng.random(6) * 0.1,
                        rng.random(6) * 0.05, {})
    art = ArtifactResult("layer1", rng.random(8) + 1, rng.random(8), np.arange(8),
                         {"ks": [1, 2, 4], "fd_original": 3.0, "fd_top": [2.8, 2.5, 2.2], "fd_random": [3, 3, 2.9],
                          "fd_random_std": [0.1, 0.1, 0.2]})
    curve = {"ks": [1, 2, 4], "curves": {"iou": [0.2, 0.4, 0.7]}, "random_mean": [0.0, 0.05, 0.1],
             "random_std": [0.01, 0.02, 0.03], "random_draws": [0, 1], "concept": "tree", "layer": "layer1"}
    return {
        "removal_curve_figure": lambda: F.removal_curve_figure(curve),
        "ace_ranking_figure": lambda: F.ace_ranking_figure(rng.random(12), "tree", "layer1"),
        "alpha_figure": lambda: F.alpha_figure(rng.random(12), "tree", "layer1"),
        "context_figure": lambda: F.context_figure(ctx),
        "artifacts_figure": lambda: F.artifacts_figure(art),
        "interpretable_units_figure": lambda: F.interpretable_units_figure(TRAINED),
        "interpretable_units_figures": lambda: F.interpretable_units_figures([TRAINED, UNTRAINED])[1],
        "unit_iou_figure": lambda: F.unit_iou_figure(TRAINED, "layer1", 0),
        "unit_histogram_figure": lambda: F.unit_histogram_figure(rng.random(200), 0.9, 0),
        "ranking_figure": lambda: F.ranking_figure(rng.random(12), [3, 1, 0, 2], {1}, "tree", "iou"),
        "heatmap_colorbar_figure": lambda: F.heatmap_colorbar_figure(0.0, 2.5),
        "difference_colorbar_figure": lambda: F.difference_colorbar_figure(2.0),
        "image_grid_figure": lambda: F.image_grid_figure([pics, pics[:2]], ["a", "b"], ["1", "2", "3"], "grid"),
        "unit_gallery_figure": lambda: F.unit_gallery_figure(gallery, TRAINED, "layer1", [("sky", 0), ("tree", 1)]),
        "compare_dissections_figure": lambda: F.compare_dissections_figure({"trained": TRAINED, "untrained": UNTRAINED}),
        "context_table_figure": lambda: F.context_table_figure([ctx]),
    }


def test_examples_cover_every_helper_and_figures_are_white():
    import matplotlib
    assert sorted(examples()) == sorted(n for n in F.__all__ if n != "save_figure")
    with matplotlib.rc_context({"figure.facecolor": "black", "savefig.facecolor": "black"}):
        for name, make in examples().items():
            fig = make()
            assert isinstance(fig, F.PngFigure), name
            assert tuple(fig.get_facecolor()) == (1, 1, 1, 1), name
            from PIL import Image
            import io
            corner = Image.open(io.BytesIO(fig._repr_png_())).convert("RGB").getpixel((0, 0))
            assert corner == (255, 255, 255), name


SHOW = r"""
import base64
import sys
sys.path.insert(0, {here!r})
setup = {setup!r}
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
shell = InteractiveShell.instance()
shell.enable_gui = lambda gui=None: None  # as a kernel's shell: the inline backend needs no event loop
if setup == "pyplot":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
elif setup == "inline":
    shell.run_line_magic("matplotlib", "inline")
import test_figures
for name, make in test_figures.examples().items():
    fig = make()
    data, _ = shell.display_formatter.format(fig)
    png = data["image/png"]  # bytes from PngFigure, base64 text from the inline backend's formatter
    assert (png if isinstance(png, bytes) else base64.b64decode(png))[:4] == b"\x89PNG", name
    shell.user_ns["fig"] = fig
    with capture_output() as cap:  # shown once: not also as a pyplot figure when the cell ends
        shell.run_cell("display(fig)")
    assert [sorted(o.data) for o in cap.outputs] == [["image/png", "text/plain"]], (name, cap.outputs)
assert ("matplotlib.pyplot" in sys.modules) == (setup != "none")
if setup != "none":
    assert sys.modules["matplotlib.pyplot"].get_fignums() == []
print("ok")
"""


@pytest.mark.parametrize("setup", ["none", "pyplot", "inline"])
def test_every_figure_displays_as_png_in_ipython(setup):
    """IPython shows each figure as one PNG: without pyplot ever imported, with pyplot (Agg), and
    with the inline backend (whose own PNG formatter then draws it)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-c", SHOW.format(here=HERE, setup=setup)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_figures_show_once_as_png_in_a_jupyter_kernel(tmp_path):
    """In a real kernel (nbclient, as nbconvert runs it): a figure as the cell's value is one PNG
    result, before pyplot is imported and under the inline backend; display() shows it once."""
    import nbformat
    from nbclient import NotebookClient
    make = f"import sys; sys.path.insert(0, {HERE!r}); import test_figures; ex = test_figures.examples()\n"
    cells = [make + "fig = ex['interpretable_units_figure']()\nfig",
             "print('matplotlib.pyplot' in sys.modules)",
             "%matplotlib inline\nfig2 = ex['removal_curve_figure']()\nfig2",
             "display(fig)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [c.outputs for c in nb.cells]
    for i in (0, 2, 3):
        assert len(outs[i]) == 1 and outs[i][0]["data"]["image/png"], (i, outs[i])
    assert outs[1][0]["text"].strip() == "False"


def bar_colors(ax):
    """{concept: face colour} of a stacked-bar chart's bars."""
    return {c.get_label(): tuple(c.patches[0].get_facecolor()) for c in ax.containers if c.patches}


def test_compared_dissections_share_the_y_range_and_the_concept_colours():
    figs = F.interpretable_units_figures([TRAINED, UNTRAINED], min_iou=0.04)
    a, b = (f.axes[0] for f in figs)
    assert a.get_ylim() == b.get_ylim()
    tallest = max(sum(TRAINED.concept_counts(l, 0.04).values()) for l in TRAINED.layers)
    assert tallest <= a.get_ylim()[1] < tallest + 2
    ca, cb = bar_colors(a), bar_colors(b)
    assert ca["wall"] == cb["wall"] and ca["door"] == cb["door"]
    assert len(set(ca.values())) == len(ca)
    # colour by label position, whatever min IoU leaves, and the legend in label order
    strict = bar_colors(F.interpretable_units_figure(TRAINED, min_iou=0.12).axes[0])
    assert set(strict) == {"sky", "tree", "grass"} and all(strict[c] == ca[c] for c in strict)
    assert [t.get_text() for t in a.get_legend().get_texts()] == [c for c in LABELS if c in ca]
    assert [t.get_text() for t in b.get_legend().get_texts()] == ["door", "wall"]
    # and the same colours in the side-by-side comparison figure
    cmp_colors = bar_colors(F.compare_dissections_figure({"a": TRAINED, "b": UNTRAINED}).axes[0])
    assert all(cmp_colors[c] == ca[c] for c in cmp_colors)
    # integer ticks for unit counts
    for ax in (a, b):
        ticks = ax.get_yticks()
        assert np.allclose(ticks, np.round(ticks)) and len(ticks) >= 2


def test_ymax_and_colors_can_be_given():
    fig = F.interpretable_units_figure(UNTRAINED, ymax=30, colors=F._concept_colors(TRAINED))
    assert fig.axes[0].get_ylim() == (0, 30)
    empty = F.interpretable_units_figure(UNTRAINED, min_iou=0.5)  # nothing interpretable: no legend, no warning
    assert empty.axes[0].get_legend() is None and empty.axes[0].get_ylim()[1] >= 1


class _Session:
    """What LayerSummary needs of a Session, without a model."""

    def __init__(self, d):
        self.d = d

    def _need_dissection(self):
        return self.d

    def observe(self, *a, **k):
        pass


def test_layer_summary_draws_both_models_on_one_y_range():
    from gandissect_widgets.widgets.summary import LayerSummary
    w = LayerSummary(_Session(TRAINED), other=UNTRAINED, names=("trained", "untrained"))
    assert w.wait()
    assert w.left.value[:4] == b"\x89PNG" and w.right.value[:4] == b"\x89PNG"
    assert len(w.ylims) == 2 and w.ylims[0] == w.ylims[1]
    assert w.ylims == [f.axes[0].get_ylim() for f in F.interpretable_units_figures([TRAINED, UNTRAINED])]
    loose = w.ylims[0]
    w.min_iou.value = 0.12  # fewer units: a lower shared top
    assert w.wait()
    assert w.ylims[0] == w.ylims[1] and w.ylims[0][1] < loose[1]
    one = LayerSummary(_Session(TRAINED))
    assert one.wait() and len(one.ylims) == 1


def test_unit_iou_cut_off_is_labelled_and_ranking_legend_says_selected():
    ax = F.unit_iou_figure(TRAINED, "layer1", 0, min_iou=0.1).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["interpretable (IoU > 0.1)"]
    assert any(np.allclose(l.get_xdata(), 0.1) for l in ax.get_lines())
    ax = F.ranking_figure(np.arange(6.0), [5, 4, 3], {4}, "tree", "iou").axes[0]
    assert "selected" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [tuple(p.get_facecolor()) for p in ax.patches[:3]].count(ax.patches[1].get_facecolor()) == 1


def test_heatmap_colorbar_matches_the_heatmap_ramp():
    t = np.linspace(0, 1, 101)
    drawn = imaging.heatmap(t[None], 0.0, 1.0)[0].astype(int)
    bar = (np.asarray(F._heatmap_cmap()(t))[:, :3] * 255).round().astype(int)
    assert np.abs(drawn - bar).max() <= 3
    ax = F.heatmap_colorbar_figure(-1.5, 4.0, label="activation").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-1.5", "4"]
    assert ax.get_xlabel() == "activation"
    flat = F.heatmap_colorbar_figure(2.0, 2.0).axes[0]  # heatmap maps a flat range over 1
    assert [t.get_text() for t in flat.get_xticklabels()] == ["2", "3"]


def test_difference_colorbar_spans_what_difference_shows():
    ax = F.difference_colorbar_figure(2.0).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "127.5"]
    assert np.allclose(ax.get_xlim(), (0, 127.5))
    assert ax.get_xlabel() == "mean |difference| per channel (0-255)"
    a = np.zeros((1, 1, 1, 3), np.uint8)
    assert imaging.difference(a, a + 127, gain=2.0)[0, 0, 0, 0] == 254  # 127.5 would be white
    with pytest.raises(ValueError, match="gain"):
        F.difference_colorbar_figure(0)
