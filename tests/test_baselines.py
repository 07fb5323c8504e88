"""IoU ceilings and position-only baselines against brute-force searches, in results, report and browser."""
import itertools
import json
import os
import warnings

import numpy as np
import pytest

import gandissect_widgets as gw
from gandissect_widgets.engine import baselines, results
from gandissect_widgets.engine.concept_stats import ConceptPixelCounts, count_samples
from gandissect_widgets.engine.io import json_bytes
from gandissect_widgets.engine.results import (DEFAULT_MIN_IOU, Dissection, LowCeilingWarning, NoBaselineError,
                                               document_hash)
from tiny import TinyGenerator, TinySegmenter, run_dissect


def dataset_iou(masks, concept):
    """DESIGN 3: sum_z |M & S| / sum_z |M | S| over samples (boolean arrays of one shape)."""
    union = (masks | concept).sum()
    return (masks & concept).sum() / union if union else 0.0


# -- the ceiling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_ceiling_is_the_best_iou_of_any_mask_of_that_size(seed):
    """Every mask over 2 samples of 2x2 pixels (256 of them): the best IoU at each size m is the ceiling."""
    rng = np.random.default_rng(seed)
    concept = rng.random((2, 2, 2)) < [0.2, 0.5, 0.7, 0.9][seed]
    A = int(concept.sum())
    best = np.zeros(9)
    for bits in itertools.product([False, True], repeat=8):
        m = np.array(bits).reshape(2, 2, 2)
        best[m.sum()] = max(best[m.sum()], dataset_iou(m, concept))
    area = np.array([0, A])  # column 0 is unlabeled
    np.testing.assert_allclose(baselines.iou_ceiling(np.arange(9), area)[:, 1], best, atol=1e-12)
    assert baselines.iou_ceiling(np.arange(9), area)[:, 0].max() == 0


def test_ceiling_of_a_third_of_the_image_at_the_top_percent_is_below_the_cutoff():
    """The issue's case: 1% of the pixels against a concept covering a third of them."""
    n = 1000 * 64 * 64
    ceiling = baselines.iou_ceiling(0.01 * n, np.array([0, n // 3, n // 100, 0]))
    np.testing.assert_allclose(ceiling, [0, 0.03, 1.0, 0], atol=1e-4)
    assert baselines.low_ceiling_concepts(["-", "skin", "eyes", "never"], ceiling, DEFAULT_MIN_IOU) == [("skin", ceiling[1])]
    text = baselines.ceiling_warning_text(["-", "skin", "eyes", "never"], ceiling, 0.04, 0.99)
    assert "\n" not in text and "top-1% threshold" in text and "skin 0.030" in text and "eyes" not in text
    assert baselines.ceiling_warning_text(["-", "eyes"], np.array([0, 0.5]), 0.04, 0.99) is None


# -- the position-only baseline ----------------------------------------------------------------------

def fixed_mask_search(seg, concepts):
    """(C, P+1): for each concept and size k the best IoU of any fixed mask, by trying all 2^P masks."""
    N, K, H, W = seg.shape
    P = H * W
    present = np.stack([(seg == c).any(1) for c in range(concepts)])  # (C, N, H, W)
    best = np.zeros((concepts, P + 1))
    for bits in range(1 << P):
        F = np.array([(bits >> i) & 1 for i in range(P)], bool).reshape(H, W)
        masks = np.broadcast_to(F, (N, H, W))
        for c in range(1, concepts):
            best[c, F.sum()] = max(best[c, F.sum()], dataset_iou(masks, present[c]))
    return best


@pytest.mark.parametrize("channels", [1, 2])
def test_baseline_is_the_best_fixed_mask_of_each_size(channels):
    rng = np.random.default_rng(channels)
    seg = rng.integers(0, 4, (6, channels, 3, 3))
    seg[:, 0, 0, :] = np.where(rng.random((6, 3)) < 0.8, 1, seg[:, 0, 0, :])  # concept 1 mostly on the top row
    c = ConceptPixelCounts(4).update(__import__("torch").from_numpy(seg))
    counts, n = c.counts.numpy(), int(c.n)
    best = fixed_mask_search(seg, 4)
    table = baselines.position_iou_table(counts, n)
    np.testing.assert_allclose(table, best, atol=1e-12)
    for k in range(10):  # the mask it names scores that
        for concept in (1, 2, 3):
            F = baselines.position_mask(counts, concept, k)
            assert F.sum() == k
            got = dataset_iou(np.broadcast_to(F, (6, 3, 3)), (seg == concept).any(1))
            assert got == pytest.approx(best[concept, k], abs=1e-12)
    # per unit: the mask size of each unit is its mask pixels per sample, rounded down
    mask_pixels = np.array([0, 6, 8, 11, 12, 23, 54])  # 0, 1, 1.33, 1.83, 2, 3.83, 9 pixels per sample
    got = baselines.position_baseline(counts, n, mask_pixels)
    assert got.shape == (7, 4)
    np.testing.assert_allclose(got, best[:, [0, 1, 1, 1, 2, 3, 9]].T, atol=1e-12)
    assert baselines.mask_size_per_sample((1 - 0.9) * 100 * 7, 7, 100) == 10  # float noise is no pixel less


def test_planted_concept_always_at_one_place_is_found():
    """A concept that always covers the same two pixels: a fixed mask of two pixels matches it exactly."""
    rng = np.random.default_rng(5)
    seg = rng.integers(2, 4, (20, 3, 3))
    seg[:, 1, 1] = 1
    seg[:, 2, 1] = 1
    c = ConceptPixelCounts(4).update(__import__("torch").from_numpy(seg))
    counts = c.counts.numpy()
    assert baselines.position_baseline(counts, 20, 2 * 20)[1] == 1.0
    assert np.argwhere(baselines.position_mask(counts, 1, 2)).tolist() == [[1, 1], [2, 1]]
    assert baselines.position_baseline(counts, 20, 2 * 20)[2] < 0.5  # the scattered ones are not


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match=r"integer \(C, H, W\)"):
        baselines.position_iou_table(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="must lie in 0..samples"):
        baselines.position_iou_table(np.full((2, 2, 2), 5), 4)
    with pytest.raises(ValueError, match="out of range 0..4"):
        baselines.position_mask(np.zeros((2, 2, 2), int), 1, 5)


# -- in the result ------------------------------------------------------------------------------------

def without_positions(d):
    """The same result as one saved before concept positions were counted."""
    return Dissection(d.labels, {l: {k: d.array(l, k) for k in results._ARRAYS} for l in d.layers}, d.settings)


@pytest.fixture(scope="module")
def tiny():
    G, S = TinyGenerator(), TinySegmenter(channels=2)
    d = without_positions(run_dissect(G, S, layers=["layer1", "layer2"]))
    return G, S, d, d.with_concept_positions(count_samples(G, S, 40, seed=1, batch_size=8))


def test_result_baseline_equals_a_search_over_its_samples(tiny):
    """The Dissection's (U, C) baseline: for each unit, the best fixed mask of its size on the same labels."""
    import torch
    from gandissect_widgets.engine.protocols import segment
    G, S, _, d = tiny
    with torch.no_grad():
        seg = segment(S, G(G.sample_z(40, 1))).numpy()
    present = np.stack([(seg == c).any(1) for c in range(len(S.labels))])  # (C, N, H, W)
    for layer in d.layers:
        base, ceil = d.position_baseline(layer), d.iou_ceiling(layer)
        U = len(d.thresholds(layer))
        assert base.shape == ceil.shape == (U, len(S.labels))
        for u in range(U):
            k = int(d.array(layer, "mask_pixels")[u]) // 40
            for c in range(1, len(S.labels)):
                order = np.argsort(-present[c].sum(0).reshape(-1), kind="stable")[:k]
                F = np.zeros(seg.shape[-2] * seg.shape[-1], bool)
                F[order] = True
                want = dataset_iou(np.broadcast_to(F.reshape(seg.shape[-2:]), present[c].shape), present[c])
                assert base[u, c] == pytest.approx(want, abs=1e-12)
                m, A = d.array(layer, "mask_pixels")[u], present[c].sum()
                assert ceil[u, c] == pytest.approx(min(m, A) / max(m, A) if max(m, A) else 0.0)
        assert (d.iou(layer) <= ceil + 1e-12).all()  # no unit beats its ceiling
        larger = d.array(layer, "concept_pixels")[None, :] >= d.array(layer, "mask_pixels")[:, None]
        assert (base[larger] <= ceil[larger] + 1e-12).all()  # nor, for concepts larger than it, a fixed mask
        ids = d.unit_label_ids(layer)
        np.testing.assert_array_equal(d.unit_baselines(layer), base[np.arange(U), ids])


def test_saved_and_loaded_with_the_result(tiny, tmp_path):
    _, _, _, d = tiny
    d.save(tmp_path / "r")
    doc = json.load(open(tmp_path / "r" / "dissect.json"))
    assert doc["version"] == 3 and doc["position_baseline"] is True
    unit = doc["layers"][1]["units"][0]
    assert unit["position_baseline"] == pytest.approx(float(d.unit_baselines("layer2")[0]))
    per = doc["layers"][1]["per_concept"]
    assert set(per) == set(d.labels[1:])
    assert per["c1"] == {"iou_ceiling": pytest.approx(float(d.concept_ceiling("layer2")[1])),
                         "position_baseline": pytest.approx(float(d.concept_baseline("layer2")[1]))}
    e = Dissection.load(tmp_path / "r")
    assert e.has_position_baseline
    for layer in d.layers:
        np.testing.assert_array_equal(e.position_baseline(layer), d.position_baseline(layer))
    np.testing.assert_array_equal(e.concept_positions[0], d.concept_positions[0])


def test_older_results_load_and_say_they_lack_the_baseline(tiny, tmp_path):
    _, _, plain, _ = tiny
    plain.save(tmp_path / "old")
    path = tmp_path / "old" / "dissect.json"
    doc = json.load(open(path))
    doc["version"] = 2  # as the previous version wrote it: no position counts
    doc.pop("position_baseline")
    assert "position_baseline" not in doc["layers"][0]["units"][0]
    doc["document_sha256"] = document_hash(doc)
    path.write_bytes(json_bytes(doc))
    old = Dissection.load(tmp_path / "old")
    assert not old.has_position_baseline
    with pytest.raises(NoBaselineError, match=r"no concept position counts \(saved in format version 2"):
        old.position_baseline("layer2")
    assert old.iou_ceiling("layer2").shape == plain.iou(layer="layer2").shape  # ceilings need no new counts
    assert old.describe_unit("layer2", 0).endswith(f"(no position-only baseline, ceiling {old.unit_ceilings('layer2')[0]:.3f})")


def test_counts_of_other_samples_are_refused(tiny):
    G, S, plain, _ = tiny
    with pytest.raises(ValueError, match="not of the samples layer 'layer1' counted"):
        plain.with_concept_positions(count_samples(G, S, 40, seed=2, batch_size=8))
    with pytest.raises(ValueError, match=r"do not fit 5 labels"):
        plain.with_concept_positions(ConceptPixelCounts(4).update(__import__("torch").zeros(1, 16, 16, dtype=__import__("torch").long)))


@pytest.fixture(scope="module")
def planted():
    """The planted world: each concept in one random cell of a 10x10 grid (1% of the pixels) per image."""
    G, S = gw.load_generator("planted"), gw.load_segmenter("planted")
    d = without_positions(gw.dissect(G, S, ["layer1"], n_samples=200, progress=False))
    return G, S, d.with_concept_positions(count_samples(G, S, 200, seed=1))


def test_planted_units_beat_the_baseline_and_the_warning_names_low_ceilings(planted):
    """Planted units know where their concept is: IoU ~1 against a low position-only baseline; the
    background covers 96% of the image: its ceiling at the top 1% is about 0.010 and the warning says so."""
    _, S, d = planted
    ious, base, labels = d.unit_ious("layer1"), d.unit_baselines("layer1"), d.unit_labels("layer1")
    for u, name in enumerate(["red", "green", "blue", "yellow"]):  # unit j is concept j
        assert labels[u] == name and ious[u] > 0.9 and base[u] < 0.05
        assert d.describe_unit("layer1", u) == (f"IoU {ious[u]:.3f} (position-only baseline {base[u]:.3f}, "
                                                f"ceiling {d.unit_ceilings('layer1')[u]:.3f})")
    ceiling = d.concept_ceiling("layer1")
    assert ceiling[S.labels.index("background")] == pytest.approx(0.01 / 0.96, rel=0.02)
    assert d.low_ceiling_concepts() == [("background", ceiling[1])]
    text = d.ceiling_warning()
    assert text.startswith("at the top-1% threshold these concepts cannot reach the interpretability cut-off IoU 0.04")
    assert f"background {ceiling[1]:.3f}" in text and "red" not in text and "\n" not in text
    with pytest.warns(LowCeilingWarning) as rec:
        assert d.warn_low_ceilings() == text
    assert len(rec) == 1 and str(rec[0].message) == text
    assert d.summary()["warnings"] == [text]


# -- in the unit browser and the report --------------------------------------------------------------

def test_unit_browser_detail_shows_iou_beside_baseline_and_ceiling(planted):
    from gandissect_widgets.widgets import UnitBrowser
    G, S, d = planted
    s = gw.Session(G, S, dissection=d, samples=range(4))
    b = UnitBrowser(s, per_page=4)
    assert b.wait()
    b.click(2)
    assert b.wait() and b.last_error is None
    base, ceil = d.unit_baselines("layer1")[2], d.unit_ceilings("layer1")[2]
    want = f"IoU {d.unit_ious('layer1')[2]:.3f} (position-only baseline {base:.3f}, ceiling {ceil:.3f})"
    assert "unit 2</b>: blue" in b.detail_title.value and want in b.detail_title.value
    s.set_dissection(without_positions(d))  # a result without position counts says so
    b.click(3)
    assert b.wait() and "(no position-only baseline, ceiling " in b.detail_title.value


def test_report_shows_baselines_ceilings_and_the_warning(planted, tmp_path):
    import html as H
    from gandissect_widgets.report.html import build_report
    _, _, d = planted
    d.save(tmp_path / "r")
    page = open(build_report(tmp_path / "r", pictures=False)).read()
    section = page.split("id='layer-layer1'", 1)[1]
    base, ceil = d.unit_baselines("layer1"), d.unit_ceilings("layer1")
    for u in range(16):  # each unit's card: its IoU, then its label's baseline and ceiling
        card = section.split(f"data-unit='{u}'", 1)[1].split("class='card", 1)[0]
        assert f"IoU {d.unit_ious('layer1')[u]:.3f}" in card
        assert f"position-only baseline {base[u]:.3f}, ceiling {ceil[u]:.3f}" in card
    warning = H.escape(d.ceiling_warning(), quote=True)
    assert f"<p class='notice' id='low-ceiling'>A{warning[1:]}.</p>" in page
    concepts = page.split("class='concepts'", 1)[1].split("</table>", 1)[0]
    for c, name in enumerate(d.labels[1:], 1):
        assert (f"<td>{name}</td><td>{d.array('layer1', 'concept_pixels')[c] / int(d.array('layer1', 'n_pixels')):.4f}"
                f"</td><td>{d.concept_ceiling('layer1')[c]:.3f}</td><td>{d.concept_baseline('layer1')[c]:.3f}</td>"
                in concepts)
    # an older result: ceilings, and no baseline, said once
    without_positions(d).save(tmp_path / "old")
    page = open(build_report(tmp_path / "old", pictures=False)).read()
    assert "id='no-baseline'" in page and "no position-only baseline, ceiling" in page and "id='low-ceiling'" in page
