"""Bad input gets a clear error and leaves no partial files; cache and resume."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.cli import main
from tiny import TinyGenerator, TinySegmenter, files_under, run_dissect as run


class BadShapeSegmenter(TinySegmenter):
    def forward(self, x):
        return super().forward(x)[:1]


class OutOfRangeSegmenter(TinySegmenter):
    def forward(self, x):
        return super().forward(x) + 10


class FloatSegmenter(TinySegmenter):
    def forward(self, x):
        return super().forward(x).float()


class FlatGenerator(TinyGenerator):
    def forward(self, z):
        return super().forward(z).flatten(1)


@pytest.mark.parametrize("make,match", [
    (lambda: run(layers=["layer7"]), r"unknown layer 'layer7'.*known layers: layer1.*layer2"),
    (lambda: run(S=BadShapeSegmenter()), r"returned shape \(1, 16, 16\) for 8 images"),
    (lambda: run(S=OutOfRangeSegmenter()), r"label 1[0-4], outside 0\.\.4"),
    (lambda: run(S=FloatSegmenter()), r"integer labels"),
    (lambda: run(G=FlatGenerator()), r"float image batch \(N,3,H,W\)"),
    (lambda: run(n_samples=0), r"n_samples must be an integer >= 1"),
    (lambda: run(quantile=1.5), r"quantile must be in"),
    (lambda: run(bins=4096), r"bins must be an integer >= 16 and <= 1024"),
    (lambda: run(layers=[]), r"at least one layer"),
    (lambda: run(lanes=0), r"lanes must be an integer >= 1"),
    (lambda: run(layers=["layer2.conv"], n_samples=4), None),  # nested path is fine
])
def test_bad_input_clear_errors_no_files(tmp_path, make, match):
    os.chdir(tmp_path)
    if match is None:
        make()
        return
    with pytest.raises((ValueError, KeyError)) as e:
        make()
    import re
    assert re.search(match, str(e.value)), str(e.value)


def test_error_leaves_no_result(tmp_path):
    with pytest.raises(ValueError):
        run(S=OutOfRangeSegmenter(), cache_dir=tmp_path)
    assert not any(f.endswith("dissect.json") or f.endswith(".npz") for f in files_under(tmp_path))


def test_segmenter_without_labels():
    class NoLabels(nn.Module):
        def forward(self, x):
            return x[:, 0].long()
    with pytest.raises(ValueError, match="labels"):
        run(S=NoLabels())


def test_generator_without_sample_z():
    class NoZ(nn.Sequential):
        pass
    with pytest.raises(ValueError, match="sample_z"):
        run(G=NoZ(nn.Linear(2, 2)))


class CountingGenerator(TinyGenerator):
    calls = 0

    def forward(self, z):
        CountingGenerator.calls += 1
        return super().forward(z)


class FlakySegmenter(TinySegmenter):
    """Raises on its ``fail_at``-th call (an interruption from inside the run)."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return super().forward(x)


def assert_same(d1, d2):
    assert d1.layers == d2.layers
    for l in d1.layers:
        for k in ("iou", "thresholds", "topk_indices", "intersection", "mask_pixels", "mean", "std"):
            np.testing.assert_allclose(d1.array(l, k), d2.array(l, k), rtol=1e-6, atol=1e-9, err_msg=k)


def test_cache_hit_and_key(tmp_path):
    kw = dict(layers=["layer1", "layer3"], n_samples=48, cache_dir=tmp_path)
    d1 = run(G=CountingGenerator(), **kw)
    CountingGenerator.calls = 0
    d2 = run(G=CountingGenerator(), **kw)
    assert CountingGenerator.calls == 0  # loaded from the cache, nothing recomputed
    assert_same(d1, d2)
    d3 = run(G=CountingGenerator(), **dict(kw, seed=5))  # a changed argument recomputes
    assert CountingGenerator.calls > 5
    assert not np.allclose(d3.iou("layer1"), d1.iou("layer1"))
    assert len([p for p in os.listdir(tmp_path) if p.startswith("dissect-")]) == 2
    G2 = CountingGenerator()
    with torch.no_grad():
        G2.layer1.lin.bias += 1  # changed weights: a different key
    run(G=G2, **kw)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("dissect-")]) == 3


def test_interrupted_run_resumes_to_same_result(tmp_path):
    kw = dict(layers=["layer1", "layer2"], n_samples=80, batch_size=8, pilot_samples=16, checkpoint_every=0)
    clean = run(S=FlakySegmenter(), **kw)
    flaky = FlakySegmenter(fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        run(S=flaky, cache_dir=tmp_path, **kw)
    work = [p for p in files_under(tmp_path) if p.endswith("checkpoint.pt")]
    assert work, files_under(tmp_path)
    assert not [p for p in files_under(tmp_path) if p.endswith("dissect.json")]
    resumed_seg = FlakySegmenter()
    resumed = run(S=resumed_seg, cache_dir=tmp_path, **kw)
    # 80 samples / 8 = 10 batches, 5 segmented before the failure: the rest only are segmented now
    assert resumed_seg.calls == 5
    assert_same(clean, resumed)
    assert not [p for p in files_under(tmp_path) if "work" in p]


def test_save_load_roundtrip_and_tamper(tmp_path):
    d = run(layers=["layer1", "layer2"])
    d.save(tmp_path / "out")
    e = gw.Dissection.load(tmp_path / "out")
    assert_same(d, e)
    assert e.labels == d.labels and e.settings["n_samples"] == 40
    arrays_file = json.load(open(tmp_path / "out" / "dissect.json"))["arrays"]["file"]
    with open(tmp_path / "out" / arrays_file, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="does not match"):
        gw.Dissection.load(tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        gw.Dissection.load(tmp_path / "nothing")


def test_cli_dissect_and_layers(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1", "layer2",
               "--samples", "200", "--seed", "2", "--out", str(out), "--device", "cpu", "--batch-size", "50",
               "--quiet"])
    assert rc == 0
    doc = json.load(open(out / "dissect.json"))
    assert [l["layer"] for l in doc["layers"]] == ["layer1", "layer2"]
    units = doc["layers"][0]["units"]
    assert set(units[0]) == {"unit", "label", "iou", "threshold", "interpretable", "position_baseline"}
    assert units[0]["label"] == "red" and units[0]["interpretable"] and units[0]["iou"] > 0.9
    # the planted concepts sit in a random cell: no fixed mask comes near the unit (engine.baselines)
    assert 0 <= units[0]["position_baseline"] < 0.1
    assert doc["layers"][0]["top_units"]["green"][0]["unit"] == 1
    assert (out / doc["arrays"]["file"]).exists()
    d = gw.Dissection.load(out)
    assert d.unit_labels("layer1")[:4] == ["red", "green", "blue", "yellow"]
    capsys.readouterr()
    assert main(["layers", "--generator", "planted", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "layer1" in text and "(16, 10, 10)" in text and "(3, 40, 40)" in text


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "nope",
               "--samples", "10", "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown layer 'nope'" in err and "layer1" in err
    assert not (tmp_path / "o" / "dissect.json").exists()
    rc = main(["dissect", "--generator", "nosuch", "--layers", "x", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown generator 'nosuch'" in err and "planted" in err
    rc = main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1",
               "--samples", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "--samples must be an integer >= 1" in capsys.readouterr().err
    rc = main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1",
               "--samples", "10", "--lanes", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "lanes must be an integer >= 1" in capsys.readouterr().err


def test_registry_errors():
    with pytest.raises(TypeError, match="does not take option"):
        gw.load_generator("planted", colour="red")
    with pytest.raises(ValueError, match="already registered"):
        gw.register_generator("planted", lambda: None)


def test_cli_dissect_takes_the_rule_the_backend_and_the_convention(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1", "--samples", "100",
               "--out", str(out), "--device", "cpu", "--batch-size", "50", "--quiet", "--threshold", "iqr",
               "--method", "dense", "--upsample", "pnas"])
    assert rc == 0
    d = gw.Dissection.load(out)
    assert (d.settings["threshold"], d.settings["method"], d.settings["upsample"]) == ("iqr", "dense", "pnas")
    assert d.unit_labels("layer1")[:4] == ["red", "green", "blue", "yellow"]
    # the IQR rule's arrays are saved and loaded with the result
    assert [d.labels[c] for c in d.array("layer1", "iqr_concept")[:4]] == ["red", "green", "blue", "yellow"]
    capsys.readouterr()
    assert main(["dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1",
                 "--out", str(tmp_path / "x"), "--threshold", "median"]) == 2
    assert "invalid choice: 'median'" in capsys.readouterr().err
