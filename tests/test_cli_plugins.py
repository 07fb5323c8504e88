"""The command line reaches the user's own models (issue 19 item 1): entry-point plug-ins and import paths.

A tiny plug-in package, ``gdplug`` 0.1, is "installed" by writing it and its ``dist-info`` (METADATA
and entry_points.txt) into a temporary folder on ``sys.path`` (PYTHONPATH for subprocesses): no
network, no pip.  It declares a generator and a segmenter, and one broken generator whose module
fails to import.  ``mymod.py`` in a working directory is reached as ``--generator mymod:make_generator``.
Each goes through ``dissect``, ``ace``, ``layers`` and ``report``; ``dissect.json`` records how its
models load again, so ``ace --dissection`` and ``report`` need no ``--generator``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.cli import main
from gandissect_widgets.registry import GENERATORS, PluginError, import_object

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

MODELS = '''
import torch
from tiny import TinyGenerator, TinySegmenter


def make_generator(device="cpu", checkpoint=None):
    """TinyGenerator, with the weights in CHECKPOINT if given."""
    G = TinyGenerator()
    if checkpoint is not None:
        G.load_state_dict(torch.load(checkpoint, weights_only=True))
    return G.to(device)


class SoftSegmenter(TinySegmenter):
    """TinySegmenter with class probabilities (for optimize and artifacts)."""

    def probabilities(self, x):
        s = torch.einsum("nchw,kc->nkhw", x, self.w) + self.b.view(1, -1, 1, 1)
        return torch.cat([torch.zeros_like(s[:, :1]), s.softmax(1)], 1)


def make_segmenter(device="cpu"):
    return SoftSegmenter().to(device)


NOT_CALLABLE = 42
'''


def install_plugin(root):
    """gdplug 0.1 in ``root``: two plug-ins that work and one that cannot be imported."""
    pkg = root / "gdplug"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MODELS)
    (pkg / "broken.py").write_text("raise RuntimeError('this plug-in is broken on purpose')\n")
    info = root / "gdplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gdplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [gandissect_widgets.generators]
        tinygen = gdplug:make_generator
        badgen = gdplug.broken:make

        [gandissect_widgets.segmenters]
        tinyseg = gdplug:make_segmenter
        """))
    return root


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    root = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    for m in [m for m in sys.modules if m == "gdplug" or m.startswith("gdplug.")]:
        monkeypatch.delitem(sys.modules, m)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding mymod.py and weights for it, and a sys.path without it (as the
    `gandissect` console script has it), so that the registry itself must look there."""
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "mymod.py").write_text(MODELS)
    from tiny import TinyGenerator
    torch.save(TinyGenerator(seed=3).state_dict(), wd / "weights.pt")
    monkeypatch.chdir(wd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(wd), ".")])
    monkeypatch.delitem(sys.modules, "mymod", raising=False)
    return wd


RUN = ["--device", "cpu", "--quiet"]


def dissect_args(gen, seg, out, *extra):
    return ["dissect", "--generator", gen, "--segmenter", seg, "--layers", "layer2", "layer3", "--samples", "24",
            "--batch-size", "8", "--out", str(out), "--cache-dir", "none", *RUN, *extra]


ACE = ["--layer", "layer2", "--concept", "c1", "--top", "2", "--samples", "8", "--unit-samples", "4", "--ks", "1",
       "2", "--random-draws", "1", "--batch-size", "8"]


def check_report(res, capsys, *extra):
    """`gandissect report RES` draws the unit pictures (the models were found) and says its size."""
    capsys.readouterr()
    assert main(["report", str(res), *RUN, *extra]) == 0
    out = capsys.readouterr()
    page = (res / "report.html").read_text()
    assert "id='no-pictures'" not in page and "No pictures" not in out.err
    assert page.count("class='strip'") == 9  # 5 + 4 units: every one (fewer than the top 20)
    size = os.path.getsize(res / "report.html")
    assert re.fullmatch(rf"wrote {re.escape(str(res / 'report.html'))} \((\d+\.\d) KB; pictures of 9 of 9 units\)\n",
                        out.out)
    assert abs(float(re.search(r"\((\d+\.\d) KB", out.out).group(1)) - size / 1000) <= 0.05


# -- entry points ------------------------------------------------------------------------------------
def test_models_lists_plugins_with_their_package(plugin, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  tinygen +\[entry point tinygen = gdplug:make_generator of package gdplug 0\.1\]", out, re.M)
    assert re.search(r"^  badgen +\[entry point badgen = gdplug\.broken:make of package gdplug 0\.1\]", out, re.M)
    assert re.search(r"^  tinyseg +\[entry point tinyseg = gdplug:make_segmenter of package gdplug 0\.1\]", out, re.M)
    assert re.search(r"^  sceneworld +\[built in\]", out, re.M)
    assert "gdplug" not in sys.modules  # listed, not imported: plug-ins load when used


def test_entry_point_plugin_through_dissect_ace_layers_report(plugin, tmp_path, capsys):
    assert main(["layers", "--generator", "tinygen", *RUN[:2]]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["layer1", "layer2", "layer3",
                                                                                   "output"]
    res = tmp_path / "res"
    assert main(dissect_args("tinygen", "tinyseg", res)) == 0
    settings = json.loads((res / "dissect.json").read_text())["settings"]
    assert settings["generator"] == "tinygen"
    assert settings["models"]["generator"] == {"name": "tinygen", "from": "entry point", "package": "gdplug 0.1",
                                               "where": "entry point tinygen = gdplug:make_generator of package "
                                                        "gdplug 0.1", "checkpoint": None, "trust_pickle": False}
    assert settings["models"]["segmenter"]["name"] == "tinyseg"
    # ace given the dissection: its models are the dissection's, no --generator needed
    assert main(["ace", *ACE, *RUN, "--dissection", str(res), "--out", str(res / "ace")]) == 0
    doc = json.loads((res / "ace" / "ace.json").read_text())
    assert doc["generator"] == "tinygen" and doc["segmenter"] == "tinyseg" and doc["ace"]["layer"] == "layer2"
    check_report(res, capsys)


def test_every_causal_command_takes_the_models_of_the_dissection(plugin, tmp_path, capsys):
    """context, optimize and artifacts given --dissection load its (plug-in) models."""
    res = tmp_path / "res"
    assert main(dissect_args("tinygen", "tinyseg", res)) == 0
    torch.save(torch.rand(8, 3, 16, 16) * 2 - 1, tmp_path / "ref.pt")
    common = [*RUN, "--dissection", str(res), "--layer", "layer2", "--batch-size", "8"]
    for cmd, extra in (("context", ["--concept", "c1", "--top", "1", "--samples", "2", "--locations", "2"]),
                       ("optimize", ["--concept", "c1", "--train", "4", "--test", "4", "--steps", "2"]),
                       ("artifacts", ["--samples", "8", "--top-samples", "4", "--eval-samples", "4", "--ks", "1",
                                      "--reference", str(tmp_path / "ref.pt"), "--reference-samples", "8"])):
        assert main([cmd, *common, *extra, "--out", str(tmp_path / cmd)]) == 0, capsys.readouterr().err
        doc = json.loads((tmp_path / cmd / f"{cmd}.json").read_text())
        assert doc["generator"] == "tinygen" and doc["segmenter"] == "tinyseg" and doc["layer"] == "layer2"


def test_a_broken_plugin_is_named_in_one_line_and_breaks_no_other(plugin, tmp_path, capsys):
    assert main(["layers", "--generator", "badgen", *RUN[:2]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gandissect: error: generator 'badgen' of plug-in package gdplug 0.1 "
                          "(gandissect_widgets.generators: badgen = gdplug.broken:make) cannot be loaded: "
                          "RuntimeError: this plug-in is broken on purpose; fix or uninstall that package")
    assert main(["layers", "--generator", "tinygen", *RUN[:2]]) == 0
    assert main(["models"]) == 0 and "badgen" in capsys.readouterr().out
    with pytest.raises(PluginError, match="badgen"):  # the Python API says the same
        gw.load_generator("badgen")
    assert gw.load_segmenter("tinyseg").labels[1] == "c1"


def test_a_registration_wins_over_a_plugin_of_the_same_name(plugin, capsys):
    GENERATORS.register("tinygen", lambda device="cpu": None, "mine", overwrite=True)
    try:
        assert GENERATORS.origin("tinygen")["from"] == "registered"
        assert main(["models"]) == 0
        out = capsys.readouterr().out
        assert "(not used) entry point tinygen = gdplug:make_generator of package gdplug 0.1: the name 'tinygen' " \
               "is taken" in out
    finally:
        GENERATORS.unregister("tinygen")


# -- import paths ------------------------------------------------------------------------------------
def test_import_path_through_dissect_ace_layers_report(workdir, tmp_path, capsys):
    gen = ["--generator", "mymod:make_generator", "--checkpoint", "weights.pt"]
    assert main(["layers", *gen, *RUN[:2]]) == 0
    assert capsys.readouterr().out.split()[:2] == ["layer1", "(6,"]
    res = tmp_path / "res"
    assert main(dissect_args("mymod:make_generator", "mymod:make_segmenter", res, "--checkpoint", "weights.pt")) == 0
    rec = json.loads((res / "dissect.json").read_text())["settings"]["models"]
    assert rec["generator"]["from"] == "import path" and rec["generator"]["name"] == "mymod:make_generator"
    assert rec["generator"]["checkpoint"] == str(workdir / "weights.pt")
    from tiny import TinyGenerator
    from gandissect_widgets.engine.protocols import fingerprint
    d = gw.Dissection.load(res)
    assert d.settings["generator_fingerprint"] == fingerprint(TinyGenerator(seed=3))  # the checkpoint was used
    # ace and the report find the models and the checkpoint from the record
    assert main(["ace", *ACE, *RUN, "--dissection", str(res), "--out", str(res / "ace")]) == 0
    assert json.loads((res / "ace" / "ace.json").read_text())["generator"] == "mymod:make_generator"
    check_report(res, capsys)
    assert "is not the dissected one" not in (res / "report.html").read_text()  # same weights: the recorded ones


def test_report_advice_is_not_a_dead_end(workdir, tmp_path, monkeypatch, capsys):
    """Run elsewhere, the recorded import path cannot be imported: the report says so and what to give; the
    advice (an import path from the folder that holds it) then works."""
    res = tmp_path / "res"
    assert main(dissect_args("mymod:make_generator", "mymod:make_segmenter", res)) == 0
    monkeypatch.delitem(sys.modules, "mymod")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["report", str(res), *RUN]) == 0
    err = capsys.readouterr().err
    assert "No pictures: could not load generator 'mymod:make_generator'" in err
    assert f"no module named 'mymod' in the current directory ({elsewhere})" in err
    assert "an import path package.module:factory" in err and "--generator NAME" not in err
    monkeypatch.syspath_prepend(str(workdir))  # e.g. PYTHONPATH=the folder of mymod.py
    check_report(res, capsys, "--generator", "mymod:make_generator", "--segmenter", "mymod:make_segmenter")


@pytest.mark.parametrize("spec, words", [
    ("nomod:make_generator", ["no module named 'nomod' in the current directory", "check its name"]),
    ("mymod:nothing", ["mymod has no attribute 'nothing'", "callables in it: ", "make_generator", "make_segmenter"]),
    ("mymod:NOT_CALLABLE", ["'mymod:NOT_CALLABLE' is a int, not callable", "function or class"]),
    ("mymod:make generator", ["is not an import path", "package.module:factory"]),
    ("mymod:", ["is not an import path"]),
    ("importsbad:make", ["importing importsbad failed: ModuleNotFoundError: No module named 'nosuchdep'"]),
])
def test_import_path_errors_are_one_line(workdir, spec, words, capsys):
    (workdir / "importsbad.py").write_text("import nosuchdep\n")
    assert main(["layers", "--generator", spec, *RUN[:2]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gandissect: error: generator {spec!r}") and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_import_object_never_evaluates_text(workdir):
    with pytest.raises(PluginError, match="not an import path"):
        import_object("os:system('echo hi')")
    with pytest.raises(PluginError, match="not an import path"):
        import_object("__import__('os').system:x")
    assert import_object("mymod:make_segmenter")().labels[0] == "-"
    assert "" not in sys.path and str(workdir) not in sys.path  # the current directory was put there only to import


def test_unknown_name_says_what_there_is(plugin, capsys):
    assert main(["layers", "--generator", "nosuch", *RUN[:2]]) == 2
    err = capsys.readouterr().err
    assert "unknown generator 'nosuch'; registered generators: " in err and "planted" in err
    assert "plug-ins: badgen, tinygen" in err and "package.module:factory" in err


# -- the installed command, in a fresh process ---------------------------------------------------------
def test_console_script_with_a_plugin_and_an_import_path(tmp_path):
    """`gandissect` (the console script: its sys.path lacks the current directory) reaches a plug-in
    on PYTHONPATH and mymod.py in the current directory."""
    site = install_plugin(tmp_path / "site")
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "mymod.py").write_text(MODELS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), TESTS]))
    script = [sys.executable, "-c", "import sys; from gandissect_widgets.cli import main; sys.path.remove(''); "
                                    "sys.exit(main())"]
    for gen, seg in (("tinygen", "tinyseg"), ("mymod:make_generator", "mymod:make_segmenter")):
        res = tmp_path / f"res-{gen.split(':')[0]}"
        p = subprocess.run([*script, *dissect_args(gen, seg, res)], cwd=wd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        assert gw.Dissection.load(res).settings["models"]["generator"]["name"] == gen
    p = subprocess.run([*script, "report", str(tmp_path / "res-mymod"), *RUN], cwd=wd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "pictures of 9 of 9 units" in p.stdout, p.stderr


def test_code_inside_a_result_is_not_imported_on_its_word(workdir, tmp_path, monkeypatch, capsys):
    """A result directory that brings its own module and names it in dissect.json (a downloaded result, say):
    the report and ace refuse to import it unless the user names it; nothing of it runs."""
    res = tmp_path / "res"
    assert main(dissect_args("mymod:make_generator", "mymod:make_segmenter", res)) == 0
    monkeypatch.delitem(sys.modules, "mymod")
    (res / "mymod.py").write_text("import pathlib; pathlib.Path('RAN').write_text('x')\n" + MODELS)
    monkeypatch.chdir(res)
    (workdir / "mymod.py").unlink()
    capsys.readouterr()
    for argv in (["report", str(res), *RUN], ["ace", *ACE, *RUN, "--dissection", str(res), "--out", "ace"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "whose module mymod lies inside that result directory" in err
        assert "if you trust it, name it yourself (--generator mymod:make_generator)" in err
    assert main(["report", str(res), "--no-pictures", *RUN]) == 0  # nothing to load, nothing refused
    from gandissect_widgets.report.html import build_report  # the Python API: a report without pictures
    page = open(build_report(res, device="cpu")).read()
    assert "id='no-pictures'" in page and "lies inside that result directory" in page
    assert not (res / "RAN").exists() and "mymod" not in sys.modules


def test_the_python_api_takes_the_same_names(plugin, workdir):
    """load_generator/load_segmenter resolve plug-ins and import paths through the same registry."""
    from tiny import TinyGenerator
    G = gw.load_generator("mymod:make_generator", checkpoint="weights.pt")
    assert torch.equal(G.layer1.lin.weight, TinyGenerator(seed=3).layer1.lin.weight)
    assert isinstance(gw.load_generator("tinygen"), TinyGenerator)
    assert gw.list_generators()["tinygen"] == "entry point tinygen = gdplug:make_generator of package gdplug 0.1"
    assert GENERATORS.origin("mymod:make_generator") == {"name": "mymod:make_generator", "from": "import path",
                                                          "where": "import path mymod:make_generator"}
    with pytest.raises(TypeError, match=r"does not take option\(s\) \['truncation'\]"):
        gw.load_generator("mymod:make_generator", truncation=0.5)
