"""Batched causal tools: many edits a forward pass, equal to the one-edit-at-a-time definitions,
with the planned cost told before and counted here."""
import numpy as np
import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.engine.ace import (measure_ace, measure_ace_cost, removal_curve, removal_curve_cost,
                                           unit_ace, unit_ace_cost, unit_ace_reference)
from gandissect_widgets.engine.hooks import can_run_from
from gandissect_widgets.engine.interventions import Intervention, concept_presence, render
from gandissect_widgets.models import adapt_generator
from test_own_models import TutorialGenerator, tutorial
from tiny import TinySegmenter


@pytest.fixture(scope="module")
def planted():
    return gw.load_generator("planted"), gw.load_segmenter("planted")


def flipped():
    """A model run_from cannot restart (its forward does something after the Sequential)."""
    return adapt_generator(TutorialGenerator().eval(), zdim=8, forward=lambda m, z: m(z[:, :, None, None]).flip(-1))


class Counting:
    """Counts the calls of a segmenter."""

    def __init__(self, S):
        self.S, self.labels, self.calls = S, S.labels, 0

    def __call__(self, x):
        self.calls += 1
        return self.S(x)


def test_unit_ace_equals_the_one_unit_at_a_time_reference_planted(planted):
    G, S = planted
    fast = unit_ace(G, S, "layer1", "blue", n_samples=20, seed=4, batch_size=8, progress=False, images_per_pass=24)
    ref = unit_ace_reference(G, S, "layer1", "blue", n_samples=20, seed=4, batch_size=8)
    np.testing.assert_array_equal(fast, ref)
    assert int(np.argmax(fast)) == 2 and fast[2] > 0.05  # the planted blue unit
    assert np.all(np.abs(np.delete(fast, [2])) < fast[2] / 2)


@pytest.mark.parametrize("make", [tutorial, flipped], ids=["resumable", "full-forwards"])
def test_unit_ace_equals_reference_on_an_own_model(make):
    G, S = make(), TinySegmenter()
    assert can_run_from(G, "main.3") == (make is tutorial)
    values = torch.linspace(-4, 4, 8)
    kw = dict(n_samples=10, seed=1, batch_size=4, values=values, units=[0, 3, 5, 6, 7])
    fast = unit_ace(G, S, "main.3", "c1", progress=False, images_per_pass=8, **kw)
    ref = unit_ace_reference(G, S, "main.3", "c1", **kw)
    np.testing.assert_array_equal(fast, ref)
    assert np.isnan(fast[[1, 2, 4]]).all() and np.isfinite(fast[[0, 3, 5, 6, 7]]).all()
    assert np.abs(fast[[0, 3, 5, 6, 7]]).max() > 0  # the edits change the images


@pytest.mark.parametrize("make", [tutorial, flipped], ids=["resumable", "full-forwards"])
def test_planned_cost_is_what_runs_and_progress_moves_per_pass(make):
    G, S = make(), Counting(TinySegmenter())
    values = torch.ones(8)
    first, last = [], []
    hooks = [G.main[0].register_forward_hook(lambda m, i, o: first.append(o.shape[0])),
             G.main[7].register_forward_hook(lambda m, i, o: last.append(o.shape[0]))]
    steps = []
    try:
        plan = unit_ace_cost(G, "main.3", n_samples=10, batch_size=4, images_per_pass=8)
        first.clear(), last.clear()
        unit_ace(G, S, "main.3", "c1", n_samples=10, batch_size=4, values=values, images_per_pass=8,
                 progress=lambda done, total, desc: steps.append((done, total)))
    finally:
        for h in hooks:
            h.remove()
    # 3 batches of samples x 4 groups of 2 units: 12 passes of insertions and 12 of ablations
    assert steps == [(i, 12) for i in range(13)]
    assert S.calls == plan.segmenter_calls == 24 == len(last)
    assert plan.from_layer == (24 if make is tutorial else 0)
    assert len(first) + plan.from_layer == plan.forward_passes
    assert plan.images == sum(first) + (sum(last) if make is tutorial else 0)
    assert max(last) == 8  # two units of a batch of 4 in each pass
    assert "forward passes" in str(plan) and "24 segmenter calls" in str(plan)


def test_measure_ace_cost_counts_its_passes(planted):
    G, S = planted
    S = Counting(S)
    plan = measure_ace_cost(G, "layer1", n_samples=20, batch_size=8)
    res = measure_ace(G, S, "layer1", [0], "red", n_samples=20, batch_size=8, values=torch.full((16,), 2.0),
                      bootstrap=20)
    assert S.calls == plan.segmenter_calls == 9 and plan.from_layer == 9 and plan.forward_passes == 13
    assert res.ace > 0.9


def test_removal_curve_equals_brute_force_ablations(planted):
    G, S = planted
    rankings = {"IoU": [1, 0, 2, 3] + list(range(4, 16)), "rev": list(range(15, -1, -1))}
    kw = dict(ks=(1, 3, 16), n_samples=12, batch_size=5, random_draws=2, images_per_pass=20)
    Sc = Counting(S)
    plan = removal_curve_cost(G, "layer1", rankings, **kw)
    curve = removal_curve(G, Sc, "layer1", "green", rankings, seed=4, progress=False, **kw)
    assert Sc.calls == plan.segmenter_calls == 3 * (1 + 3)  # 12 unit sets, 4 of them a pass
    z = G.sample_z(12, 4)
    orig = concept_presence(S, render(G, z), 3).double().sum()
    perm = np.random.RandomState(0)
    sets = {name: rank for name, rank in rankings.items()}
    sets.update({f"random{d}": perm.permutation(16) for d in range(2)})
    for name, rank in sets.items():
        want = [1 - float(concept_presence(S, render(G, z, [Intervention("layer1", list(rank[:k]), "ablate")]),
                                           3).double().sum() / orig) for k in (1, 3, 16)]
        got = curve["curves"][name] if name in rankings else curve["random_draws"][int(name[-1])]
        assert got == pytest.approx(want, abs=1e-12), name
    assert curve["curves"]["IoU"] == pytest.approx([1.0, 1.0, 1.0])


def context_reference(G, S, layer, c, units, values, n_samples, seed, locations, patch, batch_size):
    """Contextual insertion by its definition: one place of one sample a render."""
    from gandissect_widgets.engine.interventions import layer_activation
    z = G.sample_z(n_samples, seed)
    rng = np.random.RandomState(seed)
    L = len(S.labels)
    count, s1, s2 = np.zeros(L), np.zeros(L), np.zeros(L)
    for i in range(0, n_samples, batch_size):
        zb = z[i:i + batch_size]
        r = layer_activation(G, zb, layer)
        _, h, w = r.shape[1:]
        gh, gw = h - patch + 1, w - patch + 1
        places = [range(gh * gw) if locations is None else rng.choice(gh * gw, min(locations, gh * gw), replace=False)
                  for _ in range(r.shape[0])]
        for b, ps in enumerate(places):
            seg0 = S(render(G, zb[b:b + 1]))[0]
            H, W = seg0.shape
            for p in ps:
                y, x = int(p) // gw, int(p) % gw
                rr = r[b:b + 1].clone()
                rr[0, units, y:y + patch, x:x + patch] = values[:, None, None]
                added = float((S(render(G, None, [], activation=rr, layer=layer)) == c).float().mean()
                              - (seg0 == c).float().mean())
                lab = int(seg0[min(H - 1, int((y + patch / 2) * H / h)), min(W - 1, int((x + patch / 2) * W / w))])
                count[lab] += 1
                s1[lab] += added
                s2[lab] += added ** 2
    return count, s1, s2


@pytest.mark.parametrize("locations,patch", [(None, 1), (5, 3)])
def test_contextual_insertion_equals_one_place_at_a_time(planted, locations, patch):
    from gandissect_widgets.engine.context import contextual_insertion
    G, S = planted
    values = torch.tensor([2.0, 1.5])
    steps = []
    res = contextual_insertion(G, S, "layer1", "red", [0, 5], n_samples=6, seed=3, locations=locations, patch=patch,
                               batch_size=4, values=values, progress=lambda done, total, _: steps.append((done, total)))
    passes = 7 + 4 if locations is None else 1 + 1  # batches of 4 and 2 samples, 64 insertions a pass
    assert steps == [(i, passes) for i in range(passes + 1)]
    count, s1, s2 = context_reference(G, S, "layer1", S.labels.index("red"), [0, 5], values, 6, 3, locations, patch, 4)
    np.testing.assert_array_equal(res.count, count)
    mean = np.divide(s1, count, out=np.zeros_like(s1), where=count > 0)
    np.testing.assert_allclose(res.added_mean, mean, rtol=0, atol=1e-7)
    assert res.count.sum() == 6 * (100 if locations is None else 5)
    assert res.added_mean[S.labels.index("background")] > 0  # red drawn where there was none


def test_cli_ace_tells_its_plan_before_starting(tmp_path, capsys):
    from gandissect_widgets.cli import main
    from gandissect_widgets.engine.interventions import Cost
    assert main(["ace", "--generator", "planted", "--segmenter", "planted", "--layer", "layer1", "--device", "cpu",
                 "--dissect-samples", "100", "--concept", "red", "--top", "2", "--samples", "16",
                 "--unit-samples", "8", "--ks", "1", "2", "--random-draws", "2", "--out", str(tmp_path / "ace")]) == 0
    err = capsys.readouterr().err
    G = gw.load_generator("planted")
    # defaults: batches of 16; insertion values over 200 samples in batches of 32
    want = Cost(7, 0, 7, 200) + measure_ace_cost(G, "layer1", 16, 16) + unit_ace_cost(G, "layer1", 8, 16) \
        + removal_curve_cost(G, "layer1", {"IoU": list(range(16)), "ACE": list(range(16))}, (1, 2), 16, 16, 2)
    assert f"gandissect ace: planned {want}\n" in err
    assert err.index("planned") < err.index("ace layer1")  # told before the first bar
