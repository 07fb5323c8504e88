"""Dissection against brute-force references on small data, planted units, merging."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gandissect_widgets as gw
from gandissect_widgets.engine.counting import count_at
from gandissect_widgets.engine.hooks import TraceDict
from gandissect_widgets.engine.upsample import upsample, upsample_above, upsample_at, upsample_max, upsample_pixels
from gandissect_widgets.engine.stats import RunningMoments, RunningTopK, TailHistogram, dedupe_channels, pilot_edges
from tiny import TinyGenerator, TinySegmenter


def brute_force(G, S, layers, n, seed):
    """Full activations upsampled with F.interpolate directly, and labels as (N,K,H,W)."""
    z = G.sample_z(n, seed)
    with torch.no_grad(), TraceDict(G, layers) as tr:
        x = G(z)
    seg = S(x)
    if seg.dim() == 3:
        seg = seg[:, None]
    H, W = seg.shape[-2:]
    ups = {l: upsample(tr[l].output, (H, W)) for l in layers}
    return ups, seg, {l: tr[l].output for l in layers}


def exact_iou(up, seg, thresholds, C):
    """IoU(u,c) = sum_z |M & S| / sum_z |M | S| with S_c = any channel == c, from the package's
    readable dense definition (``engine.counting.count_at``, checked against loops over pixels in
    test_engine_stages.py), which the fast path must equal."""
    counts = count_at(up, seg, torch.as_tensor(thresholds), C)
    inter = counts["intersection"].double()
    union = (counts["mask_pixels"][:, None] + counts["concept_pixels"][None, :]).double() - inter
    out = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros(()).double()).numpy()
    out[:, 0] = 0.0
    return out


@pytest.mark.parametrize("half,channels", [(False, 1), (True, 1), (False, 2)])
def test_matches_brute_force(half, channels):
    G, S = TinyGenerator(), TinySegmenter(half=half, channels=channels)
    layers = ["layer1", "layer2", "layer3"]
    n = 150
    d = gw.dissect(G, S, layers, n_samples=n, seed=3, batch_size=32, progress=False, pilot_samples=40)
    ups, seg, raws = brute_force(G, S, layers, n, 3)
    for l in layers:
        up = ups[l]
        U = up.shape[1]
        flat = up.transpose(0, 1).reshape(U, -1)
        t = d.thresholds(l)
        # threshold rank: fraction above within 0.001 of 1%
        frac = (flat > torch.from_numpy(t)[:, None]).float().mean(1).numpy()
        assert np.all(np.abs(frac - 0.01) <= 0.001), (l, frac)
        np.testing.assert_allclose(d.array(l, "fraction_above"), frac, atol=1e-9)
        # the threshold sits next to the exact quantile
        exact_q = torch.quantile(flat.double(), 0.99, dim=1).numpy()
        rank_of_exact = (flat.double() > torch.from_numpy(exact_q)[:, None]).double().mean(1).numpy()
        assert np.all(np.abs(rank_of_exact - frac) <= 0.0011)
        # IoU exact at the engine's thresholds
        ref = exact_iou(up, seg, t, len(S.labels))
        np.testing.assert_allclose(d.iou(l), ref, atol=1e-12)
        # top-k by per-sample max of the same upsampled maps
        mx = up.amax((2, 3))  # (N,U)
        for u in range(U):
            order = np.lexsort((np.arange(n), -mx[:, u].numpy()))[:20]
            np.testing.assert_array_equal(d.topk(l)[u], order)
        # moments, on the layer's own grid
        raw = raws[l].transpose(0, 1).reshape(U, -1).double()
        np.testing.assert_allclose(d.array(l, "mean"), raw.mean(1).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d.array(l, "std"), raw.std(1).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d.array(l, "max"), raw.amax(1).numpy(), rtol=1e-6)
        assert np.all(d.array(l, "max") >= flat.amax(1).numpy() - 1e-6)  # bounds the upsampled maps
        # derived views
        labels = d.unit_label_ids(l)
        assert np.all(labels == 1 + np.argmax(ref[:, 1:], 1))
        assert d.unit_labels(l)[0] == S.labels[labels[0]]
        np.testing.assert_array_equal(d.interpretable(l, 0.04), ref[np.arange(U), labels] > 0.04)


def test_planted_units_found():
    G, S = gw.load_generator("planted", concepts=4, units=16), gw.load_segmenter("planted", concepts=4)
    d = gw.dissect(G, S, ["layer1", "layer2"], n_samples=400, seed=1, batch_size=64, progress=False)
    names = ["red", "green", "blue", "yellow"]
    for layer in ("layer1", "layer2"):
        iou = d.iou(layer)
        for j, name in enumerate(names):
            assert d.unit_labels(layer)[j] == name
            assert iou[j, S.labels.index(name)] > 0.9
            assert d.ranking(layer, name)[0] == j
        rnd = iou[4:, 2:]  # random units vs the planted concepts
        assert rnd.max() < 0.04
        assert not d.interpretable(layer)[4:].any()
        assert d.interpretable(layer)[:4].all()


def test_refinement_when_pilot_is_unrepresentative():
    """The pilot sees only small activations; the rest of the data is far larger."""
    class Shifted(TinyGenerator):
        def sample_z(self, n, seed=0):
            z = super().sample_z(n, seed)
            z[8:] *= 6.0  # samples past the pilot are much stronger
            return z

    G, S = Shifted(), TinySegmenter()
    d = gw.dissect(G, S, ["layer1"], n_samples=120, seed=0, batch_size=16, progress=False, pilot_samples=8)
    ups, seg, _ = brute_force(G, S, ["layer1"], 120, 0)
    up = ups["layer1"]
    flat = up.transpose(0, 1).reshape(up.shape[1], -1)
    frac = (flat > torch.from_numpy(d.thresholds("layer1"))[:, None]).float().mean(1).numpy()
    assert np.all(np.abs(frac - 0.01) <= 0.001), frac
    np.testing.assert_allclose(d.iou("layer1"), exact_iou(up, seg, d.thresholds("layer1"), 5), atol=1e-12)


def _split_stats(seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(20, 3, 6, 6, generator=g)
    seg = torch.randint(0, 4, (20, 2, 6, 6), generator=g)
    edges = torch.sort(torch.randn(3, 24, generator=g), 1).values
    return acts, dedupe_channels(seg, 4), edges


def test_merge_equals_whole():
    acts, seg, edges = _split_stats()
    ids = torch.arange(20)
    whole = (RunningMoments(3), RunningTopK(3, 5), TailHistogram(edges, 4))
    a = (RunningMoments(3), RunningTopK(3, 5), TailHistogram(edges, 4))
    b = (RunningMoments(3), RunningTopK(3, 5), TailHistogram(edges, 4))
    for stats, sl in ((whole, slice(0, 20)), (a, slice(0, 7)), (b, slice(7, 20))):
        stats[0].add(acts[sl])
        stats[1].add(acts[sl].amax((2, 3)), ids[sl])
        stats[2].add(acts[sl], seg[sl])
    a[0].merge(b[0]); a[1].merge(b[1]); a[2].merge(b[2])
    for k in ("count", "min", "max"):
        assert torch.equal(getattr(a[0], k), getattr(whole[0], k))
    torch.testing.assert_close(a[0].mean, whole[0].mean)
    torch.testing.assert_close(a[0].variance, whole[0].variance)
    torch.testing.assert_close(a[0].variance, acts.transpose(0, 1).reshape(3, -1).double().var(1))
    assert torch.equal(a[1].values, whole[1].values) and torch.equal(a[1].indices, whole[1].indices)
    for k in ("n_pixels", "hist", "joint", "concept_pixels"):
        assert torch.equal(getattr(a[2], k), getattr(whole[2], k)), k
    # and the histogram's counts are exact
    j = torch.tensor([5, 10, 20])
    mask, inter = whole[2].iou_counts(j)
    for u in range(3):
        M = acts[:, u] > edges[u, j[u]]
        assert int(mask[u]) == int(M.sum())
        for c in range(1, 4):
            assert int(inter[u, c]) == int((M & (seg == c).any(1)).sum())


def test_bins_are_exact_for_even_uneven_and_flat_edges():
    """A value's bin j holds e_{j-1} < v <= e_j: the number of edges below it, brute force.
    Evenly spaced edges are binned by arithmetic; values on an edge, a hair either side of one,
    uneven edges and a unit whose edges all coincide must still land exactly."""
    g = torch.Generator().manual_seed(5)
    even = pilot_edges(torch.randn(3, 4000, generator=g) * torch.tensor([[1.0], [30.0], [1e-3]]), 0.99, 32)
    uneven = torch.sort(torch.randn(2, 32, generator=g) ** 3, 1).values
    flat = torch.full((1, 32), 0.25)
    coarse = torch.linspace(1000, 1000.001, 32)[None]  # float32 cannot space these evenly
    edges = torch.cat([even, uneven, flat, coarse])
    hist = TailHistogram(edges, 3)
    u = torch.arange(7).repeat_interleave(400)
    on_edge = edges[u, torch.randint(0, 32, (u.numel(),), generator=g)]
    nudged = torch.stack([on_edge, on_edge.nextafter(torch.tensor(math.inf)), on_edge.nextafter(torch.tensor(-math.inf)),
                          on_edge + torch.rand(u.numel(), generator=g) * (edges[:, -1] - edges[:, 0] + 1)[u]], 1)
    for dtype in (torch.float32, torch.float64):
        vals = nudged.to(dtype).reshape(-1)
        uu = u.repeat_interleave(4)
        keep = vals > edges[uu, 0].to(dtype)  # only the tail is binned
        vals, uu = torch.cat([vals[keep], torch.tensor([math.inf] * 7, dtype=dtype)]), torch.cat([uu[keep], torch.arange(7)])
        truth = (edges[uu].to(dtype) < vals[:, None]).sum(1)
        assert torch.equal(hist.bin_of(vals, uu), truth), dtype
        # grouped: value i belongs to unit groups[m[i]]
        groups, m = torch.unique(uu, return_inverse=True)
        assert torch.equal(hist.bin_of(vals, groups, m), truth)


def test_half_values_and_empty_batches():
    """Half-precision values are binned against the float32 edges, not rounded ones; an empty
    batch has an empty tail."""
    h = TailHistogram(torch.tensor([[0.5, 0.99999994]]), 1)
    one = torch.zeros(1, dtype=torch.long)
    for dtype in (torch.float16, torch.bfloat16):
        assert h.bin_of(torch.tensor([1.0], dtype=dtype), one).tolist() == [2]
    h.add(torch.ones(1, 1, 1, 1, dtype=torch.float16), torch.zeros(1, 1, 1, 1, dtype=torch.long))
    assert h.hist.tolist() == [[0, 0, 1]]
    n, c, pix, v = upsample_above(torch.randn(0, 3, 4, 4), (8, 8), torch.zeros(3))
    assert n.numel() == c.numel() == pix.numel() == v.numel() == 0
    with pytest.raises(ValueError, match="at most"):
        TailHistogram(torch.zeros(1, 5000), 2)


def test_merge_rejects_different_edges():
    acts, seg, edges = _split_stats()
    with pytest.raises(ValueError, match="different edges"):
        TailHistogram(edges, 4).merge(TailHistogram(edges + 1, 4))


def test_topk_ties_go_to_smaller_index():
    t = RunningTopK(1, 3)
    t.add(torch.tensor([[1.0], [2.0], [2.0], [1.0]]), torch.tensor([0, 1, 2, 3]))
    t.add(torch.tensor([[2.0]]), torch.tensor([4]))
    assert t.indices.tolist() == [[1, 2, 4]]


@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), (64, 64)), ((1, 2, 7, 5), (32, 30)), ((1, 1, 1, 1), (8, 8)),
                                        ((2, 2, 4, 4), (4, 4)), ((1, 3, 16, 16), (8, 8))])
def test_upsample_is_bilinear_half_pixel(shape, size):
    r = torch.randn(*shape)
    ref = F.interpolate(r, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample(r, size), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape,size", [((3, 5, 8, 8), (64, 64)), ((2, 4, 7, 5), (32, 30)), ((2, 3, 16, 16), (64, 64)),
                                        ((2, 3, 16, 16), (8, 8)), ((1, 2, 1, 1), (8, 8)), ((2, 3, 5, 9), (11, 40))])
def test_sparse_readers_agree_with_upsample_bit_for_bit(shape, size):
    """The tail, the maxima and chosen pixels are read without the whole map, and equal it."""
    g = torch.Generator().manual_seed(sum(shape) + size[0])
    r = torch.randn(*shape, generator=g)
    r[0, 0] = 0.5  # a flat map: its maximum is everywhere, its tail is empty above 0.5
    up = upsample(r, size)
    full = up.flatten(2)
    C = shape[1]
    for q in (0.0, 0.9, 0.99):
        low = torch.quantile(up.transpose(0, 1).reshape(C, -1), q, dim=1)
        n, c, pix, v = upsample_above(r, size, low)
        above = full > low.view(1, -1, 1)
        assert n.numel() == int(above.sum())
        assert torch.equal(full[n, c, pix], v)  # the same values, bit for bit
        assert bool(above[n, c, pix].all())
    torch.testing.assert_close(upsample_max(r, size), full.amax(2), rtol=0, atol=1e-6)
    pixels = torch.randint(0, size[0] * size[1], (shape[0], 17), generator=g)
    assert torch.equal(upsample_pixels(r, size, pixels), full.gather(2, pixels[:, None].expand(-1, C, -1)))
    rows, cols = [0, size[0] - 1, size[0] // 2], list(range(0, size[1], 3))
    assert torch.equal(upsample_at(r, size, rows, cols), up[..., rows, :][..., cols])


def test_sparse_readers_on_relu_maps_and_non_finite_values():
    """A unit that is zero almost everywhere has a floor of 0: zero cells never pass it. One inf
    source spoils only the pixels that blend it, as with F.interpolate."""
    r = torch.zeros(4, 3, 32, 32)
    r[:, 0, 5, 5] = 3.0
    r[1, 1, 10:12, 20:23] = torch.rand(2, 3) + 0.1
    up = upsample(r, (256, 256))
    low = torch.zeros(3)
    n, c, pix, v = upsample_above(r, (256, 256), low)
    full = up.flatten(2)
    assert n.numel() == int((full > 0).sum()) and torch.equal(full[n, c, pix], v)
    bad = torch.randn(1, 2, 6, 6)
    bad[0, 0, 2, 3] = float("inf")
    ref = F.interpolate(bad, size=(24, 24), mode="bilinear", align_corners=False)
    out = upsample(bad, (24, 24))
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    torch.testing.assert_close(out[torch.isfinite(out)], ref[torch.isfinite(ref)], atol=2e-6, rtol=1e-5)
