"""The pieces of the fast dissection: the column reader of the tail, exact binning on grid edges,
the pilot's window, and layers side by side, each against brute force."""
import math

import numpy as np
import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets.engine.sidebyside import SideBySide
from gandissect_widgets.engine.stats import (TailHistogram, dedupe_channels, grid_edges, label_keys, pilot_edges,
                                             pilot_window)
from gandissect_widgets.engine.upsample import upsample, upsample_columns
from tiny import TinyGenerator, TinySegmenter


def _maps(shape, seed, special=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*shape, generator=g)
    r[0, 0] = 0.5  # a flat map
    if special and shape[2] > 2 and shape[3] > 2:
        r[-1, -1, 1, 2] = math.inf
        r[-1, 0, 2, 1] = -math.inf
        r[0, -1, 1, 1] = math.nan
    return r


@pytest.mark.parametrize("shape,size", [((3, 5, 8, 8), (64, 64)), ((2, 4, 16, 16), (64, 64)), ((2, 3, 7, 5), (32, 30)),
                                        ((2, 3, 9, 10), (31, 64)), ((2, 3, 64, 48), (24, 20)), ((1, 2, 1, 1), (8, 8)),
                                        ((2, 3, 6, 6), (6, 6)), ((2, 4, 13, 3), (100, 11))])
@pytest.mark.parametrize("special", [False, True])
def test_columns_hold_every_pixel_above_the_floor_once(shape, size, special):
    """Every slot of a column is the upsampled value of its pixel, bit for bit (or -inf past a
    short column); every pixel above the floor is in exactly one column.  Integer and uneven
    scales, many row patterns (weights gathered), shrinking, inf and NaN sources."""
    r = _maps(shape, sum(shape) + size[0], special)
    C = shape[1]
    full = upsample(r, size).flatten(2)                            # (N,C,H*W)
    H, W = size
    for q in (0.0, 0.9, 0.99):
        finite = full.nan_to_num(nan=-math.inf)
        low = torch.quantile(finite.transpose(0, 1).reshape(C, -1).clamp(-1e30, 1e30), q, dim=1)
        cols = upsample_columns(r, size, low)
        P, Mc = cols.values.shape
        assert cols.finite == bool(torch.isfinite(r).all())
        assert torch.equal(cols.units, cols.maps % C)
        slots = cols.pixels[None] + torch.arange(P)[:, None] * cols.stride     # (P,Mc) pixels of (N,H,W)
        real = cols.values != -math.inf
        n = torch.div(slots, H * W, rounding_mode="floor")
        assert bool((n[real] == (cols.maps // C).expand(P, -1)[real]).all())   # a column stays in its map
        ref = full[n[real], cols.units.expand(P, -1)[real], slots[real] % (H * W)]
        got = cols.values[real]
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got[~torch.isnan(got)], ref[~torch.isnan(ref)])          # the same bits
        above = full > low.view(1, -1, 1)
        hit = cols.values > low[cols.units][None]
        key = (cols.maps // C * C + cols.units)[None].expand(P, -1)[hit] * (H * W) + slots[hit] % (H * W)
        assert key.numel() == int(above.sum()) == key.unique().numel()


def _brute_bins(edges, units, vals):
    """The number of (float32) edges below each value, compared exactly."""
    return (edges[units].double() < vals.double()[:, None]).sum(1)


@pytest.mark.parametrize("lo,hi", [(2.0, 2.3), (0.0, 1.0), (-0.3, 0.2), (-5.0, -4.9), (1e-30, 3e-30),
                                   (1e30, 1.01e30), (0.25, 0.25), (-1e-3, 1e-3)])
def test_grid_edges_bin_exactly(lo, hi):
    """On power-of-two grid edges a value's bin is exact arithmetic: values on an edge, one ulp
    either side, zero and tiny values around an edge at 0, float16 and float64 values, per value
    and per column (the dense path, where values below the lowest edge fall in bin 0)."""
    B = 64
    los, his = torch.tensor([lo, lo * 0.5 - 1.0]), torch.tensor([hi, hi * 0.5 - 0.5])
    edges = grid_edges(los, his, B)
    e = edges.double()
    w = e[:, 1] - e[:, 0]
    assert bool((torch.frexp(w).mantissa == 0.5).all())               # powers of two
    assert bool(((e[:, 0] <= los.double()) & (e[:, -1] >= his.double())).all())   # they cover [lo, hi]
    assert torch.equal(e, e[:, :1] + w[:, None] * torch.arange(B, dtype=torch.float64))
    h = TailHistogram(edges, 3)
    assert h._all_grid
    g = torch.Generator().manual_seed(int(abs(lo) * 1000) % 1000 + B)
    u = torch.arange(2).repeat_interleave(3 * B)
    at = edges[u, torch.arange(B).repeat(6)]
    up, down = at.nextafter(torch.tensor(math.inf)), at.nextafter(torch.tensor(-math.inf))
    span = (edges[:, -1] - edges[:, 0])[u]
    vals = torch.cat([at, up, down, edges[u, 0] + (torch.rand(u.numel(), generator=g) * 1.2 - 0.1) * span,
                      torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-38, math.inf, -math.inf])])
    units = torch.cat([u, u, u, u, torch.zeros(7, dtype=torch.long)])
    for dtype in (torch.float32, torch.float16, torch.float64):
        v = vals.to(dtype)
        keep = (v.double() > edges[units, 0].double()) & ~torch.isinf(v)
        assert torch.equal(h.bin_of(v[keep], units[keep]), _brute_bins(edges, units[keep], v[keep]))
    # the dense path: columns of one unit each, below-floor values in bin 0, ends clamped
    for dtype in (torch.float32, torch.float16):
        v = vals.to(dtype).float()
        for unit in (0, 1):
            col = v[units == unit][:, None].repeat(1, 2)        # (P, 2): two columns of that unit
            got = h._bins(col, torch.tensor([unit, unit]), True).clamp(0, B)
            ref = _brute_bins(edges, torch.full((col.shape[0],), unit), col[:, 0])
            assert torch.equal(got[:, 0].long(), ref) and torch.equal(got[:, 1].long(), ref)


@pytest.mark.parametrize("channels,special", [(1, False), (2, False), (1, True)])
def test_columns_counted_equal_the_whole_maps_counted(channels, special):
    """A histogram fed the reader's columns holds exactly the counts of one fed the whole
    upsampled maps (labels in one or two channels; inf and NaN sources)."""
    g = torch.Generator().manual_seed(channels)
    r = _maps((6, 5, 8, 8), 11, special)
    size = (32, 32)
    seg = dedupe_channels(torch.randint(0, 4, (6, channels) + size, generator=g), 4)
    up = upsample(r, size)
    finite = up.nan_to_num(nan=-math.inf).clamp(-1e30, 1e30).transpose(0, 1).reshape(5, -1)
    edges = pilot_edges(finite, 0.95, 40, window=(0.04, 0.02))
    dense, columns = TailHistogram(edges, 4), TailHistogram(edges, 4)
    dense.add(up.nan_to_num(nan=-math.inf), seg)
    cols = upsample_columns(r, size, edges[:, 0])
    columns.count_pixels(seg)
    columns.add_columns(cols.values, cols.units, cols.pixels, cols.stride, label_keys(seg, 40, 4), cols.finite)
    for k in ("n_pixels", "hist", "joint", "concept_pixels"):
        assert torch.equal(getattr(columns, k), getattr(dense, k)), k
    assert int(dense.hist.sum()) > 0


def _population(units, samples, pixels, seed):
    """Activations with a known structure: each unit fires on a fraction (20% to 90%) of the
    samples, strongly where it fires, so the samples' fractions above the quantile vary a lot."""
    g = torch.Generator().manual_seed(seed)
    fires = torch.rand(units, samples, 1, generator=g) < torch.linspace(0.2, 0.9, units)[:, None, None]
    strength = torch.rand(units, samples, 1, generator=g) * 3
    return torch.randn(units, samples, pixels, generator=g) + fires * strength


@pytest.mark.parametrize("seen", [200, 100])
def test_pilot_window_holds_the_quantile(seen):
    """The window from a pilot of ``seen`` samples (S random pixels each) holds the 0.99 quantile
    of all 200 samples for every unit; a pilot that saw every sample needs a narrower window.
    (A pilot that sees too few of the samples a unit fires on can miss: refinement repairs it,
    see test_refinement_when_pilot_is_unrepresentative.)"""
    units, samples, pixels, S = 40, 200, 1024, 32
    acts = _population(units, samples, pixels, seed=seen)
    q = 0.99
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, pixels, (seen, S), generator=g)
    pilot = acts[:, torch.arange(seen)[:, None], idx]                     # (U, seen, S)
    flat = pilot.reshape(units, -1)
    q_hat = flat.kthvalue(int(round(q * (flat.shape[1] - 1))) + 1, dim=1).values
    fractions = (pilot > q_hat[:, None, None]).float().mean(2)
    half = pilot_window(fractions, S, samples, pixels)
    rank = (acts.reshape(units, -1) > q_hat[:, None]).double().mean(1)    # true fraction above the pilot's value
    assert bool(((rank - (1 - q)).abs() <= half).all()), ((rank - (1 - q)).abs() / half).max()
    if seen == samples:
        wide = pilot_window(fractions[:, :50], S, samples, pixels)
        assert float(half.mean()) < float(wide.mean())
    edges = pilot_edges(pilot, q, 64, population=samples, pixels=pixels)
    exact = acts.reshape(units, -1).double().quantile(q, dim=1)
    assert bool(((edges[:, 0] <= exact) & (edges[:, -1] >= exact)).all())   # the edges hold it too


def test_side_by_side_runs_everything_once_and_restores_threads():
    before = torch.get_num_threads()
    seen = {}
    with SideBySide("cpu") as side:
        side.cores = 2  # as on a 2-core machine, whatever this one has
        side.run(lambda item: seen.__setitem__(item, torch.get_num_threads()), list(range(7)), [7, 1, 1, 1, 1, 1, 1])
        assert sorted(seen) == list(range(7)) and set(seen.values()) == {1}
        assert torch.get_num_threads() == before
        done = []

        def fail(item):
            if item == 0:
                raise RuntimeError("boom")
            done.append(item)

        with pytest.raises(RuntimeError, match="boom"):
            side.run(fail, [0, 1, 2, 3], [4, 1, 1, 1])
        assert sorted(done) == [1, 2, 3]  # the others finished before the error came out
        assert torch.get_num_threads() == before
    assert SideBySide("meta").cores == 1  # off the CPU, work runs in turn


def test_ahead_yields_in_order_with_lanes_working_ahead():
    import threading
    before = torch.get_num_threads()
    lock, busy, most, where = threading.Lock(), [0], [0], {}
    second = threading.Event()

    def work(item):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        if item == 1:
            second.set()
        if item == 0:  # item 0 ends only once item 1 has started: both lanes work at once
            assert second.wait(30)
        where[item] = (threading.get_ident(), torch.get_num_threads())
        with lock:
            busy[0] -= 1
        if item == 5:
            raise RuntimeError("boom at 5")
        return item * item

    with SideBySide("cpu") as side:
        side.cores, side.lanes = 2, 2  # as on a 2-core machine, whatever this one has
        got = []
        with pytest.raises(RuntimeError, match="boom at 5"):
            for out in side.ahead(work, range(9)):
                got.append(out)
        assert got == [i * i for i in range(5)]   # in order, up to the failing item
        assert busy[0] == 0 and most[0] == 2       # two at once, never more; none is left working
        assert set(where) <= set(range(7)) and {n for _, n in where.values()} == {1}
        assert threading.get_ident() not in {t for t, _ in where.values()}
        assert torch.get_num_threads() == before
        stream = side.ahead(work, range(20, 30))
        assert next(stream) == 400
        stream.close()                             # stopping early waits for the work in flight
        assert busy[0] == 0 and len([i for i in where if i >= 20]) <= 3

        def nested(item):  # a lane's work that asks for more runs it in its own thread, no deadlock
            inner = []
            side.run(lambda i: inner.append(threading.get_ident()), [1, 2, 3])
            return set(inner) == {threading.get_ident()} and list(side.ahead(lambda i: -i, [1, 2])) == [-1, -2]

        runner = threading.Thread(target=lambda: got.append(list(side.ahead(nested, range(4)))), daemon=True)
        runner.start()
        runner.join(60)
        assert not runner.is_alive() and got[-1] == [True] * 4
        side.lanes = 1                             # one lane: in the caller's thread, one at a time
        where.clear()
        assert list(side.ahead(work, [1, 2])) == [1, 4]
        assert {t for t, _ in where.values()} == {threading.get_ident()}


def test_dissection_does_not_depend_on_threads():
    G, S = TinyGenerator(), TinySegmenter(channels=2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads, lanes in ((1, 1), (2, 1), (2, 2), (3, 3)):
            torch.set_num_threads(threads)  # the main pass runs forward passes (pilot of 40 < 96 samples)
            results.append(gw.dissect(G, S, ["layer1", "layer2", "layer3"], n_samples=96, seed=4, batch_size=16,
                                      progress=False, pilot_samples=40, lanes=lanes))
    finally:
        torch.set_num_threads(before)
    a = results[0]
    for b in results[1:]:
        for layer in a.layers:
            for name in ("iou", "thresholds", "topk_indices", "topk_values", "intersection", "mean", "std"):
                np.testing.assert_array_equal(a.array(layer, name), b.array(layer, name), err_msg=f"{layer} {name}")
