"""ConceptPixelCounts: where each concept sits, against brute-force counts and the dissection's own."""
import numpy as np
import pytest
import torch

from gandissect_widgets.engine.concept_stats import ConceptPixelCounts, _add_keys, count_samples
from gandissect_widgets.engine.stats import dedupe_channels
from tiny import TinyGenerator, TinySegmenter, run_dissect


def brute(seg, concepts):
    """counts[c, y, x] = number of samples with c in any channel at (y, x); label 0 is no concept."""
    seg = np.asarray(seg)
    if seg.ndim == 3:
        seg = seg[:, None]
    out = np.zeros((concepts,) + seg.shape[2:], np.int64)
    for c in range(1, concepts):
        out[c] = (seg == c).any(1).sum(0)
    return out


def labels(shape, concepts, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, concepts, shape))


@pytest.mark.parametrize("shape", [(7, 5, 6), (7, 3, 5, 6)], ids=["label-map", "three-channels"])
def test_counts_match_brute_force(shape):
    seg = labels(shape, 4, 0)
    if len(shape) == 4:  # channels that repeat a label at a pixel count it once
        seg[:, 1] = torch.where(seg[:, 1] == 2, seg[:, 0], seg[:, 1])
        seg[:3, 2] = seg[:3, 0]
    c = ConceptPixelCounts(4).update(seg)
    np.testing.assert_array_equal(c.counts.numpy(), brute(seg, 4))
    same = ConceptPixelCounts(4).update(dedupe_channels(seg if seg.dim() == 4 else seg[:, None], 4), deduped=True)
    assert torch.equal(same.counts, c.counts)  # as the dissection hands over its deduped labels
    assert int(c.n) == 7 and c.grid == (5, 6) and c.counts.dtype == torch.int64
    np.testing.assert_array_equal(c.area.numpy(), brute(seg, 4).sum((1, 2)))
    assert int(c.counts[0].sum()) == 0  # unlabeled is no concept


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_on_the_labels_device(device):
    seg = labels((5, 2, 4, 3), 6, 7).to(device)
    c = ConceptPixelCounts(6).update(seg)
    assert c.counts.device.type == device and c.n.device.type == device
    np.testing.assert_array_equal(c.counts.cpu().numpy(), brute(seg.cpu(), 6))


def test_scatter_and_bincount_paths_agree():
    """The GPU path (a fixed-size scatter) and the CPU path (bincount) count alike, run here on the CPU."""
    keys = torch.from_numpy(np.random.default_rng(4).integers(0, 50, 999))
    a, b = torch.zeros(60, dtype=torch.long), torch.zeros(60, dtype=torch.long)
    _add_keys(a, keys, scatter=True)
    _add_keys(b, keys, scatter=False)
    assert torch.equal(a, b) and int(a.sum()) == 999 and torch.equal(a[:50], torch.bincount(keys, minlength=50))


def test_batches_and_merge_equal_one_pass():
    seg = labels((12, 2, 4, 4), 5, 1)
    whole = ConceptPixelCounts(5).update(seg)
    parts = [ConceptPixelCounts(5).update(seg[i:j]) for i, j in ((0, 5), (5, 6), (6, 12))]
    merged = ConceptPixelCounts(5)  # no grid yet: takes the first one's
    for p in parts:
        merged.merge(p)
    streamed = ConceptPixelCounts(5, grid=(4, 4))
    for i in range(0, 12, 5):
        streamed.update(seg[i:i + 5])
    for c in (merged, streamed):
        assert torch.equal(c.counts, whole.counts) and int(c.n) == 12
    assert torch.equal(ConceptPixelCounts(5).update(seg[:0]).merge(whole).counts, whole.counts)


def test_state_dict_round_trip_and_arrays():
    c = ConceptPixelCounts(4).update(labels((6, 3, 3), 4, 2))
    sd = c.state_dict()
    back = ConceptPixelCounts.from_state_dict(sd)
    assert torch.equal(back.counts, c.counts) and int(back.n) == 6 and back.grid == (3, 3)
    back.update(labels((2, 3, 3), 4, 3))  # it goes on counting
    assert int(back.n) == 8 and int(c.n) == 6  # the original is untouched (copies)
    a = c.arrays()
    assert a["concept_position_counts"].shape == (4, 3, 3) and int(a["concept_position_samples"]) == 6
    empty = ConceptPixelCounts.from_state_dict(ConceptPixelCounts(3).state_dict())
    assert empty.grid is None and int(empty.n) == 0


def test_bad_input_gets_one_line_errors():
    c = ConceptPixelCounts(4, grid=(3, 3))
    with pytest.raises(ValueError, match=r"integer labels \(N,H,W\) or \(N,K,H,W\), got torch.float32"):
        c.update(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="grid 4x3 do not match the counts' grid 3x3"):
        c.update(torch.zeros(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot merge counts of 5 concepts into 4"):
        c.merge(ConceptPixelCounts(5))
    with pytest.raises(ValueError, match="concepts must be len"):
        ConceptPixelCounts(1)
    with pytest.raises(ValueError, match="no labels counted yet"):
        ConceptPixelCounts(3).counts
    with pytest.raises(ValueError, match=r"do not fit 4 concepts"):
        ConceptPixelCounts.from_state_dict({"concepts": 4, "n": torch.tensor(1), "counts": torch.zeros(3, 2, 2)})


@pytest.mark.parametrize("channels", [1, 2])
def test_areas_equal_the_dissections_concept_pixels(channels):
    """Counted over the dissection's samples, the areas are its S_c counts, concept by concept."""
    G, S = TinyGenerator(), TinySegmenter(channels=channels, half=channels == 2)
    d = run_dissect(G, S, layers=["layer1", "layer2"])
    c = count_samples(G, S, 40, seed=1, batch_size=8)
    want = d.array("layer2", "concept_pixels")
    assert want[1:].sum() > 0
    np.testing.assert_array_equal(c.area.numpy()[1:], want[1:])
    H, W = c.grid
    assert int(d.array("layer1", "n_pixels")) == 40 * H * W


def test_dissect_counts_them_as_a_recount_does():
    """The result of dissect() carries the counts: those of its own samples, as count_samples finds them."""
    G, S = TinyGenerator(), TinySegmenter(channels=2)
    d = run_dissect(G, S)
    assert d.has_position_baseline
    counts, n = d.concept_positions
    again = count_samples(G, S, 40, seed=1, batch_size=8)
    assert n == 40 and np.array_equal(counts, again.counts.numpy())
