"""The dissection's stages: the counting backends agree, the IQR rule against a brute force, the
upsampling conventions in closed form, the knobs and names checked, the dense path's host syncs."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import gandissect_widgets as gw
from gandissect_widgets.engine.counting import concept_masks, count_at
from gandissect_widgets.engine.hooks import TraceDict
from gandissect_widgets.engine.protocols import NonFiniteError
from gandissect_widgets.engine.stats import grid_edges
from gandissect_widgets.engine.thresholds import candidate_levels, iqr_fractions
from gandissect_widgets.engine.tuning import Tuning
from gandissect_widgets.engine.upsample import upsample, upsample_above, upsample_max, upsample_pixels
from tiny import TinyGenerator, TinySegmenter

COUNTS = ("iou", "intersection", "mask_pixels", "concept_pixels", "n_pixels", "thresholds", "fraction_above",
          "mean", "std", "min", "max", "topk_indices")


def maps_and_labels(G, S, layers, n, seed, convention="iclr"):
    """Whole upsampled maps of ``layers`` and the labels (N,K,H,W), straight from the models."""
    z = G.sample_z(n, seed)
    with torch.no_grad(), TraceDict(G, layers) as tr:
        x = G(z)
        seg = S(x)
    seg = seg[:, None] if seg.dim() == 3 else seg
    return {l: upsample(tr[l].output, seg.shape[-2:], convention) for l in layers}, seg


def assert_backends_agree(G, S, layers, **kw):
    tail = gw.dissect(G, S, layers, method="tail", progress=False, **kw)
    dense = gw.dissect(G, S, layers, method="dense", progress=False, **kw)
    assert tail.settings["method"] == "tail" and dense.settings["method"] == "dense"
    for layer in layers:
        for k in COUNTS + tuple(k for k in ("iqr", "iqr_concept", "iqr_fraction") if k in tail._layers[layer]):
            np.testing.assert_array_equal(tail.array(layer, k), dense.array(layer, k), err_msg=f"{layer}/{k}")
        np.testing.assert_allclose(tail.array(layer, "topk_values"), dense.array(layer, "topk_values"), rtol=1e-6)
        assert tail.unit_labels(layer) == dense.unit_labels(layer)
    return tail, dense


def assert_counts_are_the_definition(d, G, S, layers, n, seed, convention="iclr"):
    """At the result's thresholds, its counts are those of whole maps compared and counted."""
    ups, seg = maps_and_labels(G, S, layers, n, seed, convention)
    for layer in layers:
        ref = count_at(ups[layer], seg, torch.from_numpy(d.thresholds(layer)), len(S.labels))
        got = d.array(layer, "intersection")
        np.testing.assert_array_equal(got[:, 1:], ref["intersection"][:, 1:].numpy())
        np.testing.assert_array_equal(d.array(layer, "mask_pixels"), ref["mask_pixels"].numpy())
        np.testing.assert_array_equal(d.array(layer, "concept_pixels")[1:], ref["concept_pixels"][1:].numpy())


# -- the counting backends ---------------------------------------------------------------------
@pytest.mark.parametrize("threshold", ["quantile", "iqr"])
@pytest.mark.parametrize("seg_kw", [{}, {"half": True, "channels": 2}])
def test_backends_agree_on_the_test_models(threshold, seg_kw):
    G, S = TinyGenerator(), TinySegmenter(**seg_kw)
    layers = ["layer1", "layer2", "layer3"]
    kw = dict(n_samples=60, batch_size=16, pilot_samples=24, threshold=threshold, tuning=Tuning(threshold_samples=24))
    tail, _ = assert_backends_agree(G, S, layers, **kw)
    assert_counts_are_the_definition(tail, G, S, layers, 60, 1)
    if threshold == "quantile":
        assert np.abs(tail.array("layer2", "fraction_above") - 0.01).max() <= 5e-4


@pytest.mark.parametrize("convention", ["iclr", "pnas"])
def test_backends_agree_on_the_planted_world(convention):
    G, S = gw.load_generator("planted", concepts=4, units=16), gw.load_segmenter("planted", concepts=4)
    tail, _ = assert_backends_agree(G, S, ["layer1"], n_samples=120, batch_size=32, upsample=convention)
    assert tail.settings["upsample"] == convention
    assert tail.unit_labels("layer1")[:4] == ["red", "green", "blue", "yellow"]
    assert_counts_are_the_definition(tail, G, S, ["layer1"], 120, 1, convention)


def test_backends_agree_on_sceneworld():
    G, S = gw.load_generator("sceneworld"), gw.load_segmenter("sceneworld")
    layers = ["layer4", "layer6"]
    tail, _ = assert_backends_agree(G, S, layers, n_samples=24, batch_size=12, pilot_samples=12)
    assert_counts_are_the_definition(tail, G, S, layers, 24, 1)


def test_count_at_is_the_definition():
    """count_at (the package's readable definition) against loops over pixels, with a label
    repeated in two channels (it counts once) and label 0 (no concept)."""
    g = torch.Generator().manual_seed(3)
    up = torch.randn(3, 2, 5, 4, generator=g)
    seg = torch.randint(0, 4, (3, 2, 5, 4), generator=g)
    seg[:, 1, 0] = seg[:, 0, 0]
    t = torch.tensor([0.3, -0.2])
    out = count_at(up, seg, t, 4)
    for u in range(2):
        assert int(out["mask_pixels"][u]) == sum(float(v) > float(t[u]) for v in up[:, u].flatten())
        for c in range(1, 4):
            n = sum(1 for i in range(3) for y in range(5) for x in range(4)
                    if up[i, u, y, x] > t[u] and c in seg[i, :, y, x].tolist())
            assert int(out["intersection"][u, c]) == n
    assert (out["intersection"][:, 0] == 0).all() and int(out["n_pixels"]) == 60
    assert torch.equal(concept_masks(seg, 4).sum((0, 2, 3)), out["concept_pixels"])


# -- the IQR rule --------------------------------------------------------------------------------
def brute_force_iqr(ups, seg, fractions, concepts):
    """Per unit, the reference's rule from scratch in numpy: candidates from every value (the
    (floor(f M) + 1)-th largest, moved to the nearest edge of a 1024-edge power-of-two grid), the
    2x2 table of (mask, concept) counted directly, MI / JE with the reference's rules."""
    U = ups.shape[1]
    S = concept_masks(seg, concepts).numpy()
    P = ups.shape[0] * ups.shape[2] * ups.shape[3]
    out = []
    for u in range(U):
        v = ups[:, u].numpy()
        top = np.sort(v.reshape(-1))[::-1]
        grid = grid_edges(torch.tensor([float(top[-1])]), torch.tensor([float(top[0])]), 1024)[0].double().numpy()
        scores = np.zeros((concepts, len(fractions)))
        levels = []
        for j, f in enumerate(fractions):
            raw = top[min(int(math.floor(f * len(top))), len(top) - 1)]
            k = int(np.clip(np.round((raw - grid[0]) / (grid[1] - grid[0])), 0, 1023))
            levels.append(np.float32(grid[k]))
        for c in range(1, concepts):
            for j, level in enumerate(levels):
                M = v > level
                truth, pred, isect = S[:, c].sum() / P, M.sum() / P, (M & S[:, c]).sum() / P
                A = np.clip(np.array([[isect, pred - isect], [truth - isect, 1 - (truth + pred - isect)]]), 0, 1)
                row = np.array([pred, 1 - pred])
                col = np.array([truth, 1 - truth])
                with np.errstate(divide="ignore"):  # (a cell > 0 of a margin rounded to 0: inf, as in torch)
                    mi = sum(A[a, b] * math.log(A[a, b] / (row[a] * col[b]))
                             for a in range(2) for b in range(2) if A[a, b] > 0)
                je = -sum(A[a, b] * math.log(A[a, b]) for a in range(2) for b in range(2) if A[a, b] > 0)
                if j == len(levels) - 1 or truth < 1e-3:
                    mi = 0.0
                iqr = mi / je if je > 0 else 0.0
                if A[0, 0] + A[1, 1] <= 0.8 or level <= 0:
                    iqr = 0.0
                scores[c, j] = iqr
        c = int(np.argmax(scores.max(1)))
        j = int(np.argmax(scores[c]))
        out.append((levels[j], c, scores[c, j], fractions[j]))
    return out


def test_iqr_rule_against_a_brute_force():
    """Every pixel of the threshold set a candidate's sample (pilot_pixels covers the 16 x 16 grid):
    the chosen levels, concepts, scores and fractions are the brute force's."""
    G, S = TinyGenerator(), TinySegmenter()
    layers = ["layer2", "layer3"]
    tuning = Tuning(threshold_samples=20, pilot_pixels=256, iqr_candidates=40)
    d = gw.dissect(G, S, layers, n_samples=30, batch_size=8, threshold="iqr", tuning=tuning, progress=False)
    assert d.settings["threshold"] == "iqr" and d.settings["threshold_seed"] == 2
    ups, seg = maps_and_labels(G, S, layers, 20, 2)  # the threshold set: seed 2
    fractions = iqr_fractions(40).numpy()
    for layer in layers:
        ref = brute_force_iqr(ups[layer], seg, fractions, len(S.labels))
        np.testing.assert_array_equal(d.thresholds(layer), np.array([r[0] for r in ref], dtype=np.float32))
        np.testing.assert_array_equal(d.array(layer, "iqr_concept"), [r[1] for r in ref])
        np.testing.assert_allclose(d.array(layer, "iqr"), [r[2] for r in ref], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(d.array(layer, "iqr_fraction"), [r[3] for r in ref])
        assert (d.array(layer, "iqr") > 0).any()
    # and the dissection counts at those levels on its own samples (seed 1)
    assert_counts_are_the_definition(d, G, S, layers, 30, 1)


def test_candidate_levels_are_ranked_values_on_the_grid():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5000, generator=g) * torch.tensor([[1.0], [0.01], [100.0]])
    f = iqr_fractions(100)
    c = candidate_levels(values, f)
    assert torch.equal(c.levels, c.grid.gather(1, c.index))
    w = (c.grid[:, 1] - c.grid[:, 0])[:, None]
    for u in range(3):
        above = (values[u][None] > c.levels[u][:, None]).double().mean(1)
        # the level is within half a grid step of the value with floor(f M) values above it
        top = values[u].sort(descending=True).values
        raw = top[(f * 5000).floor().long().clamp(max=4999)]
        assert ((c.levels[u] - raw).abs() <= w[u] / 2 + 1e-6).all()
        assert above[0] <= 0.002 and above[-1] > 0.99  # the top 0.1% ... everything


def test_iqr_rule_finds_the_planted_units_at_their_planted_level():
    G, S = gw.load_generator("planted", concepts=4, units=16), gw.load_segmenter("planted", concepts=4)
    # candidates from every pixel of the threshold set (40 x 40 blocks of one pixel)
    d = gw.dissect(G, S, ["layer1"], n_samples=150, batch_size=50, threshold="iqr", progress=False,
                   tuning=Tuning(threshold_samples=150, pilot_pixels=1600))
    names = ["red", "green", "blue", "yellow"]
    assert d.unit_labels("layer1")[:4] == names
    assert [S.labels[c] for c in d.array("layer1", "iqr_concept")[:4]] == names
    assert d.interpretable("layer1")[:4].all() and not d.interpretable("layer1")[4:].any()
    # the planted level: on the threshold set, the band where the cell's own values meet the rest
    # (upsampled, a cell's values are at least 0.625^2 (1 + ramp) inside; outside, at most
    # 0.375 (1 + ramp) next to a cell on the border, whose edge is clamped: the two overlap a little
    # across cells of different ramps, so no level separates them exactly); above it, the cell
    ups, seg = maps_and_labels(G, S, ["layer1"], 150, 2)
    masks = concept_masks(seg, len(S.labels))
    for j, name in enumerate(names):
        up, cell = ups["layer1"][:, j], masks[:, S.labels.index(name)]
        t = float(d.thresholds("layer1")[j])
        assert float(up[cell].min()) <= t <= float(up[~cell].max()), (name, t)
        assert d.array("layer1", "iqr_fraction")[j] == 0.01       # the cells cover 1% of the pixels
        M = up > t
        assert float((M & cell).sum() / (M | cell).sum()) > 0.96
        assert d.array("layer1", "iqr")[j] > 0.9
        assert d.iou("layer1")[j, S.labels.index(name)] > 0.95


def test_iqr_settings_and_cache_key(tmp_path):
    G, S = TinyGenerator(), TinySegmenter()
    kw = dict(n_samples=24, batch_size=8, pilot_samples=8, tuning=Tuning(threshold_samples=16), cache_dir=tmp_path)
    q = gw.dissect(G, S, ["layer2"], progress=False, **kw)
    i = gw.dissect(G, S, ["layer2"], threshold="iqr", progress=False, **kw)
    p = gw.dissect(G, S, ["layer2"], upsample="pnas", progress=False, **kw)
    keys = {q.settings["cache_key"], i.settings["cache_key"], p.settings["cache_key"]}
    assert len(keys) == 3
    assert (q.settings["threshold"], i.settings["threshold"], p.settings["upsample"]) == ("quantile", "iqr", "pnas")
    again = gw.dissect(G, S, ["layer2"], threshold="iqr", progress=False, **kw)  # loaded from the cache
    np.testing.assert_array_equal(again.array("layer2", "iqr"), i.array("layer2", "iqr"))
    # the defaults keep the keys of the results made before they were options
    assert q.settings["cache_key"] == gw.dissect(G, S, ["layer2"], n_samples=24, batch_size=8, pilot_samples=8,
                                                 progress=False).settings["cache_key"]


# -- upsampling conventions ----------------------------------------------------------------------
@pytest.mark.parametrize("h,w,H,W", [(4, 6, 16, 18), (3, 3, 8, 11), (1, 1, 8, 8), (5, 2, 5, 9)])
def test_conventions_in_closed_form(h, w, H, W):
    """r[i, j] = i + 1: iclr clamps the half-pixel position to the map; pnas continues the line
    toward 0 past the first row and past the last, and blends toward 0 past the side columns."""
    r = (torch.arange(h, dtype=torch.float32)[:, None] + 1).expand(h, w)[None, None].contiguous()

    def src(t, n, N):
        return (t + 0.5) * n / N - 0.5

    ty, tx = np.arange(H)[:, None], np.arange(W)[None, :]
    sy, sx = src(ty, h, H), src(tx, w, W)
    iclr = np.clip(sy, 0, h - 1) + 1 + 0 * sx
    line = np.where(sy <= h - 1, sy + 1, h * (h - sy))                    # rows: the line, then down to 0
    side = 1 - np.maximum(0, np.maximum(-sx, sx - (w - 1)))                # columns: 1, less past the sides
    pnas = line * side
    if (h, w) == (H, W):
        pnas = iclr
    np.testing.assert_allclose(upsample(r, (H, W))[0, 0].numpy(), iclr, atol=1e-5)
    np.testing.assert_allclose(upsample(r, (H, W), "pnas")[0, 0].numpy(), pnas, atol=1e-5)
    # the PNAS code's own computation (grid_sample, zeros padding, align_corners=True), where it runs
    if h > 1 and w > 1:
        def axis(n, N):
            s = N / n
            return torch.tensor((np.arange(N) - (0.5 * s - 0.5)) / s * 2 / (n - 1) - 1, dtype=torch.float32)
        gy, gx = torch.meshgrid(axis(h, H), axis(w, W), indexing="ij")
        ref = F.grid_sample(r, torch.stack([gx, gy], -1)[None], mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        torch.testing.assert_close(upsample(r, (H, W), "pnas"), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), (64, 64)), ((2, 2, 5, 7), (17, 30)), ((1, 2, 6, 6), (8, 8))])
def test_pnas_sparse_readers_agree_with_upsample(shape, size):
    """Negative maps blend up toward 0 at the border under pnas: the sparse readers still see it."""
    g = torch.Generator().manual_seed(sum(shape))
    r = torch.randn(*shape, generator=g) - 1.0
    up = upsample(r, size, "pnas")
    full, C = up.flatten(2), shape[1]
    for q in (0.0, 0.5, 0.99):
        low = torch.quantile(full.transpose(0, 1).reshape(C, -1), q, dim=1)
        n, c, pix, v = upsample_above(r, size, low, "pnas")
        assert n.numel() == int((full > low.view(1, -1, 1)).sum()) and torch.equal(full[n, c, pix], v)
    torch.testing.assert_close(upsample_max(r, size, "pnas"), full.amax(2), rtol=0, atol=1e-6)
    pixels = torch.randint(0, size[0] * size[1], (shape[0], 11), generator=g)
    assert torch.equal(upsample_pixels(r, size, pixels, "pnas"), full.gather(2, pixels[:, None].expand(-1, C, -1)))


# -- names and knobs -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(threshold="median"), "threshold must be one of 'quantile', 'iqr', got 'median'"),
    (dict(method="gpu"), "method must be one of 'auto', 'dense', 'tail', got 'gpu'"),
    (dict(upsample="nearest"), "upsample must be one of 'iclr', 'pnas', got 'nearest'"),
    (dict(tuning=Tuning(bins=64), bins=32), "bins is given twice"),
    (dict(threshold="iqr", seed=2), "separate set of samples"),
    (dict(tuning="fast"), "tuning must be an engine.tuning.Tuning"),
])
def test_bad_names_are_one_line_errors(kw, message):
    with pytest.raises(ValueError) as e:
        gw.dissect(TinyGenerator(), TinySegmenter(), ["layer2"], n_samples=8, progress=False, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_tuning_checks_its_knobs():
    with pytest.raises(ValueError, match="bins must be an integer >= 16 and <= 1024, got 4"):
        Tuning(bins=4)
    with pytest.raises(ValueError, match="threshold_samples must be None"):
        Tuning(threshold_samples=0)
    d = gw.dissect(TinyGenerator(), TinySegmenter(), ["layer2"], n_samples=16, batch_size=8, progress=False,
                   tuning=Tuning(bins=64, pilot_samples=8))
    assert (d.settings["bins"], d.settings["pilot_samples"]) == (64, 8)


# -- the dense path on the device ----------------------------------------------------------------
class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values on the host (a device synchronisation on a GPU)."""
    NAMES = {"__bool__", "item", "tolist", "nonzero", "numpy", "cpu", "bincount", "masked_select", "unique",
             "__int__", "__float__", "any", "all"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and not (name in ("any", "all") and args and args[0].dim() > 0) and not self._skipped():
            self.calls.append(name)
        if name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dtype == torch.bool:
            self.calls.append("boolean index")
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _skipped():
        """engine.concept_stats picks its CPU branch (bincount) by the tensor's device itself, which
        devices.on_host does not switch; on a GPU it scatters (tested in its own tests)."""
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename.endswith("concept_stats.py"):
                return True
            f = f.f_back
        return False


def test_dense_path_reads_nothing_on_the_host_per_batch(monkeypatch, tmp_path):
    """With the branches a GPU takes (bincount as a scatter, interpolation by selection,
    segmentations kept on the device and written to the cache behind), the host reads of a dense
    dissection do not grow with its batches (4 batches, then 12): none in the counting loop, only
    per run and per pass; and the result is the CPU path's."""
    from gandissect_widgets.engine import devices
    monkeypatch.setattr(devices, "on_host", lambda device: False)
    G, S = TinyGenerator(), TinySegmenter()
    counts = []
    for n in (32, 96):
        mode = _HostReads()
        with mode:
            d = gw.dissect(G, S, ["layer2"], n_samples=n, batch_size=8, pilot_samples=8, method="dense", lanes=1,
                           progress=False, cache_dir=tmp_path / str(n))
        counts.append(len(mode.calls))
    assert counts[0] == counts[1], counts
    monkeypatch.undo()
    ref = gw.dissect(G, S, ["layer2"], n_samples=96, batch_size=8, pilot_samples=8, progress=False)
    for k in COUNTS:
        np.testing.assert_array_equal(d.array("layer2", k), ref.array("layer2", k), err_msg=k)


class NaNLater(TinyGenerator):
    """NaN images for the samples with z[0] > 2 (21, 32, 47, 53 of seed 1: past the pilot)."""

    def forward(self, z):
        x = super().forward(z)
        return torch.where((z[:, 0] > 2.0)[:, None, None, None], torch.full_like(x, math.nan), x)


def test_dense_path_raises_non_finite_values_after_the_pass(tmp_path):
    G = NaNLater()
    bad = np.nonzero(G.sample_z(64, 1)[:, 0].numpy() > 2.0)[0]
    assert bad.size and bad.min() >= 8
    with pytest.raises(NonFiniteError) as e:
        gw.dissect(G, TinySegmenter(), ["layer2"], n_samples=64, batch_size=8, pilot_samples=8, method="dense",
                   progress=False, cache_dir=tmp_path)
    msg = str(e.value)
    first = int(bad.min()) // 8 * 8
    assert f"for samples {first}..{first + 7}: images" in msg and "\n" not in msg
    # the counts that took the NaN in were not kept for a resume
    assert not list(tmp_path.rglob("checkpoint.pt"))


# -- the position baseline's counts ----------------------------------------------------------------
def test_concept_positions_are_counted_once_per_sample_and_resume(tmp_path, monkeypatch):
    """The sampling stage counts where each concept sits (engine.concept_stats) over the samples the
    dissection counted, each once; a resumed run ends with the same counts."""
    from gandissect_widgets.engine import dissection as D
    G, S = TinyGenerator(), TinySegmenter(half=True, channels=2)
    # (the pilot ends inside a batch of the main pass, which segments those samples again)
    kw = dict(n_samples=48, batch_size=8, pilot_samples=12, progress=False, checkpoint_every=0)
    clean = gw.dissect(G, S, ["layer2"], **kw)
    _, seg = maps_and_labels(G, S, ["layer2"], 48, 1)
    counts, samples = clean.concept_positions
    np.testing.assert_array_equal(counts, concept_masks(seg, len(S.labels)).sum(0).numpy())
    assert samples == 48 and clean.has_position_baseline
    np.testing.assert_array_equal(counts.sum((1, 2))[1:], clean.array("layer2", "concept_pixels")[1:])
    real, calls = D._Run.save_checkpoint, [0]

    def interrupted(self):
        real(self)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(D._Run, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gw.dissect(G, S, ["layer2"], cache_dir=tmp_path, **kw)
    monkeypatch.undo()
    assert list(tmp_path.rglob("checkpoint.pt"))
    resumed = gw.dissect(G, S, ["layer2"], cache_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.concept_positions[0], counts)
    assert resumed.concept_positions[1] == 48


# -- the ICLR code's second interpretability condition: IQR at the unit's threshold ---------------
def brute_force_table_iqr(M, C):
    """IQR = I(M; C) / H(M, C) of two boolean arrays, from the joint distribution counted directly."""
    M, C = M.reshape(-1), C.reshape(-1)
    p = {(a, b): float(np.mean((M == a) & (C == b))) for a in (True, False) for b in (True, False)}
    pm, pc = {a: float(np.mean(M == a)) for a in (True, False)}, {b: float(np.mean(C == b)) for b in (True, False)}
    mi = sum(v * math.log(v / (pm[a] * pc[b])) for (a, b), v in p.items() if v > 0)
    je = -sum(v * math.log(v) for v in p.values() if v > 0)
    return max(mi, 0.0) / je if je > 0 else 0.0


def test_iqr_at_threshold_against_a_brute_force():
    """readout.iqr_at_threshold from a result's counts is MI / JE of (mask at the unit's threshold,
    concept) over the dissection's samples, counted directly; on small data and through dissect."""
    from gandissect_widgets.engine.readout import iqr_at_threshold
    g = torch.Generator().manual_seed(3)
    up = torch.randn(4, 3, 6, 5, generator=g)
    seg = torch.randint(0, 4, (4, 2, 6, 5), generator=g)
    seg[:, :, :2] = 3  # concept 3 sits where unit 2 is high: a unit that tells something
    up[:, 2, :2] += 2
    t = torch.tensor([0.5, -3.0, 1.0])  # unit 1's mask is every pixel: no information
    c = count_at(up, seg, t, 4)
    got = iqr_at_threshold(c["intersection"].numpy(), c["mask_pixels"].numpy(), c["concept_pixels"].numpy(),
                           c["n_pixels"].numpy())
    masks = concept_masks(seg, 4).numpy()
    for u in range(3):
        for k in range(1, 4):
            ref = brute_force_table_iqr(up[:, u].numpy() > float(t[u]), masks[:, k])
            assert abs(got[u, k] - ref) < 1e-12, (u, k)
    assert (got[:, 0] == 0).all() and (got[1] == 0).all() and got[2, 3] == got.max() > 0.1
    G, S = TinyGenerator(), TinySegmenter()
    d = gw.dissect(G, S, ["layer2"], n_samples=12, batch_size=4, progress=False)
    ups, seg = maps_and_labels(G, S, ["layer2"], 12, 1)
    masks = concept_masks(seg, len(S.labels)).numpy()
    got = iqr_at_threshold(*(d.array("layer2", k) for k in ("intersection", "mask_pixels", "concept_pixels",
                                                           "n_pixels")))
    for u in range(got.shape[0]):
        for k in range(1, len(S.labels)):
            ref = brute_force_table_iqr(ups["layer2"][:, u].numpy() > float(d.thresholds("layer2")[u]), masks[:, k])
            assert abs(got[u, k] - ref) < 1e-9, (u, k)


def test_min_iqr_rules_out_masks_that_tell_nothing():
    """IoU alone calls a unit that fires on half of every image, wherever a concept on a tenth of
    the pixels is, a concept unit (IoU 0.09 > 0.04); the ICLR code's second condition (IQR > 0.01)
    does not.  Planted units pass both, under either threshold rule."""
    from gandissect_widgets.engine.readout import DEFAULT_MIN_IQR, interpretable, iqr_at_threshold
    assert DEFAULT_MIN_IQR == 0.01
    P = 1000  # unit 0: independent of the concept; unit 1: the concept's own mask
    iqr = iqr_at_threshold(np.array([[0, 50], [0, 100]]), np.array([500, 100]), np.array([0, 100]), P)
    iou = np.array([50 / 550, 1.0])
    assert abs(iqr[0, 1]) < 1e-12 and abs(iqr[1, 1] - 1) < 1e-12
    assert interpretable(iou).tolist() == [True, True]
    assert interpretable(iou, unit_iqrs=iqr[:, 1]).tolist() == [False, True]
    assert interpretable(iou, 0.04, iqr[:, 1], min_iqr=-1).tolist() == [True, True]
    G, S = gw.load_generator("planted", concepts=4, units=16), gw.load_segmenter("planted", concepts=4)
    d = gw.dissect(G, S, ["layer1"], n_samples=100, batch_size=50, progress=False)
    q = iqr_at_threshold(*(d.array("layer1", k) for k in ("intersection", "mask_pixels", "concept_pixels",
                                                         "n_pixels")))
    unit_iqr = q[np.arange(16), d.unit_label_ids("layer1")]
    assert (unit_iqr[:4] > 0.5).all()
    assert interpretable(d.unit_ious("layer1"), unit_iqrs=unit_iqr).tolist() == [True] * 4 + [False] * 12
    # the result asks the same, and only when told to
    assert d.interpretable("layer1", min_iqr=DEFAULT_MIN_IQR).tolist() == [True] * 4 + [False] * 12
    assert not d.interpretable("layer1", min_iqr=1.0).any()  # no IQR exceeds 1
    assert (d.interpretable("layer1") == (d.unit_ious("layer1") > 0.04)).all()
