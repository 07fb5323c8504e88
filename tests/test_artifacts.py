"""Artifact repair: the planted artifact units of sceneworld-artifacts are found and their removal
restores the clean GAN's distance; bootstrap intervals against brute force; Inception features from a
local TorchScript file (a tiny stand-in of the same interface)."""
import json
import os

import numpy as np
import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.checkpoint import CheckpointError
from gandissect_widgets.engine.ace import bootstrap_ci
from gandissect_widgets.engine.artifacts import artifact_scores
from gandissect_widgets.engine.frechet import (InceptionWeightsError, bootstrap_indices, feature_stats,
                                               frechet_distance, frechet_resampled, inception_features,
                                               segmenter_features)
from gandissect_widgets.engine.interventions import Intervention, layer_activation, render
from gandissect_widgets.world import plant_artifacts as pa


@pytest.fixture(scope="module")
def planted():
    return gw.load_generator("planted"), gw.load_segmenter("planted")


@pytest.fixture(scope="module")
def worlds():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return gw.load_generator("sceneworld"), gw.load_generator("sceneworld-artifacts"), gw.load_segmenter("sceneworld")


# -- intervals against brute force ---------------------------------------------------------------
def basic(point, percentile):
    """The basic bootstrap interval from the percentile one (what engine.artifacts reports)."""
    lo, hi = percentile
    return (2 * point - hi, 2 * point - lo)


def test_basic_interval_covers_the_distance_where_the_percentile_interval_does_not():
    """40 samples of the reference's own distribution: resampled distances lie far above the distance
    (its small-sample bias), so their percentile interval misses the true value; the basic one covers it."""
    from gandissect_widgets.engine.artifacts import bootstrap_interval
    for seed in range(3):
        rng = np.random.default_rng(seed)
        mu, s = feature_stats(rng.normal(size=(400, 6)))
        true = frechet_distance(*feature_stats(rng.normal(size=(100000, 6))), mu, s)
        gen = rng.normal(size=(40, 6))
        point = frechet_distance(*feature_stats(gen), mu, s)
        vals = frechet_resampled(gen, mu, s, bootstrap_indices(40, 400, seed=0))
        pct = (np.quantile(vals, 0.025), np.quantile(vals, 0.975))
        lo, hi = bootstrap_interval(point, vals)
        assert pct[0] > true and lo < true < hi and true < point
        assert (lo, hi) == pytest.approx(basic(point, pct))


@pytest.mark.parametrize("n,d", [(30, 5), (12, 40)])
def test_resampled_distances_and_intervals_equal_brute_force(n, d):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 2.0   # a planted shift from the reference
    mu, s = feature_stats(rng.normal(size=(60, d)))
    idx = bootstrap_indices(n, 40, seed=3)
    brute = np.array([frechet_distance(*feature_stats(f[i]), mu, s) for i in idx])
    for route in ("cov", "gram", "auto"):
        got = frechet_resampled(f, mu, s, idx, route=route, chunk=7)
        np.testing.assert_allclose(got, brute, rtol=1e-6, atol=1e-6)
    assert brute.min() > 4 * d * 0.5                                  # the shift is seen in every resample
    lo, hi = bootstrap_ci(lambda i: frechet_distance(*feature_stats(f[i]), mu, s), n, 40, 0.9, seed=3)
    got = frechet_resampled(f, mu, s, idx)
    assert (np.nanquantile(got, 0.05), np.nanquantile(got, 0.95)) == pytest.approx((lo, hi), rel=1e-6)


def test_score_and_removal_intervals_equal_brute_force(planted):
    G, S = planted
    ref = render(G, G.sample_z(80, 77), [Intervention("layer1", [3], "ablate")])
    res = artifact_scores(G, S, "layer1", ref, n_samples=40, top=10, units=[3, 5], ks=(1,), n_eval=16,
                          random_draws=2, seed=4, bootstrap=60, unit_bootstrap=30, level=0.9, progress=False)
    feat = segmenter_features(S)
    mu, s = feature_stats(feat(ref).numpy())
    fd = (lambda f: frechet_distance(*feature_stats(f), mu, s))
    z = G.sample_z(40, 4)
    for u in (3, 5):
        top = torch.argsort(layer_activation(G, z, "layer1")[:, u].amax((1, 2)), descending=True, stable=True)[:10]
        before = feat(G(z[top])).numpy()
        after = feat(render(G, z[top], [Intervention("layer1", [u], "ablate")])).numpy()
        assert res.score[u] == pytest.approx(fd(before) - fd(after), abs=1e-9)
        want = basic(res.score[u], bootstrap_ci(lambda i: fd(before[i]) - fd(after[i]), 10, 30, 0.9, seed=5))
        assert tuple(res.score_ci[u]) == pytest.approx(want, abs=1e-8)
    assert np.isnan(res.score_ci[0]).all() and res.ranking[0] == 3
    ze = G.sample_z(56, 4)[40:]
    orig = feat(G(ze)).numpy()
    abl = feat(render(G, ze, [Intervention("layer1", [3], "ablate")])).numpy()
    rem = res.removal
    assert rem["fd_original"] == pytest.approx(fd(orig)) and rem["fd_top"][0] == pytest.approx(fd(abl))
    assert rem["fd_original_ci"] == pytest.approx(
        basic(fd(orig), bootstrap_ci(lambda i: fd(orig[i]), 16, 60, 0.9, seed=4)), abs=1e-8)
    assert rem["fd_top_ci"][0] == pytest.approx(
        basic(fd(abl), bootstrap_ci(lambda i: fd(abl[i]), 16, 60, 0.9, seed=4)), abs=1e-8)
    assert rem["gain_top_ci"][0] == pytest.approx(
        basic(fd(orig) - fd(abl), bootstrap_ci(lambda i: fd(orig[i]) - fd(abl[i]), 16, 60, 0.9, seed=4)), abs=1e-8)
    assert rem["gain_top_ci"][0][0] > 0                                   # removing yellow helps, surely
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["score_ci"][3] == pytest.approx(list(res.score_ci[3])) and doc["settings"]["level"] == 0.9
    text = "\n".join(res.summary())
    assert "top artifact units of layer1: [3, 5]" in text and "helps" in text


# -- the artifact variant -------------------------------------------------------------------------
def test_variant_differs_from_the_clean_gan_only_through_its_planted_units(worlds, tmp_path):
    G, A, _ = worlds
    record = json.load(open(pa.RECORD_PATH))
    units = [u for u, _ in pa.planted_units()]
    assert len(units) >= 2 and record["layer"] == "layer4" and record["command"].startswith("python -m ")
    assert record["quality"]["variant_minus_clean_ci"][0] > 0              # the record says it is worse ...
    q = record["quality"]["ablated_minus_clean_ci"]
    assert q[0] <= 0 <= q[1]                                               # ... and repaired by ablation
    assert os.path.getsize(pa.PATCH_PATH) < 64 * 1024                      # a patch, not a second generator
    clean, art = dict(G.named_parameters()), dict(A.named_parameters())
    assert clean.keys() == art.keys()
    changed = {k for k in clean if not torch.equal(clean[k], art[k])}
    assert changed == {"layer5.conv.weight"}
    w0, w1 = clean["layer5.conv.weight"], art["layer5.conv.weight"]
    others = [c for c in range(w0.shape[1]) if c not in units]
    assert torch.equal(w0[:, others], w1[:, others]) and not torch.equal(w0[:, units], w1[:, units])
    z = G.sample_z(6, 7)
    assert torch.equal(layer_activation(G, z, "layer4"), layer_activation(A, z, "layer4"))
    ablate = [Intervention("layer4", units, "ablate")]
    torch.testing.assert_close(render(A, z, ablate), render(G, z, ablate), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (A(z) - G(z)).abs().amax() > 0.5                          # where the planted units fire, it shows
    # a patch made for other base weights is refused, naming both hashes
    patch = torch.load(pa.PATCH_PATH, weights_only=True)
    torch.save(dict(patch, base_sha256="0" * 64), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="made for base weights with SHA-256 0000"):
        gw.load_generator("sceneworld-artifacts", checkpoint=str(tmp_path / "other.pt"))
    torch.save(dict(patch, patches=[dict(patch["patches"][0], parameter="layer9.nothing")]), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="layer9.nothing"):
        gw.load_generator("sceneworld-artifacts", checkpoint=str(tmp_path / "bad.pt"))


def test_planted_units_are_found_and_their_removal_restores_the_clean_distance(worlds):
    """A small run: the planted units and a few others of layer4, scored on their top samples."""
    G, A, S = worlds
    units = [u for u, _ in pa.planted_units()]
    k = len(units)
    others = [int(u) for u in np.random.RandomState(0).choice([u for u in range(128) if u not in units], 4, False)]
    from gandissect_widgets.world.render import render as render_world, to_tensor
    ref = to_tensor(render_world(300, seed=12345)[0])
    res = artifact_scores(A, S, "layer4", ref, n_samples=80, top=10, units=units + others, ks=(k,), n_eval=60,
                          random_draws=2, seed=6, baseline=G, bootstrap=300, unit_bootstrap=100, progress=False)
    assert sorted(res.ranking[:k].tolist()) == sorted(units)
    assert all(res.score_ci[u][0] > 0 for u in units)                   # each planted unit surely helps
    rem = res.removal
    assert rem["gain_top_ci"][0][0] > 0                                  # ablating them helps ordinary samples
    lo, hi = rem["top_vs_baseline_ci"][0]
    assert lo <= 0 <= hi                                                 # ... back to the clean GAN's distance
    (a, b), (c, d) = rem["fd_top_ci"][0], rem["fd_baseline_ci"]
    assert a <= d and c <= b                                             # the two intervals overlap
    assert b < rem["fd_random_ci"][0][0]                                # beyond the interval of random ablations
    assert rem["random_vs_baseline_ci"][0][0] > 0                        # random units leave the artifacts
    assert "restored" in "\n".join(res.summary())


# -- Inception features from a local TorchScript file --------------------------------------------
class _StandIn(torch.nn.Module):
    """The interface of StyleGAN2-ADA / clean-fid's inception-2015-12-05.pt: images in [0, 255] (uint8),
    resized inside, ``return_features=True`` gives (N, D) pool features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(11, 4)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(24, 24), mode="bilinear",
                                            align_corners=False)
        x = (x - 128) / 128
        f = torch.cat([torch.relu(self.conv(x)).mean((2, 3)), x.mean((2, 3))], 1)
        if return_features:
            return f
        return self.fc(f)


class _NoFeatures(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean((2, 3))


def test_inception_features_from_a_local_torchscript_file(planted, tmp_path):
    G, S = planted
    net = torch.jit.script(_StandIn())
    net.save(str(tmp_path / "inception.pt"))
    feat = inception_features(tmp_path / "inception.pt", batch_size=7)
    x = render(G, G.sample_z(10, 1))
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(feat(x), net(u8, return_features=True))
    ref = render(G, G.sample_z(60, 77), [Intervention("layer1", [3], "ablate")])
    res = artifact_scores(G, S, "layer1", ref, n_samples=40, top=10, units=[0, 3, 5], ks=(1,), n_eval=20,
                          random_draws=2, feature_fn=feat, bootstrap=50, unit_bootstrap=20, progress=False)
    assert res.settings["feature_space"] == "inception_features"
    assert res.ranking[0] == 3 and np.isfinite(res.score_ci[3]).all()


def test_inception_weights_errors_are_one_line(tmp_path):
    torch.jit.script(_NoFeatures()).save(str(tmp_path / "plain.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model at all" * 10)
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "sd.pth")
    torch.save({"conv.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, tmp_path / "fid.pth")
    cases = [(None, "need a local weights file"), (tmp_path / "missing.pt", "does not exist"),
             (tmp_path, "is a directory"), (tmp_path / "junk.pt", "not a PyTorch file"),
             (tmp_path / "sd.pth", "not an Inception-v3 state_dict"), (tmp_path / "fid.pth", "needs torch-fidelity")]
    for path, words in cases:
        with pytest.raises(InceptionWeightsError, match=words) as e:
            inception_features(path)
        assert "\n" not in str(e.value) and "inception-2015-12-05.pt" in str(e.value)
    feat = inception_features(tmp_path / "plain.pt")
    with pytest.raises(InceptionWeightsError, match="plain.pt.*return_features") as e:
        feat(torch.zeros(2, 3, 8, 8))
    assert "\n" not in str(e.value)


# -- the command line -----------------------------------------------------------------------------
def test_cli_artifacts_with_inception_features_and_intervals(planted, tmp_path, capsys):
    from gandissect_widgets.cli import main
    G, _ = planted
    torch.save(render(G, G.sample_z(40, 77), [Intervention("layer1", [3], "ablate")]), tmp_path / "ref.pt")
    torch.jit.script(_StandIn()).save(str(tmp_path / "inception.pt"))
    common = ["artifacts", "--generator", "planted", "--segmenter", "planted", "--layer", "layer1", "--device", "cpu",
              "--quiet", "--samples", "30", "--top-samples", "8", "--eval-samples", "12", "--ks", "1",
              "--reference", str(tmp_path / "ref.pt")]
    out = tmp_path / "art"
    assert main([*common, "--features", "inception", "--inception-weights", str(tmp_path / "inception.pt"),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.load(open(out / "artifacts.json"))
    assert doc["settings"]["feature_space"] == "inception_features" and doc["baseline"] is None
    assert len(doc["score_ci"]) == 16 and doc["removal"]["fd_top_ci"][0][0] <= doc["removal"]["fd_top_ci"][0][1]
    assert f"top artifact units of layer1: {doc['ranking'][:10]}" in text and "improvement [" in text
    assert (out / "artifacts.png").exists()
    rc = main([*common, "--features", "inception", "--inception-weights", str(tmp_path / "nothing.pt"),
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Inception weights" in err and "does not exist" in err
    rc = main([*common, "--inception-weights", str(tmp_path / "inception.pt"), "--out", str(tmp_path / "y")])
    assert rc == 2 and "--features inception" in capsys.readouterr().err


def test_cli_artifacts_runs_on_the_artifact_variant_by_default(tmp_path, capsys):
    from gandissect_widgets.cli import main
    out = tmp_path / "art"
    assert main(["artifacts", "--layer", "layer4", "--out", str(out), "--samples", "4", "--top-samples", "2",
                 "--eval-samples", "4", "--ks", "1", "--reference-samples", "8", "--device", "cpu", "--quiet"]) == 0
    doc = json.load(open(out / "artifacts.json"))
    assert doc["generator"] == "sceneworld-artifacts" and doc["segmenter"] == "sceneworld"
    assert doc["baseline"] == "sceneworld" and "fd_baseline" in doc["removal"]
    assert "baseline generator:" in capsys.readouterr().out
