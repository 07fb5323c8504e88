"""``dissect()``: per-unit thresholds and dataset-level IoU for several layers in one pass.

How the passes go (n samples, batches of b, layers L1..Lm):
1. Probe: one latent through the generator, to check shapes and find which requested layer runs last.
2. Pilot: the first ``pilot_samples`` samples run through the generator and the segmenter; each
   unit's upsampled activations at ``pilot_pixels`` pixels per sample (one random pixel in each
   block of a grid) place that unit's histogram edges around the target quantile, in a window as
   wide as the pilot's own error needs (``stats.pilot_window``: narrow when the pilot saw every
   sample).  Their segmentations are cached (on disk, ``uint8``/``int16``), never redone; their
   activations are kept (up to ``_PILOT_CACHE_BYTES``) for the main pass.
3. Main pass: every sample once through the generator (cut short after the last requested layer
   where its segmentation is already cached) and the segmenter, or from the pilot's activations;
   all layers accumulate moments, top-k and a tail histogram joint with the labels
   (``engine.stats``), reading only the interpolation columns that can reach the histogram
   (``upsample.upsample_columns``).  On a CPU the layers run side by side on its cores, and
   ``lanes`` batches go through the models at once, ahead of the statistics, which are still
   counted batch by batch in order (``engine.sidebyside``).  A checkpoint is written every
   ``checkpoint_every`` seconds and when an exception leaves the statistics whole.
4. Read-out: each unit's threshold is the histogram edge whose fraction of pixels above is nearest
   to ``1 - quantile``; its IoU with every concept is exact at that threshold.  Units whose edge
   misses the target rank by more than ``rank_tolerance`` (a pilot that was not representative)
   get new edges inside the bin that holds the target, and their layers are replayed from the
   kept activations, or from the cached latents and segmentations (generator only), until they
   meet it.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import zlib

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine.hooks import ThreadTraces, TraceDict, resolve_layers
from gandissect_widgets.engine.io import atomic_torch_save, cache_key
from gandissect_widgets.engine.protocols import (ProtocolError, check_generator, check_images,
                                                 check_segmenter, fingerprint, model_device,
                                                 sample_latents, segment)
from gandissect_widgets.engine.results import Dissection
from gandissect_widgets.engine.sidebyside import SideBySide
from gandissect_widgets.engine.stats import (MAX_BINS, RunningMoments, RunningTopK, TailHistogram,
                                             dedupe_channels, grid_edges, label_keys, pilot_edges)
from gandissect_widgets.engine.upsample import upsample_columns, upsample_max, upsample_pixels

__all__ = ["dissect", "ENGINE_VERSION"]

# 2: pilot window (0.01, 0.008) below/above the quantile; 3: evenly spaced edges, window
# (0.005, 0.004), pilot of 512 samples x 64 pixels; 4: edges on a power-of-two grid, a window
# sized per unit from the pilot's own error, pilot pixels one in each block of an 8 x 8 grid
ENGINE_VERSION = 4
_CHUNK_ELEMENTS = 1 << 25  # upsampled values (at most) held at once per layer
_PILOT_CACHE_BYTES = 256 << 20  # raw pilot activations kept for the main pass, at most


def dissect(generator, segmenter, layers, n_samples: int = 1000, seed: int = 1, quantile: float = 0.99,
            batch_size: int = 32, device=None, cache_dir=None, topk: int = 20, bins: int = 128,
            pilot_samples: int = 512, pilot_pixels: int = 64, rank_tolerance: float = 5e-4,
            checkpoint_every: float = 60.0, progress: bool = True, lanes: int = 2,
            generator_name: str | None = None, segmenter_name: str | None = None) -> Dissection:
    """Dissect ``layers`` of ``generator`` against ``segmenter`` over ``n_samples`` latents.

    Returns a ``Dissection``.  Thresholds are the ``quantile`` of each unit's upsampled activations
    over all pixels of all samples, read within ``rank_tolerance`` of the target rank (units with a
    point mass at the quantile, such as dead units, cannot be and are flagged by ``fraction_above``).
    ``cache_dir``: results are kept in ``cache_dir/dissect-<key>/`` where the key hashes everything
    that affects them (weights, layers, n_samples, seed, quantile, topk, bins, pilot settings);
    the same call loads instead of recomputing, and an interrupted run resumes from its checkpoint.
    The generator (and a Module segmenter) are moved to ``device`` and put in eval mode.
    ``lanes``: on a CPU, how many batches go through the generator and the segmenter at once, each
    in its own thread with its share of the cores, ahead of the statistics (on 2 cores, two
    forward passes on one core each run faster than one on both); each lane holds a batch's
    memory, so ``lanes=1`` uses the least.  The models must not keep state between calls.
    Statistics are counted in the same order whatever it is (results are bit for bit the same on
    the test models and SceneWorld).  Off the CPU batches run in turn.
    """
    layers = _check_args(generator, segmenter, layers, n_samples, seed, quantile, batch_size, topk, bins,
                         pilot_samples, pilot_pixels, lanes)
    device = torch.device(device) if device is not None else model_device(generator)
    generator.to(device).eval()
    if isinstance(segmenter, torch.nn.Module):
        segmenter.to(device).eval()
    labels = list(segmenter.labels)
    settings = dict(generator=generator_name or type(generator).__name__,
                    segmenter=segmenter_name or type(segmenter).__name__,
                    generator_fingerprint=fingerprint(generator), segmenter_fingerprint=fingerprint(segmenter),
                    layers=list(layers), n_samples=int(n_samples), seed=int(seed), quantile=float(quantile),
                    topk=int(topk), bins=int(bins), pilot_samples=int(pilot_samples),
                    pilot_pixels=int(pilot_pixels), rank_tolerance=float(rank_tolerance),
                    engine_version=ENGINE_VERSION)
    key_parts = {k: v for k, v in settings.items() if k not in ("generator", "segmenter")}
    key = cache_key(**key_parts)
    settings["cache_key"] = key

    result_dir = work_dir = None
    if cache_dir is not None:
        result_dir = os.path.join(os.fspath(cache_dir), f"dissect-{key}")
        if os.path.exists(os.path.join(result_dir, "dissect.json")):
            return Dissection.load(result_dir)
        work_dir = os.path.join(result_dir, "work")
        os.makedirs(work_dir, exist_ok=True)
    else:
        work_dir = tempfile.mkdtemp(prefix="gandissect-")
    try:
        run = _Run(generator, segmenter, layers, labels, n_samples, seed, quantile, batch_size, device, topk,
                   bins, pilot_samples, pilot_pixels, rank_tolerance, checkpoint_every, progress, work_dir, key, lanes)
        arrays = run.execute()
        result = Dissection(labels, arrays, settings)
        if result_dir is not None:
            result.save(result_dir)
            shutil.rmtree(work_dir, ignore_errors=True)
        return result
    finally:
        if result_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _check_args(G, S, layers, n_samples, seed, quantile, batch_size, topk, bins, pilot_samples, pilot_pixels, lanes):
    check_generator(G)
    check_segmenter(S)
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers or [])
    if not layers:
        raise ValueError("give at least one layer to dissect")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeated in {layers}")
    resolve_layers(G, layers)
    for name, val, lo, hi in (("n_samples", n_samples, 1, None), ("batch_size", batch_size, 1, None),
                              ("topk", topk, 1, None), ("bins", bins, 16, MAX_BINS),
                              ("pilot_samples", pilot_samples, 1, None), ("pilot_pixels", pilot_pixels, 16, None),
                              ("lanes", lanes, 1, None)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo or (hi and val > hi):
            raise ValueError(f"{name} must be an integer >= {lo}{f' and <= {hi}' if hi else ''}, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(quantile, (float, int)) and 0.5 <= quantile < 1):
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile!r} (0.99 = top 1%)")
    return layers


class _LayerStats:
    def __init__(self, units, k, device):
        self.moments = RunningMoments(units, device)
        self.topk = RunningTopK(units, k, device)
        self.hist: TailHistogram | None = None

    def state_dict(self):
        return {"moments": self.moments.state_dict(), "topk": self.topk.state_dict(),
                "hist": self.hist.state_dict() if self.hist is not None else None}

    @classmethod
    def from_state_dict(cls, sd, device):
        self = cls.__new__(cls)
        self.moments = RunningMoments.from_state_dict(sd["moments"], device)
        self.topk = RunningTopK.from_state_dict(sd["topk"], device)
        self.hist = TailHistogram.from_state_dict(sd["hist"], device) if sd["hist"] is not None else None
        return self


def _unit_chunks(r, size):
    """Unit ranges [u0, u1) of a (N,U,h,w) activation whose upsampled maps fit the chunk size."""
    N, U = r.shape[:2]
    per = max(1, _CHUNK_ELEMENTS // max(1, N * size[0] * size[1]))
    return [(u0, min(u0 + per, U)) for u0 in range(0, U, per)]


def _column_maxima(cols, low, shape):
    """(N,C) maxima of the maps with values above ``low`` (C,), from ``upsample_columns``' columns
    (every such value lies in one, so the largest one read is the map's: the same bits); -inf
    for the other maps."""
    out = torch.full((shape[0] * shape[1],), -math.inf, device=cols.values.device)
    out = out.scatter_reduce_(0, cols.maps, cols.values.amax(0), "amax").view(shape)
    return torch.where(out > low.to(out)[None], out, torch.full((), -math.inf, device=out.device))


def _sample_maxima(r, size, topk, known, raw):
    """(N,U) per-sample maxima of the upsampled maps where they can enter ``topk``: ``known``
    holds those of the maps with values above the histogram floor (read from the tail, so the
    same bits); the others are computed only if the raw maximum ``raw`` (a bound on the upsampled
    one, up to rounding) reaches the k-th value kept so far, or the k-th known one of this batch
    (which is above the floor, so above every map without values there); -inf where a map cannot
    enter."""
    bar = topk.kth()
    if known.shape[0] >= topk.k:
        bar = torch.maximum(bar, known.topk(topk.k, dim=0).values[-1])
    n, u = torch.nonzero((known == -math.inf) & (raw + raw.abs() * 1e-6 >= bar[None]), as_tuple=True)
    per = max(1, _CHUNK_ELEMENTS // max(1, size[0] * size[1]))
    for i in range(0, n.numel(), per):
        nn, uu = n[i:i + per], u[i:i + per]
        known[nn, uu] = upsample_max(r[nn, uu][:, None], size)[:, 0]
    return known


class _Run:
    def __init__(self, G, S, layers, labels, n, seed, quantile, batch_size, device, k, bins, pilot_samples,
                 pilot_pixels, tol, checkpoint_every, progress, work_dir, key, lanes):
        self.G, self.S, self.layers, self.labels = G, S, layers, labels
        self.n, self.seed, self.q, self.bs, self.device = int(n), int(seed), float(quantile), int(batch_size), device
        self.k, self.bins, self.tol = int(k), int(bins), float(tol)
        self.n_pilot, self.pilot_pixels = min(int(pilot_samples), self.n), int(pilot_pixels)
        self.checkpoint_every, self.progress, self.lanes = checkpoint_every, progress, int(lanes)
        self.work_dir, self.key = work_dir, key
        self.ckpt_path = os.path.join(work_dir, "checkpoint.pt")
        self.seg_path = os.path.join(work_dir, "segmentation.npy")
        self.C = len(labels)
        self.z = sample_latents(G, self.n, self.seed)
        self.segmented = 0
        self.seg_cache = None
        self.seg_grid = None
        self.stats: dict[str, _LayerStats] = {}
        self.next_batch = 0
        self.edges: dict[str, torch.Tensor] | None = None
        self.cache: dict[int, dict[str, torch.Tensor]] = {}  # the pilot's kept activations, by first sample

    # -- forward ------------------------------------------------------------------------------
    def probe(self):
        order, shapes = [], {}
        z = self.z[:1].to(self.device)

        def record(out, name):
            if name not in order:
                order.append(name)
            shapes[name] = tuple(out.shape) if torch.is_tensor(out) else None
            return out

        with torch.no_grad(), TraceDict(self.G, self.layers, retain_output=False, edit_output=record):
            x = self.G(z)
        check_images(x, 1)
        for name in self.layers:
            if name not in order:
                raise ProtocolError(f"layer {name!r} did not run in a forward pass of {type(self.G).__name__}")
            if shapes[name] is None or len(shapes[name]) != 4:
                raise ProtocolError(f"layer {name!r} outputs {shapes[name]}; dissection needs a convolutional "
                                    "feature map (N,C,h,w)")
        self.order = order
        self.stop_after = order[-1]
        self.units = {name: shapes[name][1] for name in self.layers}
        self.shapes = {name: shapes[name][1:] for name in self.layers}

    def compute(self, i0, i1, layers=None, need_seg=True):
        """Activations of ``layers`` for samples [i0, i1), their labels (N,K,H,W) on device, and
        whether the labels are new (the caller stores them, in order: this may run on a lane
        thread while the statistics of earlier samples are counted)."""
        layers = layers or self.layers
        z = self.z[i0:i1].to(self.device)
        cached = i1 <= self.segmented
        stop = None if (need_seg and not cached) else [l for l in self.order if l in layers][-1]
        with torch.no_grad():
            x, acts = self.traces.run(lambda: self.G(z), layers, stop_after=stop)
            seg = None
            if need_seg:
                if cached:
                    seg = self.cached_seg(i0, i1)
                else:
                    check_images(x, i1 - i0)
                    seg = segment(self.S, x)
        return acts, seg, need_seg and not cached

    def cached_seg(self, i0, i1):
        return torch.from_numpy(np.asarray(self.seg_cache[i0:i1]).astype(np.int64)).to(self.device)

    def _store_seg(self, i0, i1, seg):
        if self.seg_cache is None:
            dtype = np.uint8 if self.C <= 256 else (np.int16 if self.C <= 32767 else np.int32)
            shape = (self.n,) + tuple(seg.shape[1:])
            self.seg_cache = np.lib.format.open_memmap(self.seg_path, mode="w+", dtype=dtype, shape=shape)
            self.seg_grid = tuple(seg.shape[-2:])
        elif tuple(seg.shape[1:]) != self.seg_cache.shape[1:]:
            raise ProtocolError(f"segmenter output changed shape from {self.seg_cache.shape[1:]} to "
                                f"{tuple(seg.shape[1:])} between batches")
        self.seg_cache[i0:i1] = seg.cpu().numpy().astype(self.seg_cache.dtype)
        self.segmented = max(self.segmented, i1)

    def batches(self, start, stop):
        return [(i, min(i + self.bs, stop)) for i in range(start, stop, self.bs)]

    # -- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self):
        if self.seg_cache is not None:
            self.seg_cache.flush()
        atomic_torch_save(self.ckpt_path, {
            "key": self.key, "next_batch": self.next_batch, "segmented": self.segmented,
            "seg_grid": self.seg_grid, "edges": {k: v.cpu() for k, v in (self.edges or {}).items()} or None,
            "stats": {name: s.state_dict() for name, s in self.stats.items()}})

    def load_checkpoint(self):
        if not (os.path.exists(self.ckpt_path) and os.path.exists(self.seg_path)):
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception:
            return False
        if ck.get("key") != self.key:
            return False
        self.seg_cache = np.load(self.seg_path, mmap_mode="r+")
        self.segmented, self.next_batch = int(ck["segmented"]), int(ck["next_batch"])
        self.seg_grid = tuple(ck["seg_grid"]) if ck["seg_grid"] is not None else None
        if ck["edges"] is not None:
            self.edges = {k: v.to(self.device) for k, v in ck["edges"].items()}
        self.stats = {name: _LayerStats.from_state_dict(sd, self.device) for name, sd in ck["stats"].items()}
        return True

    # -- passes -------------------------------------------------------------------------------
    def execute(self):
        self.probe()
        resumed = self.load_checkpoint()
        pilot = [] if (resumed and self.edges is not None) else self.batches(0, self.n_pilot)
        main = self.batches(0, self.n)
        bar = tqdm(total=len(pilot) + len(main), desc="dissect", disable=not self.progress,
                   initial=min(self.next_batch, len(main)) if resumed and self.edges is not None else 0)
        with SideBySide(self.device, self.lanes) as self.side, ThreadTraces(self.G, self.layers) as self.traces:
            try:
                if pilot:
                    self.pilot_pass(pilot, bar)
                self.main_pass(main, bar)
            finally:
                bar.close()
            self.refine()
        self.cache = {}
        return self.readout()

    def pilot_pass(self, batches, bar):
        self.cache, self._held = {}, 0
        values = None
        start = time.monotonic()
        with contextlib.closing(self.side.ahead(lambda batch: self.compute(*batch), batches)) as ahead:
            for (i0, i1), (acts, seg, fresh) in zip(batches, ahead):
                if fresh:
                    self._store_seg(i0, i1, seg)
                if values is None:  # the segmentation grid is known from the first batch on
                    R, S = self.pilot_grid()
                    values = {name: torch.empty(self.units[name], self.n_pilot, R * S, device=self.device)
                              for name in self.layers}
                self.sample_pilot(i0, i1, acts, values)
                bar.update(1)
        H, W = self.seg_grid
        self.edges = {}

        def place(name):
            self.edges[name] = pilot_edges(values[name], self.q, self.bins, population=self.n, pixels=H * W)

        self.side.run(place, self.layers, [self.units[name] for name in self.layers])
        self.stats = {name: _LayerStats(self.units[name], self.k, self.device) for name in self.layers}
        for name in self.layers:
            self.stats[name].hist = TailHistogram(self.edges[name], self.C)
        self.next_batch = 0
        if time.monotonic() - start >= self.checkpoint_every:
            self.save_checkpoint()

    def pilot_grid(self):
        """The R x S blocks of the segmentation grid that each hold one pilot pixel per sample."""
        return tuple(min(round(math.sqrt(self.pilot_pixels)), n) for n in self.seg_grid)

    def sample_pilot(self, i0, i1, acts, values):
        """Keep the batch's activations for the main pass (while they fit) and write its pilot
        values: one random pixel in each block of each sample, independent pixels, spread out."""
        size = sum(a.numel() * a.element_size() for a in acts.values())
        if self._held + size <= _PILOT_CACHE_BYTES:  # the main pass reuses them
            self.cache[i0] = acts
            self._held += size
        H, W = self.seg_grid
        R, S = self.pilot_grid()
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{i0}".encode()))
        block = torch.rand(2, i1 - i0, R, S, generator=g)
        y = ((torch.arange(R)[:, None] + block[0]) * (H / R)).long().clamp(max=H - 1)
        x = ((torch.arange(S)[None, :] + block[1]) * (W / S)).long().clamp(max=W - 1)
        pixels = (y * W + x).reshape(i1 - i0, R * S).to(self.device)

        def sample(name):
            for u0, u1 in _unit_chunks(acts[name], self.seg_grid):
                values[name][u0:u1, i0:i1] = upsample_pixels(acts[name][:, u0:u1], self.seg_grid, pixels).transpose(0, 1)

        self.side.run(sample, self.layers, [self.units[name] for name in self.layers])

    def cached(self, i0, i1, layers):
        """Activations of samples [i0, i1) kept by the pilot, or None."""
        acts = self.cache.get(i0)
        if acts is None or i1 > self.segmented or acts[self.layers[0]].shape[0] != i1 - i0:
            return None
        return {name: acts[name] for name in layers}

    def main_pass(self, batches, bar):
        last = time.monotonic()
        H, W = self.seg_grid
        # batches the pilot kept are counted together, as many as one unit chunk holds; they stay
        # for refinement only if they are all the samples (else the forward passes to come need
        # their memory)
        group = max(self.bs, _CHUNK_ELEMENTS // max(self.units[name] * H * W for name in self.layers))
        keep = all(self.cached(i0, i1, self.layers) is not None for i0, i1 in batches)
        steps, b = [], self.next_batch  # (b, e, kept): kept batches b..e-1 counted together, or batch b run
        while b < len(batches):
            i0, e = batches[b][0], b
            while e < len(batches) and batches[e][1] - i0 <= group and self.cached(*batches[e], self.layers) is not None:
                e += 1
            steps.append((b, e, True) if e > b else (b, b + 1, False))
            b = steps[-1][1]

        def run(step):  # on a lane, ahead of the statistics
            return None if step[2] else self.compute(*batches[step[0]])

        with contextlib.closing(self.side.ahead(run, steps)) as ahead:
            for b, e, kept in steps:
                i0, i1 = batches[b][0], batches[e - 1][1]
                try:
                    out = next(ahead)
                    if kept:
                        parts = [self.cached(*batches[j], self.layers) for j in range(b, e)]
                        if not keep:
                            for j in range(b, e):
                                del self.cache[batches[j][0]]
                        acts = {name: torch.cat([a[name] for a in parts]) if len(parts) > 1 else parts[0][name]
                                for name in self.layers}
                        del parts
                        seg = self.cached_seg(i0, i1)
                    else:
                        acts, seg, fresh = out
                        if fresh:
                            self._store_seg(i0, i1, seg)
                except BaseException:
                    self.save_checkpoint()  # statistics are whole: nothing of these batches was added
                    raise
                self.accumulate(acts, seg, i0, i1, self.stats)
                del acts, seg, out
                bar.update(e - b)
                self.next_batch = e
                if time.monotonic() - last >= self.checkpoint_every and e < len(batches):
                    self.save_checkpoint()
                    last = time.monotonic()

    def accumulate(self, acts, seg, i0, i1, stats, moments=True):
        seg = dedupe_channels(seg, self.C)
        labels = label_keys(seg, self.bins, self.C)
        concepts = torch.bincount(seg.reshape(-1), minlength=self.C + 1)
        ids = torch.arange(i0, i1, device=self.device)

        def layer(name):
            st = stats[name]
            r = acts[name].float()
            N = r.shape[0]
            raw, raw_min = r.amax((2, 3)), r.amin((2, 3))
            st.hist.count_pixels(seg, concepts)
            low = st.hist.edges[:, 0]
            maxima = torch.empty(r.shape[:2], device=r.device)
            for u0, u1 in _unit_chunks(r, self.seg_grid):  # only the tail is ever interpolated
                cols = upsample_columns(r[:, u0:u1], self.seg_grid, low[u0:u1], raw[:, u0:u1], raw_min[:, u0:u1])
                st.hist.add_columns(cols.values, cols.units + u0, cols.pixels, cols.stride, labels, cols.finite)
                if moments:
                    maxima[:, u0:u1] = _column_maxima(cols, low[u0:u1], (N, u1 - u0))
            if moments:  # on the layer's own grid: upsampling is a convex combination, bounds hold
                st.moments.add(r, (raw_min.amin(0), raw.amax(0)))
                st.topk.add(_sample_maxima(r, self.seg_grid, st.topk, maxima, raw), ids)

        self.side.run(layer, list(stats), [self.units[name] for name in stats])

    def refine(self, max_rounds: int = 4):
        target = 1 - self.q
        for _ in range(max_rounds):
            redo = {}
            for name in self.layers:
                st = self.stats[name]
                j, frac = st.hist.threshold_index(self.q)
                bad = (frac - target).abs() > self.tol
                if not bool(bad.any()):
                    continue
                lo, hi = st.hist.straddling_bounds(self.q, st.moments.min, st.moments.max)
                width = hi - lo
                scale = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-6)
                bad &= width > 1e-6 * scale  # a point mass at the quantile cannot be split
                if not bool(bad.any()):
                    continue
                edges = st.hist.edges.clone()
                edges[bad] = grid_edges(lo[bad], hi[bad], edges.shape[1]).to(edges)
                redo[name] = edges
            if not redo:
                return
            fresh = {}
            for name, edges in redo.items():
                s = _LayerStats.__new__(_LayerStats)
                s.hist = TailHistogram(edges, self.C)
                fresh[name] = s
            names = list(redo)
            batches = self.batches(0, self.n)

            def replay(batch):  # on a lane: kept activations, or the generator only (segmentations are cached)
                acts = self.cached(*batch, names)
                return (acts, self.cached_seg(*batch)) if acts is not None else self.compute(*batch, layers=names)[:2]

            with contextlib.closing(self.side.ahead(replay, batches)) as ahead:
                for (i0, i1), (acts, seg) in zip(batches, ahead):
                    self.accumulate(acts, seg, i0, i1, fresh, moments=False)
            for name in names:
                self.stats[name].hist = fresh[name].hist

    def readout(self):
        out = {}
        for name in self.layers:
            st = self.stats[name]
            h = st.hist
            j, frac = h.threshold_index(self.q)
            mask, inter = h.iou_counts(j)
            inter = inter[:, :self.C].clone()
            inter[:, 0] = 0
            concept = h.concept_pixels[:self.C].clone()
            concept[0] = 0
            union = mask[:, None] + concept[None, :] - inter
            iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros((), dtype=torch.float64, device=union.device))
            thr = h.edges.gather(1, j[:, None])[:, 0]
            out[name] = {
                "iou": iou.cpu().numpy(), "intersection": inter.cpu().numpy(), "mask_pixels": mask.cpu().numpy(),
                "concept_pixels": concept.cpu().numpy(), "n_pixels": np.asarray(int(h.n_pixels)),
                "thresholds": thr.cpu().numpy().astype(np.float32), "fraction_above": frac.cpu().numpy(),
                "topk_indices": st.topk.indices.cpu().numpy(), "topk_values": st.topk.values.float().cpu().numpy(),
                "mean": st.moments.mean.cpu().numpy(), "std": st.moments.variance.sqrt().cpu().numpy(),
                "min": st.moments.min.cpu().numpy(), "max": st.moments.max.cpu().numpy(),
                "shape": np.asarray(self.shapes[name], dtype=np.int64)}
        return out
