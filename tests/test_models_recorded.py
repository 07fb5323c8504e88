"""A result says how to load its models again, and a Session opens it from its directory alone (issue 19).

Models the registry makes (``load_generator``, ``load_segmenter``, ``load_model``: registered names,
plug-ins, import paths) carry their recipe; ``registry.recorded_models(G, S)`` gives it in the structure
the command line writes into ``settings["models"]``.  ``Session.open(result_dir)`` loads those models
through the registry (refusing code that lies inside the result, trust never taken from it), checks
the recorded fingerprints, and every widget can be made from the session.  The plug-in package and
``mymod.py`` are the fixtures of tests/test_cli_plugins.py.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.cli import main
from gandissect_widgets.engine.protocols import fingerprint
from gandissect_widgets.engine.session import ResultModelsError, Session
from gandissect_widgets.models import adapt_generator
from gandissect_widgets.registry import GENERATORS, load_model, recorded_models
from gandissect_widgets.widgets import AblationPanel, UnitBrowser
from test_cli_plugins import MODELS, RUN, dissect_args, plugin, workdir  # noqa: F401 (fixtures)
from tiny import TinyGenerator


def settings_of(res):
    return json.loads((res / "dissect.json").read_text())["settings"]


def draws_a_picture(session):
    """A unit browser over ``session`` draws its cards (PNG bytes): the models work with the result."""
    b = UnitBrowser(session, per_page=2)
    assert b.wait() and b.last_error is None
    cards = b.visible_cards()
    assert len(cards) == 2 and all(bytes(c.children[0].value)[:4] == b"\x89PNG" for c in cards)
    return b


# -- the recipe --------------------------------------------------------------------------------------
def test_recorded_models_is_what_the_command_line_records(workdir, plugin, tmp_path):
    for gen, seg, extra in (("mymod:make_generator", "mymod:make_segmenter", ["--checkpoint", "weights.pt"]),
                            ("tinygen", "tinyseg", [])):
        res = tmp_path / gen.split(":")[0]
        assert main(dissect_args(gen, seg, res, *extra)) == 0
        ckpt = "weights.pt" if extra else None
        G, S = load_model("generator", gen, "cpu", ckpt), load_model("segmenter", seg, "cpu")
        assert recorded_models(G, S) == settings_of(res)["models"]
    G = gw.load_generator("mymod:make_generator", checkpoint="weights.pt")
    assert recorded_models(G, None)["generator"]["checkpoint"] == str(workdir / "weights.pt")  # kept absolute
    assert recorded_models(gw.load_generator("sceneworld"), gw.load_segmenter("sceneworld")) == {
        kind: {"name": "sceneworld", "from": "registered", "where": "built in", "checkpoint": None,
               "trust_pickle": False} for kind in ("generator", "segmenter")}


def test_models_not_made_by_the_registry_are_not_recorded(workdir):
    S = gw.load_segmenter("mymod:make_segmenter")
    assert recorded_models(TinyGenerator(), object()) is None
    with pytest.raises(TypeError):
        recorded_models(S)  # both models, always (models_in_settings reads a result's record)
    wrapped = adapt_generator(torch.nn.Sequential(*gw.load_generator("mymod:make_generator")), zdim=8)
    assert list(recorded_models(wrapped, S)) == ["segmenter"]  # only the one it can load again
    shared = TinyGenerator()  # a factory that returns the same object with an option no record holds
    GENERATORS.register("shared", lambda device="cpu", width=1: shared)
    try:
        assert recorded_models(gw.load_generator("shared"), None)["generator"]["name"] == "shared"
        assert recorded_models(gw.load_generator("shared", width=2), None) is None  # not the old recipe
    finally:
        GENERATORS.unregister("shared")


def test_a_python_dissection_with_its_record_opens_in_a_session(workdir, tmp_path):
    """``dissect`` records its registry-made models (``recorded_models(G, S)``): a result that opens alone."""
    G = gw.load_generator("mymod:make_generator", checkpoint="weights.pt")
    S = gw.load_segmenter("mymod:make_segmenter")
    d = gw.dissect(G, S, ["layer2"], n_samples=24, batch_size=8, progress=False, device="cpu")
    assert d.settings["models"] == recorded_models(G, S) and d.settings["models"]["generator"]["checkpoint"]
    d.save(tmp_path / "res")
    s = Session.open(tmp_path / "res", device="cpu", samples=range(4))
    assert s.generator is not G and torch.equal(s.generator.layer1.lin.weight, TinyGenerator(seed=3).layer1.lin.weight)
    assert s.result_dir == str(tmp_path / "res") and s.layer == "layer2"
    draws_a_picture(s)


# -- Session.open on results of the command line -----------------------------------------------------
def test_a_command_line_result_with_an_import_path_opens_and_every_widget_works(workdir, tmp_path):
    res = tmp_path / "res"
    assert main(dissect_args("mymod:make_generator", "mymod:make_segmenter", res, "--checkpoint", "weights.pt")) == 0
    s = Session.open(res, device="cpu", samples=range(4))
    assert fingerprint(s.generator) == gw.Dissection.load(res).settings["generator_fingerprint"]
    draws_a_picture(s)
    panel = AblationPanel(s)
    assert panel.wait() and panel.last_error is None
    from gandissect_widgets.widgets import dashboard
    assert len(dashboard(s).children) == 5  # every view takes the session


def test_a_command_line_result_of_the_default_world_opens(tmp_path):
    res = tmp_path / "world"
    assert main(["dissect", "--layers", "layer4", "--samples", "16", "--batch-size", "8", "--out", str(res),
                 "--cache-dir", "none", *RUN]) == 0
    s = Session.open(res, device="cpu", samples=range(2))
    assert recorded_models(s.generator, s.segmenter) == settings_of(res)["models"]
    draws_a_picture(s)


# -- the one-line errors -----------------------------------------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_other_weights_are_named_with_what_to_pass(workdir, tmp_path):
    res = tmp_path / "res"
    assert main(dissect_args("mymod:make_generator", "mymod:make_segmenter", res, "--checkpoint", "weights.pt")) == 0
    torch.save(TinyGenerator(seed=5).state_dict(), workdir / "weights.pt")  # the recorded file, retrained
    with pytest.raises(ResultModelsError) as e:
        Session.open(res, device="cpu")
    text = one_line(e)
    assert text.startswith(f"generator 'mymod:make_generator' (import path mymod:make_generator) with checkpoint "
                           f"{workdir / 'weights.pt'} is not the generator the result in {res} was made with: its "
                           f"fingerprint is ")
    assert "pass generator= to Session.open" in text and "verify=False" in text
    assert Session.open(res, device="cpu", verify=False).dissection.layers == ["layer2", "layer3"]


def test_a_missing_plugin_is_named_with_its_package(plugin, tmp_path, monkeypatch):
    res = tmp_path / "res"
    assert main(dissect_args("tinygen", "tinyseg", res)) == 0
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin)])  # the package uninstalled
    for m in [m for m in sys.modules if m == "gdplug" or m.startswith("gdplug.")]:
        monkeypatch.delitem(sys.modules, m)
    with pytest.raises(ResultModelsError) as e:
        Session.open(res, device="cpu")
    text = one_line(e)
    assert text.startswith(f"cannot load the generator of the result in {res}: generator 'tinygen' (entry point "
                           f"tinygen = gdplug:make_generator of package gdplug 0.1): unknown generator 'tinygen'")
    assert text.endswith("pass generator= to Session.open (a model, a name or an import path package.module:factory; "
                         "checkpoint= for its weights)")
    with pytest.raises(ResultModelsError, match="^cannot load the segmenter .* segmenter 'tinyseg' .*pass segmenter="):
        Session.open(res, generator=TinyGenerator(), device="cpu")  # given: the generator is no longer asked for


def test_code_inside_a_result_is_not_imported_and_trust_is_never_the_results(workdir, tmp_path, monkeypatch):
    res = tmp_path / "res"
    (workdir / "trusting.py").write_text(
        "CALLS = []\n\n"
        "def make(device='cpu', checkpoint=None, trust_pickle=False):\n"
        "    from tiny import TinyGenerator\n"
        "    CALLS.append(trust_pickle)\n"
        "    return TinyGenerator().to(device)\n")
    G = gw.load_generator("trusting:make", trust_pickle=True)
    S = gw.load_segmenter("mymod:make_segmenter")
    assert recorded_models(G, S)["generator"]["trust_pickle"] is True  # recorded as it was
    d = gw.dissect(G, S, ["layer2"], n_samples=16, batch_size=8, progress=False, device="cpu")
    assert d.settings["models"] == recorded_models(G, S)
    d.save(res)
    calls = sys.modules["trusting"].CALLS
    Session.open(res, device="cpu")
    assert calls == [True, False]  # not on the result's word
    Session.open(res, device="cpu", trust_pickle=True)
    assert calls[-1] is True  # on the user's
    # the result brings its own module and names it: refused before anything of it runs
    monkeypatch.delitem(sys.modules, "mymod")
    (res / "mymod.py").write_text("import pathlib; pathlib.Path('RAN').write_text('x')\n" + MODELS)
    (workdir / "mymod.py").unlink()
    monkeypatch.chdir(res)
    with pytest.raises(ResultModelsError) as e:
        Session.open(res, generator=G, device="cpu")
    text = one_line(e)
    assert "names the segmenter 'mymod:make_segmenter', whose module mymod lies inside that result directory" in text
    assert text.endswith("if you trust it, name it yourself (segmenter='mymod:make_segmenter')")
    assert not (res / "RAN").exists() and "mymod" not in sys.modules
