"""The figure notebooks and the teaching notebook run top to bottom (nbclient) and write their figures.

They run on the default world, SceneWorld, as a user would (a few minutes in all on 2 cores);
``GANDISSECT_NOTEBOOK_GENERATOR=planted`` runs them on the planted world in seconds.  Each
notebook runs in its own empty directory; all share one dissection cache (a temporary
``$GANDISSECT_CACHE``), as the notebooks share ``~/.cache/gandissect-widgets/figures``.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

import gandissect_widgets as gw
from gandissect_widgets.teaching import QUESTIONS, check_answer, pick_unit, true_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
WORLD = os.environ.get("GANDISSECT_NOTEBOOK_GENERATOR", "sceneworld")
FIGURES = {  # notebook -> the figures it must write (PNG and PDF each)
    "01_unit_gallery.ipynb": ["01_unit_gallery"],
    "02_interpretable_units_per_layer.ipynb": ["02_interpretable_units_per_layer"],
    "03_removal_curves.ipynb": ["03_removal_curves", "03_ace_ranking"],
    "04_contextual_insertion.ipynb": ["04_contextual_insertion", "04_context_examples"],
    "05_artifact_removal.ipynb": ["05_artifact_scores", "05_artifact_removal"],
    "06_compare_models_or_layers.ipynb": ["06_compare", "06_samples"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    mp = pytest.MonkeyPatch()  # the kernels inherit the environment
    mp.setenv("GANDISSECT_NOTEBOOK_GENERATOR", WORLD)
    mp.setenv("GANDISSECT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield WORLD
    mp.undo()


def run_notebook(path, cwd, timeout=900):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path} is committed with outputs"
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return nb


def test_every_figure_notebook_is_tested():
    assert sorted(f for f in os.listdir(os.path.join(NOTEBOOKS, "figures")) if f.endswith(".ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_notebook(name, world, tmp_path):
    nb = run_notebook(os.path.join(NOTEBOOKS, "figures", name), tmp_path)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    assert 'os.environ.get("GANDISSECT_NOTEBOOK_GENERATOR", "sceneworld")' in first
    for stem in FIGURES[name]:
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            path = tmp_path / "figures" / f"{stem}.{ext}"
            assert path.exists(), f"{name} did not write {path.name}"
            data = path.read_bytes()
            assert len(data) > 1000 and data.startswith(magic), f"{path.name} is not a {ext.upper()} file"


def test_teaching_notebook(world, tmp_path):
    nb = run_notebook(os.path.join(NOTEBOOKS, "teaching.ipynb"), tmp_path)
    views = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) >= 4  # browser, ranking, ablation, paint
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("No answer yet") == 6 and "Exercise 6." in text
    # the figure cells (activation maps, threshold histogram) show pictures, not "<Figure size ...>"
    for marker in ("image_grid_figure(", "unit_histogram_figure(maps"):
        cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
        pictures = [o for o in cell.outputs if o.get("data", {}).get("image/png")]
        assert pictures, f"the cell with {marker} shows no picture: {cell.outputs}"
        assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") and "image/png" not in o.get("data", {})
                       for o in cell.outputs)


# -- the exercise checker, on the planted world where the answers are known ---------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    G, S = gw.load_generator("planted"), gw.load_segmenter("planted")
    return gw.dissect(G, S, ["layer1", "layer2"], n_samples=200, seed=1, progress=False,
                      cache_dir=tmp_path_factory.mktemp("planted-cache"))


def test_check_answer(planted, capsys):
    d = planted
    assert true_answer("unit_concept", d, layer="layer1", unit=2) == "blue"
    assert check_answer("unit_concept", "Blue", d, layer="layer1", unit=2) is True
    assert "Right" in capsys.readouterr().out
    assert check_answer("unit_concept", "red", d, layer="layer1", unit=2) is False
    assert "Hint" in capsys.readouterr().out
    assert check_answer("unit_concept", None, d, layer="layer1", unit=2) is None
    assert "No answer yet" in capsys.readouterr().out
    assert check_answer("is_interpretable", True, d, layer="layer1", unit=3) is True
    assert check_answer("is_interpretable", "no", d, layer="layer1", unit=9) is True
    assert check_answer("is_interpretable", 1, d, layer="layer1", unit=3) is False  # a bool is asked for
    assert check_answer("interpretable_count", 4, d, layer="layer1") is True
    assert check_answer("interpretable_count", 4.5, d, layer="layer1") is False
    assert check_answer("best_unit", 1, d, layer="layer1", concept="green") is True
    assert set(true_answer("best_layer", d, concept="red")) == {"layer1", "layer2"}  # a tie: either is right
    assert check_answer("best_layer", "layer2", d, concept="red") is True
    assert check_answer("top_fraction", "1%", d) is True and check_answer("top_fraction", 0.01, d) is True
    assert check_answer("top_fraction", 0.1, d) is False
    assert pick_unit(d, "layer1", seed=0) in range(4)  # only the four concept units are interpretable
    assert pick_unit(d, "layer1", seed=0) == pick_unit(d, "layer1", seed=0)
    with pytest.raises(ValueError, match="needs unit"):
        true_answer("unit_concept", d, layer="layer1")
    with pytest.raises(ValueError, match="unknown question"):
        check_answer("favourite_unit", 3, d)
    with pytest.raises(ValueError, match="out of range"):
        true_answer("unit_concept", d, layer="layer1", unit=99)
    assert set(QUESTIONS) == {"unit_concept", "is_interpretable", "interpretable_count", "best_unit", "best_layer",
                              "top_fraction"}
