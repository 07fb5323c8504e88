"""Causal tools on the planted world, where the answer is known, and against brute force."""
import json
import os

import numpy as np
import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.cli import main
from gandissect_widgets.engine.ace import measure_ace, removal_curve, unit_ace
from gandissect_widgets.engine.artifacts import artifact_scores
from gandissect_widgets.engine.context import contextual_insertion
from gandissect_widgets.engine.frechet import feature_stats, frechet_distance
from gandissect_widgets.engine.interventions import InsertionValues, Intervention, render
from gandissect_widgets.engine.optimize import optimize_intervention
from tiny import TinyGenerator


@pytest.fixture(scope="module")
def planted():
    return gw.load_generator("planted"), gw.load_segmenter("planted")


def test_planted_set_causes_concept_random_set_does_not(planted):
    G, S = planted
    known = measure_ace(G, S, "layer1", [0], "red", n_samples=40, bootstrap=200)
    assert known.ace > 0.9 and known.removal_ratio == pytest.approx(1.0)
    assert known.ace_ci[0] > 0.9
    assert known.original.mean() == pytest.approx(0.01, abs=1e-6)  # one 4x4 cell of 40x40
    rnd = measure_ace(G, S, "layer1", [7, 9, 12], "red", n_samples=40, bootstrap=200)
    assert abs(rnd.ace) < 0.01 and abs(rnd.removal_ratio) < 0.01


def test_ablating_every_unit_removes_concept(planted):
    G, S = planted
    for concept in ("red", "blue"):
        res = measure_ace(G, S, "layer1", list(range(16)), concept, n_samples=24, bootstrap=50)
        assert res.removal_ratio == 1.0 and res.ablated.max() == 0


def test_unit_ace_ranks_planted_unit_and_agrees_with_measure_ace(planted):
    G, S = planted
    ua = unit_ace(G, S, "layer1", "blue", n_samples=16, seed=4, batch_size=8, progress=False)
    assert int(np.argmax(ua)) == 2
    for u in (2, 5):
        ref = measure_ace(G, S, "layer1", [u], "blue", n_samples=16, seed=4, bootstrap=10)
        assert ua[u] == pytest.approx(ref.ace, abs=1e-6)


def test_removal_curve(planted):
    G, S = planted
    curve = removal_curve(G, S, "layer1", "green", {"IoU": [1, 0, 2, 3] + list(range(4, 16))}, ks=(1, 2, 5, 16),
                          n_samples=16, random_draws=4, progress=False)
    assert curve["ks"] == [1, 2, 5, 16]
    assert curve["curves"]["IoU"] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert curve["random_mean"][0] < 1.0 and curve["random_mean"][-1] == pytest.approx(1.0)


def test_optimiser_recovers_planted_unit(planted):
    G, S = planted
    res = optimize_intervention(G, S, "layer1", "green", n_train=32, n_test=16, steps=40, batch_size=8, lr=0.05,
                                topks=(1,), progress=False)
    assert res.ranking[0] == 1
    assert res.alpha[4:].max() < 0.2  # units unrelated to any concept are switched off
    assert res.heldout_ace > 0.9 and res.topk_ace[1] > 0.9


def test_insertion_values_brute_force(planted):
    G, S = planted
    iv = InsertionValues(G, S, n_samples=30, seed=0, batch_size=7)
    k = iv("layer1", "yellow")
    z = G.sample_z(30, 0)
    with gw.Trace(G, "layer1") as tr:
        x = G(z)
    r = tr.output
    present = (S(x) == S.labels.index("yellow")).float()[:, None]
    w = torch.nn.functional.adaptive_avg_pool2d(present, (10, 10))
    torch.testing.assert_close(k, (r * w).sum((0, 2, 3)) / w.sum())
    assert k[3] > 1.0 and k[0] == 0
    q = InsertionValues(G, S, n_samples=30, seed=0, mode="quantile", q=0.9)("layer1", "yellow")
    torch.testing.assert_close(q, torch.quantile(r.transpose(0, 1).reshape(16, -1), 0.9, dim=1))
    assert iv("layer1", "yellow") is k  # cached


def test_region_edits_stay_inside_receptive_field():
    G = TinyGenerator()
    z = G.sample_z(3, 0)
    region = torch.zeros(16, 16)
    region[10:12, 10:12] = 1  # one cell of layer2's 8x8 grid: (5,5)
    base = render(G, z)
    out = render(G, z, [Intervention("layer2", [0, 1, 2, 3, 4], "insert", values=3.0, region=region)])
    diff = (out - base).abs().sum(1)
    assert diff[:, 10:12, 10:12].sum() > 0
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[8:14, 8:14] = False  # cell (5,5) -> pixels 10..11, plus 2 pixels of 3x3 convs at 16x16
    assert diff[:, keep].max() == 0
    # the same through the full-forward path (edits at two layers)
    both = render(G, z, [Intervention("layer2", [0], "ablate", region=region), Intervention("layer3", [1], "ablate")])
    assert both.shape == base.shape


def test_bad_input(planted):
    G, S = planted
    with pytest.raises(KeyError, match="unknown concept 'purple'.*red"):
        measure_ace(G, S, "layer1", [0], "purple", n_samples=4)
    with pytest.raises(ValueError, match="empty unit set"):
        measure_ace(G, S, "layer1", [], "red", n_samples=4)
    with pytest.raises(ValueError, match="out of range: \\[16\\]"):
        measure_ace(G, S, "layer1", [0, 16], "red", n_samples=4)
    with pytest.raises(ValueError, match="region has size \\(20, 20\\), but images are \\(40, 40\\)"):
        Intervention("layer1", [0], region=torch.ones(20, 20)).to_edit((16, 10, 10), (40, 40))
    with pytest.raises(ValueError, match="mode must be"):
        Intervention("layer1", [0], mode="boost")
    with pytest.raises(gw.UnknownLayerError, match="layer1"):
        measure_ace(G, S, "layer5", [0], "red", n_samples=4)


def test_context_tabulates_by_location_label(planted):
    G, S = planted
    res = contextual_insertion(G, S, "layer1", "red", [0], n_samples=8, locations=None, progress=False)
    table = {row[0]: row for row in res.table()}
    assert table["background"][1] == 8 * 96
    assert table["background"][2] == pytest.approx(0.01, abs=1e-6)  # one cell of 100 turns red
    assert table["red"][2] == pytest.approx(0.0, abs=1e-6)          # already red: nothing added
    assert res.count.sum() == 8 * 100


def test_frechet_distance_reference():
    rng = np.random.RandomState(0)
    a = rng.randn(500, 4)
    b = rng.randn(400, 4) @ rng.randn(4, 4) + 2
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    w, v = np.linalg.eig(s1 @ s2)
    brute = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(w.astype(complex)).real.sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(brute, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1 + 1, s1) == pytest.approx(4, abs=1e-8)


def test_artifact_unit_found(planted):
    """'Real' images never contain yellow: the yellow unit is the artifact."""
    G, S = planted
    z = G.sample_z(200, 77)
    reference = render(G, z, [Intervention("layer1", [3], "ablate")])
    res = artifact_scores(G, S, "layer1", reference, n_samples=120, top=40, ks=(1,), n_eval=60, random_draws=3,
                          progress=False)
    assert res.ranking[0] == 3
    assert res.score[3] > 0
    assert res.removal["fd_top"][0] < res.removal["fd_original"]
    assert res.removal["fd_top"][0] < res.removal["fd_random"][0]


def test_cli_causal_commands(tmp_path, capsys):
    common = ["--generator", "planted", "--segmenter", "planted", "--layer", "layer1", "--device", "cpu", "--quiet",
              "--dissect-samples", "100"]
    out = tmp_path / "ace"
    assert main(["ace", *common, "--concept", "red", "--top", "2", "--samples", "16", "--unit-samples", "8",
                 "--ks", "1", "2", "--random-draws", "2", "--out", str(out)]) == 0
    doc = json.load(open(out / "ace.json"))
    assert doc["ace"]["units"] == [0, doc["ace"]["units"][1]] and doc["ace"]["ace"] > 0.9
    assert doc["ace_ranking"][0] == 0
    assert (out / "removal_curve.png").exists() and (out / "ace_ranking.png").exists()
    out = tmp_path / "ctx"
    assert main(["context", *common, "--concept", "red", "--top", "1", "--samples", "4", "--locations", "0",
                 "--out", str(out)]) == 0
    assert json.load(open(out / "context.json"))["table"][0]["context"] in ("background", "yellow")
    assert (out / "context.png").exists()
    out = tmp_path / "opt"
    assert main(["optimize", *common, "--concept", "green", "--train", "16", "--test", "8", "--steps", "5",
                 "--out", str(out)]) == 0
    assert json.load(open(out / "optimize.json"))["ranking"][0] == 1
    G = gw.load_generator("planted")
    torch.save(render(G, G.sample_z(64, 5)), tmp_path / "ref.pt")
    out = tmp_path / "art"
    assert main(["artifacts", *common, "--samples", "40", "--top-samples", "10", "--eval-samples", "20",
                 "--ks", "1", "--reference", str(tmp_path / "ref.pt"), "--out", str(out)]) == 0
    assert len(json.load(open(out / "artifacts.json"))["ranking"]) == 16
    capsys.readouterr()
    rc = main(["artifacts", *common, "--samples", "40", "--out", str(out)])
    assert rc == 2 and "give --reference" in capsys.readouterr().err


def test_results_with_nan_write_strict_json(tmp_path):
    from gandissect_widgets.engine.io import atomic_write_json
    atomic_write_json(tmp_path / "r.json", {"ci": [float("nan"), 1.0], "n": np.int64(2), "x": np.float32(0.5)})
    assert json.load(open(tmp_path / "r.json")) == {"ci": [None, 1.0], "n": 2, "x": 0.5}


def test_context_patch_and_strength(planted):
    G, S = planted
    res = contextual_insertion(G, S, "layer1", "red", [0], n_samples=8, locations=None, patch=2, progress=False)
    assert res.count.sum() == 8 * 81 and res.settings["patch"] == 2  # 9x9 places of a 10x10 grid
    table = {row[0]: row for row in res.table()}
    assert 0.03 < table["background"][2] <= 0.04 + 1e-6  # four cells of 100, less where red already was
    weak = contextual_insertion(G, S, "layer1", "red", [0], n_samples=8, locations=None, strength=0.1,
                                progress=False)
    weak_table = {row[0]: row for row in weak.table()}
    assert abs(weak_table["background"][2]) < 1e-6  # a tenth of the insertion value stays under the unit's cut
    assert weak_table["red"][2] == pytest.approx(-0.01, abs=1e-6)  # and replaces a red cell's activation
    with pytest.raises(ValueError, match="patch must be between 1 and 10"):
        contextual_insertion(G, S, "layer1", "red", [0], n_samples=2, patch=11, progress=False)
    with pytest.raises(ValueError, match="strength must be a positive number"):
        contextual_insertion(G, S, "layer1", "red", [0], n_samples=2, strength=0, progress=False)
