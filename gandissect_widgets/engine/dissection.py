"""``dissect()``: per-unit thresholds and dataset-level IoU for several layers in one pass.

A dissection is a pipeline of stages with one contract each (DESIGN §2):
- sampling (``_Run.compute``): latents, images and segmentations, each sample once; labels cached
  for the run (a file on a CPU; device memory on a GPU, written to the file behind);
- a threshold rule (``engine.thresholds``): ``quantile`` places per-unit histogram edges around the
  quantile from a pilot, ``iqr`` chooses one level per unit on its own threshold set;
- a counting backend: ``tail`` (here: only the interpolation columns that can reach the histogram,
  ``upsample.upsample_columns``, the CPU path) or ``dense`` (``engine.counting``: whole upsampled
  maps, the GPU path and the readable reference), both into the same ``stats.TailHistogram``;
- the readout (``engine.readout``): thresholds, exact IoU, moments and top-k as the result's arrays.
Every pass runs through one loop (``_Run.sweep``); the knobs are ``engine.tuning.Tuning``.

How the passes go (n samples, batches of b, layers L1..Lm):
1. Probe: one latent through the generator, to check shapes and find which requested layer runs last.
2. Pilot (quantile rule): the first ``pilot_samples`` samples run through the generator and the
   segmenter; each unit's upsampled activations at ``pilot_pixels`` pixels per sample (one random
   pixel in each block of a grid) place that unit's histogram edges around the target quantile, in
   a window as wide as the pilot's own error needs (``stats.pilot_window``: narrow when the pilot
   saw every sample).  Their segmentations are cached, never redone; their activations are kept
   (up to ``Tuning.pilot_cache_bytes``) for the main pass.  The IQR rule instead runs its threshold
   set (seed 2) twice, for its candidates and their counts, and gives each unit one edge.
3. Main pass: every sample once through the generator (cut short after the last requested layer
   where its segmentation is already cached) and the segmenter, or from the pilot's activations;
   all layers accumulate moments, top-k and the histogram joint with the labels (``engine.stats``)
   by the counting backend.  On a CPU the layers run side by side on its cores, and
   ``lanes`` batches go through the models at once, ahead of the statistics, which are still
   counted batch by batch in order (``engine.sidebyside``).  A checkpoint is written every
   ``checkpoint_every`` seconds and when an exception leaves the statistics whole.
4. Read-out: each unit's threshold is the histogram edge whose fraction of pixels above is nearest
   to ``1 - quantile`` (the IQR rule's one edge); its IoU with every concept is exact at that
   threshold.  Under the quantile rule, units whose edge misses the target rank by more than
   ``rank_tolerance`` (a pilot that was not representative) get new edges inside the bin that
   holds the target, and their layers are replayed from the kept activations, or from the cached
   latents and segmentations (generator only), until they meet it.

The work directory (``cache_dir/dissect-<key>/work``, ``engine.workdir``) holds the segmentation cache
(``segmentation.npy``, its disk space reserved whole before it is mapped: a full disk is a
``CacheSpaceError`` at the start, never a SIGBUS halfway), the checkpoint and a lock file
(``lock``, ``fcntl.flock``): one process at a time works on a key, another waits for it and loads
its result (or, with ``lock_wait``, gives up with ``CacheBusyError``).  An interrupt (Ctrl-C)
anywhere saves a checkpoint of the last batch counted whole: statistics are only changed in
sections that a SIGINT waits for (in the main thread), and the batches the pilot keeps are grouped
the same way whether they come from its memory or are computed again, so a resumed run ends bit
for bit where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine import devices
from gandissect_widgets.engine.concept_stats import ConceptPixelCounts
from gandissect_widgets.engine.counting import candidate_add, dense_add, unit_chunks
from gandissect_widgets.engine.distributed import RankFailed, Ranks, agree, all_min, all_sum, broadcast, current
from gandissect_widgets.engine.hooks import ThreadTraces, resolve_layers
from gandissect_widgets.engine.io import atomic_write_bytes, cache_key
from gandissect_widgets.engine.layer_listing import probe_layers
from gandissect_widgets.engine.protocols import (NonFiniteError, ProtocolError, check_generator, check_images,
                                                 check_sample_z, check_segmenter, fingerprint, model_device,
                                                 sample_latents, segment, thread_safe)
from gandissect_widgets.engine.rank_merge import (any_rank, job_grid, merge_moments, merge_topk, sum_histogram,
                                                  sum_positions)
from gandissect_widgets.engine.readout import read_layer
from gandissect_widgets.engine.results import Dissection, LowCeilingWarning
from gandissect_widgets.engine.sidebyside import SideBySide
from gandissect_widgets.engine.stats import (RunningMoments, RunningTopK, TailHistogram, count_labels,
                                             dedupe_channels, grid_edges, label_keys, pilot_edges)
from gandissect_widgets.engine.thresholds import (IqrChoice, IqrRule, QuantileRule, candidate_levels, choose_levels,
                                                  iqr_scores, threshold_rule)
from gandissect_widgets.engine.tuning import Tuning
from gandissect_widgets.engine.workdir import (SPACE_ERRNOS, CacheBusyError, CacheSpaceError, InterruptGuard,
                                               WorkDirError, WorkLock, remove_work, reserve, space_error)
from gandissect_widgets.engine.upsample import (check_convention, source_bounds, upsample, upsample_columns,
                                                upsample_max, upsample_pixels)
from gandissect_widgets.registry import recorded_models

__all__ = ["dissect", "ENGINE_VERSION", "WorkDirError", "CacheSpaceError", "CacheBusyError", "NonFiniteError", "METHODS",
           "Tuning"]

# 2: pilot window (0.01, 0.008) below/above the quantile; 3: evenly spaced edges, window
# (0.005, 0.004), pilot of 512 samples x 64 pixels; 4: edges on a power-of-two grid, a window
# sized per unit from the pilot's own error, pilot pixels one in each block of an 8 x 8 grid
ENGINE_VERSION = 4
METHODS = ("auto", "dense", "tail")
NONFINITE = ("error", "skip")


def dissect(generator, segmenter, layers, n_samples: int = 1000, seed: int = 1, quantile: float = 0.99,
            batch_size: int = 32, device=None, cache_dir=None, topk: int = 20, bins: int = 128,
            pilot_samples: int = 512, pilot_pixels: int = 64, rank_tolerance: float = 5e-4,
            checkpoint_every: float = 60.0, progress: bool = True, lanes: int = 2,
            generator_name: str | None = None, segmenter_name: str | None = None,
            nonfinite: str = "error", lock_wait: float | None = None, threshold: str = "quantile",
            method: str = "auto", upsample: str = "iclr", tuning: Tuning | None = None,
            ranks: Ranks | None = None) -> Dissection:
    """Dissect ``layers`` of ``generator`` against ``segmenter`` over ``n_samples`` latents.

    Returns a ``Dissection``.  Thresholds are the ``quantile`` of each unit's upsampled activations
    over all pixels of all samples, read within ``rank_tolerance`` of the target rank (units with a
    point mass at the quantile, such as dead units, cannot be and are flagged by ``fraction_above``).
    ``cache_dir``: results are kept in ``cache_dir/dissect-<key>/`` where the key hashes everything
    that affects them (weights, layers, n_samples, seed, quantile, topk, bins, pilot settings);
    the same call loads instead of recomputing, and an interrupted run (Ctrl-C anywhere, or an
    error) resumes from its checkpoint of the last batch counted.  The segmentation cache's disk
    space is reserved before the first batch: too little is a ``CacheSpaceError`` (an ``OSError``
    and a ``ValueError``) naming the directory and the space needed, with nothing left behind.
    ``lock_wait``: one process at a time works on a key (a lock file in its work directory);
    another one waits for it and loads its result (``None``: as long as it takes), or after
    ``lock_wait`` seconds raises ``CacheBusyError`` (``0``: at once).
    The generator (and a Module segmenter) are moved to ``device`` and put in eval mode.
    ``lanes``: on a CPU, how many batches go through the generator and the segmenter at once, each
    in its own thread with its share of the cores, ahead of the statistics (on 2 cores, two
    forward passes on one core each run faster than one on both); each lane holds a batch's
    memory, so ``lanes=1`` uses the least.  The models must not keep state between calls.
    Statistics are counted in the same order whatever it is (results are bit for bit the same on
    the test models and SceneWorld).  Off the CPU batches run in turn.
    ``nonfinite``: what NaN or infinite values do.  ``"error"`` (default): the first batch with any
    in its images or in a dissected layer's activations raises ``NonFiniteError`` naming the layer
    (or 'images') and how many values.  ``"skip"``: they are left out of the counts: a sample whose
    image holds any is left out whole (the segmenter saw all of it); a unit's non-finite upsampled
    pixels are left out of that unit's counts (its threshold, fraction above and IoUs are over its
    finite pixels: ``n_pixels - nonfinite_pixels[u]``, an extra array per layer) and of its moments
    and top-k; a unit with no finite value gets a NaN threshold and IoU 0.  What was left out is
    recorded in ``settings["nonfinite_skipped"]`` and told in a warning.
    ``G.sample_z`` is checked once per run: ``sample_z(k, seed)`` twice the same, and the first k of
    ``sample_z(n_samples, seed)`` (``ProtocolError`` otherwise).
    ``threshold``: the threshold rule (``engine.thresholds``): ``"quantile"`` (the ``quantile`` of
    each unit, the default) or ``"iqr"`` (the ICLR paper's per-unit IQR rule, chosen on a threshold
    set of ``tuning.threshold_samples`` samples of seed ``tuning.threshold_seed``, 2; the result
    gets per-layer arrays ``iqr`` (U,) the chosen level's IQR, ``iqr_concept`` (U,) its concept and
    ``iqr_fraction`` (U,) its candidate's top fraction).
    ``method``: the counting backend: ``"tail"`` (the CPU path: only the interpolation columns that
    can reach the histogram), ``"dense"`` (``engine.counting``: whole upsampled maps, batched on the
    device without host synchronisation; the GPU path and the readable reference) or ``"auto"``
    (tail on a CPU, dense elsewhere).  They give the same counts (not part of the cache key).
    ``upsample``: the convention of the published code (``engine.upsample``): ``"iclr"`` (half-pixel
    bilinear with clamped edges, the default) or ``"pnas"`` (zeros outside).
    ``tuning``: the knobs of ``engine.tuning.Tuning`` (bins, pilot, lanes, chunk sizes, the IQR
    threshold set, ...); those that are arguments here may be given either way.
    ``ranks``: the job this call is one rank of (``engine.distributed``; default: the process group
    the caller initialised, e.g. inside ``with distributed.job(device) as ranks:`` under
    ``torchrun``, else one process).  Every rank must make the same call; each counts its share of
    the batches (round robin over the same ``sample_z(n_samples, seed)`` batches), the statistics
    are merged (``engine.rank_merge``) and every rank returns the result one process would: counts,
    thresholds, IoUs and top-k bit for bit, moments to the last bits.  Only rank 0 reads and writes
    the result in ``cache_dir`` (the key does not depend on the number of ranks; the settings
    record it as ``ranks``); each rank keeps its segmentations and checkpoint in
    ``cache_dir/dissect-<key>/work/rank-R-of-K`` on its own disk, so that the same job resumes.  A
    rank that fails or dies makes the others raise ``RankFailed`` within the job's timeout; nothing
    is written.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r} ('tail': the CPU "
                         f"path, 'dense': the GPU path and readable reference, 'auto': tail on a CPU, dense elsewhere)")
    convention = check_convention(upsample)
    if tuning is not None and not isinstance(tuning, Tuning):
        raise ValueError(f"tuning must be an engine.tuning.Tuning, got {type(tuning).__name__}")
    tuning = (tuning or Tuning()).with_args(bins=bins, pilot_samples=pilot_samples, pilot_pixels=pilot_pixels,
                                            rank_tolerance=rank_tolerance, checkpoint_every=checkpoint_every,
                                            lanes=lanes)

    if lock_wait is not None and not (isinstance(lock_wait, (int, float)) and not isinstance(lock_wait, bool)
                                      and lock_wait >= 0):
        raise ValueError(f"lock_wait must be None (wait as long as it takes) or seconds >= 0, got {lock_wait!r}")
    layers = _check_args(generator, segmenter, layers, n_samples, seed, quantile, batch_size, topk)
    rule = threshold_rule(threshold, quantile, tuning.threshold_samples or n_samples, tuning.threshold_seed,
                          tuning.iqr_candidates, tuning.pilot_pixels)
    if isinstance(rule, IqrRule) and rule.seed == seed:
        raise ValueError(f"threshold='iqr' chooses its thresholds on a separate set of samples, but its seed "
                         f"(tuning.threshold_seed={rule.seed}) is the dissection's seed; give another one")
    device = torch.device(device) if device is not None else model_device(generator)
    backend = ("tail" if device.type == "cpu" else "dense") if method == "auto" else method
    generator.to(device).eval()
    if isinstance(segmenter, torch.nn.Module):
        segmenter.to(device).eval()
    labels = list(segmenter.labels)
    settings = dict(generator=generator_name or type(generator).__name__,
                    segmenter=segmenter_name or type(segmenter).__name__,
                    generator_fingerprint=fingerprint(generator), segmenter_fingerprint=fingerprint(segmenter),
                    layers=list(layers), n_samples=int(n_samples), seed=int(seed), quantile=float(quantile),
                    topk=int(topk), bins=int(tuning.bins), pilot_samples=int(tuning.pilot_samples),
                    pilot_pixels=int(tuning.pilot_pixels), rank_tolerance=float(tuning.rank_tolerance),
                    engine_version=ENGINE_VERSION)
    key_parts = {k: v for k, v in settings.items() if k not in ("generator", "segmenter")}
    if nonfinite != "error":  # "error" gives a result only where nothing was left out: the same key as before
        key_parts["nonfinite"] = nonfinite
    # the defaults (quantile rule, iclr upsampling) keep the keys of the results made before they were options
    if not isinstance(rule, QuantileRule):
        key_parts.update(rule.settings())
    if convention != "iclr":
        key_parts["upsample"] = convention
    key = cache_key(**key_parts)
    settings.update(rule.settings())
    settings["upsample"] = convention
    settings["method"] = backend
    settings["cache_key"] = key
    settings["nonfinite"] = nonfinite
    models = recorded_models(generator, segmenter)  # how to load them again (not part of the key)
    if models is not None:
        settings["models"] = models
    ranks = ranks if ranks is not None else current()
    if ranks.distributed:
        agree(key, ranks, "the dissection's settings (start every rank with the same command)")
        settings["ranks"] = ranks.size

    def run_in(work_dir):
        run = _Run(_Plan(generator, segmenter, layers, labels, int(n_samples), int(seed), rule, int(batch_size), device,
                         int(topk), tuning, progress, work_dir, key, nonfinite, backend, convention, ranks))
        arrays = run.execute()
        out = dict(settings)
        if nonfinite == "skip":
            out["nonfinite_skipped"] = run.skipped_summary()
        return Dissection(labels, arrays, out, concept_positions=run.positions)

    if cache_dir is None:
        work_dir = tempfile.mkdtemp(prefix="gandissect-")
        try:
            return _told(run_in(work_dir), ranks)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    result_dir = os.path.join(os.fspath(cache_dir), f"dissect-{key}")
    done = os.path.join(result_dir, "dissect.json")
    if ranks.distributed:
        return _told(_dissect_in_job(ranks, result_dir, done, run_in, lock_wait, progress), ranks)
    if os.path.exists(done):
        return _told(Dissection.load(result_dir), ranks)
    work_dir = os.path.join(result_dir, "work")
    lock = WorkLock(work_dir, done, lock_wait, progress)
    if not lock.acquire():  # another process finished it while this one waited
        return _told(Dissection.load(result_dir), ranks)
    try:
        if os.path.exists(done):
            return _told(Dissection.load(result_dir), ranks)
        result = run_in(work_dir)
        result.save(result_dir)
        shutil.rmtree(work_dir, ignore_errors=True)  # the lock file too (and a job's rank-R-of-K work, now stale)
        return _told(result, ranks)
    finally:
        try:
            remove_work(work_dir, result_dir)  # unless it holds a checkpoint to resume from
        finally:
            lock.release()


def _told(result: Dissection, ranks: Ranks) -> Dissection:
    """The result as the caller gets it, with a ``LowCeilingWarning`` (once in a job) when some
    concept cannot reach the cut-off at this threshold."""
    if ranks.writer:
        text = result.ceiling_warning()
        if text:
            warnings.warn(text, LowCeilingWarning, stacklevel=3)  # at the caller's line
    return result


def _dissect_in_job(ranks, result_dir, done, run_in, lock_wait, progress):
    """``dissect`` with a cache directory, as one rank of a job: rank 0 alone looks for, loads and
    writes the result; each rank works in ``work/rank-R-of-K`` (its checkpoint: the same job
    resumes; a job of another size starts over)."""
    found = broadcast(Dissection.load(result_dir) if ranks.writer and os.path.exists(done) else None, ranks)
    if found is not None:
        return found
    work_parent = os.path.join(result_dir, "work")
    work_dir = os.path.join(work_parent, f"rank-{ranks.rank}-of-{ranks.size}")
    lock = WorkLock(work_dir, done, lock_wait, progress and ranks.writer)
    free = lock.acquire()
    try:
        # another job may have finished it while this one waited: rank 0's view decides
        if broadcast(ranks.writer and (not free or os.path.exists(done)), ranks):
            return broadcast(Dissection.load(result_dir) if ranks.writer else None, ranks)
        result = run_in(work_dir)
        failed = None
        if ranks.writer:
            try:
                result.save(result_dir)
            except BaseException as e:  # the other ranks hear of it, then this rank raises it
                failed = e
        told = broadcast(None if failed is None else f"{type(failed).__name__}: {failed}", ranks)
        if failed is not None:
            raise failed
        if told is not None:
            raise RankFailed(f"{ranks}: rank 0 could not write the result: {told}")
        shutil.rmtree(work_parent, ignore_errors=True)  # this rank's work, and any other job size's, now stale
        return result
    finally:
        try:
            remove_work(work_dir, work_parent)  # unless it holds a checkpoint to resume from
            with contextlib.suppress(OSError):
                os.rmdir(result_dir)
        finally:
            lock.release()


def _check_args(G, S, layers, n_samples, seed, quantile, batch_size, topk):
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
                              ("topk", topk, 1, None)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo or (hi and val > hi):
            raise ValueError(f"{name} must be an integer >= {lo}{f' and <= {hi}' if hi else ''}, got {val!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(quantile, (float, int)) and 0.5 <= quantile < 1):
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile!r} (0.99 = top 1%)")
    return layers


class _LayerStats:
    """One layer's statistics: moments, top-k and the histogram joint with the labels (``hist``);
    a refinement counts into the histogram alone (``moments`` and ``topk`` None)."""

    def __init__(self, moments: RunningMoments | None, topk: RunningTopK | None, hist: TailHistogram | None = None):
        self.moments, self.topk, self.hist = moments, topk, hist

    @classmethod
    def empty(cls, units, k, device, edges, concepts):
        return cls(RunningMoments(units, device), RunningTopK(units, k, device), TailHistogram(edges, concepts))

    def state_dict(self):
        return {"moments": self.moments.state_dict(), "topk": self.topk.state_dict(),
                "hist": self.hist.state_dict() if self.hist is not None else None}

    @classmethod
    def from_state_dict(cls, sd, device):
        return cls(RunningMoments.from_state_dict(sd["moments"], device), RunningTopK.from_state_dict(sd["topk"], device),
                   TailHistogram.from_state_dict(sd["hist"], device) if sd["hist"] is not None else None)


def _unit_chunks(r, size, chunk_elements):
    """Unit ranges [u0, u1) of a (N,U,h,w) activation whose upsampled maps fit the chunk size."""
    N, U = r.shape[:2]
    return unit_chunks(U, N * size[0] * size[1], chunk_elements)


def _column_maxima(cols, low, shape):
    """(N,C) maxima of the maps with values above ``low`` (C,), from ``upsample_columns``' columns
    (every such value lies in one, so the largest one read is the map's: the same bits); -inf
    for the other maps."""
    out = torch.full((shape[0] * shape[1],), -math.inf, device=cols.values.device)
    out = out.scatter_reduce_(0, cols.maps, cols.values.amax(0), "amax").view(shape)
    return torch.where(out > low.to(out)[None], out, torch.full((), -math.inf, device=out.device))


def _sample_maxima(r, size, topk, known, raw, chunk_elements, convention="iclr"):
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
    per = max(1, chunk_elements // max(1, size[0] * size[1]))
    for i in range(0, n.numel(), per):
        nn, uu = n[i:i + per], u[i:i + per]
        known[nn, uu] = upsample_max(r[nn, uu][:, None], size, convention)[:, 0]
    return known


@dataclass(frozen=True)
class _Plan:
    """What one dissection computes, fixed for the run (``_Run`` holds its state)."""
    G: torch.nn.Module
    S: object
    layers: list
    labels: list
    n: int
    seed: int
    rule: object           # engine.thresholds: QuantileRule or IqrRule
    batch_size: int
    device: torch.device
    k: int                 # top-k samples kept per unit
    tuning: Tuning
    progress: bool
    work_dir: str
    key: str               # the cache key, checked against a checkpoint's
    nonfinite: str = "error"
    method: str = "tail"   # the counting backend, "tail" or "dense"
    convention: str = "iclr"
    ranks: Ranks = Ranks()


class _Run:
    """One dissection in stages: sampling (``compute``: latents, images, segmentations, each
    sample once, cached for the run), the threshold rule (``pilot_pass`` places the quantile
    rule's edges, ``iqr_pass`` chooses the IQR rule's levels on its threshold set), counting
    (``main_pass`` and ``refine``, through ``accumulate`` with the ``tail`` or ``dense`` backend)
    and the readout (``engine.readout``).  In a job (``ranks``) every pass runs over this rank's
    share of the batches (``mine``) and each stage ends with the ranks' statistics merged
    (``engine.rank_merge``), so that every decision (edges, levels, refinement) is taken on the
    same numbers on every rank; a rank's segmentation cache holds its own batches only (``rows``)."""

    def __init__(self, plan: _Plan):
        G, S, layers, labels, rule, tuning = plan.G, plan.S, plan.layers, plan.labels, plan.rule, plan.tuning
        n, seed, batch_size, device, k, progress = plan.n, plan.seed, plan.batch_size, plan.device, plan.k, plan.progress
        work_dir, key, nonfinite, method, convention = plan.work_dir, plan.key, plan.nonfinite, plan.method, plan.convention
        self.G, self.S, self.layers, self.labels = G, S, layers, labels
        self.rule, self.tuning, self.method, self.convention = rule, tuning, method, convention
        self.q = rule.quantile if isinstance(rule, QuantileRule) else 0.99
        self.n, self.seed, self.bs, self.device = int(n), int(seed), int(batch_size), device
        self.k, self.bins, self.tol = int(k), int(tuning.bins), float(tuning.rank_tolerance)
        # the IQR rule's levels come from its own threshold set: no pilot
        self.n_pilot = min(int(tuning.pilot_samples), self.n) if isinstance(rule, QuantileRule) else 0
        self.pilot_pixels = int(tuning.pilot_pixels)
        self.ranks = plan.ranks
        self.checkpoint_every, self.lanes = float(tuning.checkpoint_every), int(tuning.lanes)
        self.progress = progress and self.ranks.writer  # one bar for the whole job
        self.merged = False  # the statistics are the job's, not this rank's (never checkpointed)
        self.chunk = int(tuning.chunk_elements if method == "tail" else tuning.dense_chunk_elements)
        self.work_dir, self.key = work_dir, key
        self.skip_nonfinite = nonfinite == "skip"
        # the dense backend checks for non-finite values without a host sync a batch: the batches'
        # flags are kept on the device and read at the end of a pass (and before a checkpoint)
        self.defer_checks = method == "dense" and not self.skip_nonfinite
        self.deferred = []  # (i0, i1, flag) of batches not checked yet
        self.iqr = None     # the IQR rule's choice, per layer (IqrChoice)
        self.ckpt_path = os.path.join(work_dir, "checkpoint.pt")
        self.seg_path = os.path.join(work_dir, "segmentation.npy")
        self.C = len(labels)
        self.z = check_sample_z(G, self.n, self.seed, sample_latents(G, self.n, self.seed))
        self.z_dev = self.z.to(device)  # once: no copy to the device a batch
        self.z_threshold = None         # the IQR rule's threshold set, on the device
        self.segmented = 0
        self.seg_cache = None
        self.seg_dev = None  # the segmentations on the device (off the CPU, while they fit)
        self._writer, self._writes = None, []
        # where each concept sits over the samples segmented so far (the position baseline's counts)
        self.positions = ConceptPixelCounts(self.C, device=device)
        self.seg_grid = None
        # samples left out whole (non-finite images, nonfinite="skip"), known up to self.segmented
        self.skip = np.zeros(self.n, dtype=bool) if self.skip_nonfinite else None
        self.stats: dict[str, _LayerStats] = {}
        self.next_batch = 0
        self.edges: dict[str, torch.Tensor] | None = None
        self.cache: dict[int, dict[str, torch.Tensor]] = {}  # the pilot's kept activations, by first sample
        self.guard = InterruptGuard()
        self._dirty = False  # statistics half changed (an error inside a counting section): never saved

    # -- forward ------------------------------------------------------------------------------
    def probe(self):
        p = probe_layers(self.G, self.layers, self.z[:1].to(self.device))
        check_images(p.output, 1)
        self.shapes = p.map_shapes(self.layers)  # {name: (C,h,w)}, or the ProtocolError that says why not
        self.order = p.order
        self.stop_after = self.order[-1]
        self.units = {name: shape[0] for name, shape in self.shapes.items()}
        # the pilot batches whose activations the pilot keeps for the main pass, while they fit:
        # decided by sizes alone, so that a resumed run groups the batches as a whole one does
        per, held, self.keeps = sum(p.layers[name].sample_bytes for name in self.layers), 0, set()
        for i0, i1 in self.mine(self.batches(0, self.n_pilot)):
            if held + (i1 - i0) * per <= self.tuning.pilot_cache_bytes:
                self.keeps.add(i0)
                held += (i1 - i0) * per

    def planned(self, i0, i1):
        """Whether main-pass batch [i0, i1) is one whose activations the pilot keeps."""
        return i0 in self.keeps and i1 <= self.n_pilot

    def compute(self, i0, i1, layers=None, need_seg=True):
        """Activations of ``layers`` for samples [i0, i1), their labels (N,K,H,W) on device,
        whether the labels are new (the caller stores them, in order: this may run on a lane
        thread while the statistics of earlier samples are counted), each layer's per-map
        (max, min) and, for new labels with nonfinite="skip", which samples' images were not finite.
        Images and activations are checked for NaN and inf here, with one host sync a batch (the
        dense backend keeps the check on the device, ``check_deferred``)."""
        layers = layers or self.layers
        cached = i1 <= self.segmented
        fresh = need_seg and not cached
        stop = None if fresh else [l for l in self.order if l in layers][-1]
        x, acts, ext, bad_images = self.forward(self.z_dev[i0:i1], layers, stop, fresh, (i0, i1))
        seg = None
        if need_seg:
            if cached:
                seg = self.cached_seg(i0, i1)
            else:
                seg = self.segment(x, bad_images, (i0, i1))
        return acts, seg, fresh, ext, bad_images

    def forward(self, z, layers, stop, images, where, what="samples"):
        """The generator on latents ``z``: (images, activations of ``layers``, their per-map (max,
        min), which images are not finite (nonfinite="skip")); NaN and inf are checked here (or
        their flag kept for ``check_deferred``).  ``images``: the images are used (checked)."""
        with torch.no_grad():
            x, acts = self.traces.run(lambda: self.G(z), layers, stop_after=stop)
            if images:
                check_images(x, z.shape[0])
            ext = {name: (a.amax((2, 3)).float(), a.amin((2, 3)).float()) for name, a in acts.items()}
            flags = [torch.isfinite(hi).all() & torch.isfinite(lo).all() for hi, lo in ext.values()]
            if images:
                flags.append(torch.isfinite(x).all())
            bad_images = None
            ok = torch.stack(flags).all()  # (a NaN or inf anywhere in a map is in its max or min)
            if self.defer_checks:
                self.deferred.append((where, what, ok))
            elif not bool(ok):
                bad_images = self.nonfinite(*where, acts, x if images else None, what)
        return x, acts, ext, bad_images

    def segment(self, x, bad_images, where, what="samples"):
        """The segmenter's labels (N,K,H,W) of images ``x``; images left out (nonfinite="skip") are
        segmented as zeros.  With deferred checks the label range is checked on the device too."""
        with torch.no_grad():
            if bad_images is not None:  # left out whole; the segmenter sees zeros instead
                x = torch.where(torch.from_numpy(bad_images).to(x.device)[:, None, None, None],
                                torch.zeros((), dtype=x.dtype, device=x.device), x)
            if not self.defer_checks:
                return segment(self.S, x)
            seg = segment(self.S, x, check_range=False)
            ok = (seg.amin() >= 0) & (seg.amax() < self.C) if seg.numel() else torch.ones((), dtype=torch.bool)
            self.deferred.append((where, "labels of " + what, ok))
            return seg.clamp(0, self.C - 1)  # counted safely until the check is read

    def check_deferred(self):
        """Read the flags of the batches checked on the device (one host sync): a batch with
        non-finite values is computed again and raises ``NonFiniteError`` as it would have at once,
        and the statistics, which counted it, are never saved (the run starts over)."""
        if not self.deferred:
            return
        pending, self.deferred = self.deferred, []
        oks = torch.stack([ok.to(self.device) for _, _, ok in pending]).cpu().tolist()
        for ((i0, i1), what, _), ok in zip(pending, oks):
            if ok:
                continue
            self._dirty = True  # the counts include the batch: no checkpoint may keep them
            if what.startswith("labels"):
                segment(self.S, self.forward_again(i0, i1, what)[0])  # raises its ProtocolError
                raise ProtocolError(f"the segmenter returned labels outside 0..{self.C - 1} for {what} {i0}..{i1 - 1}")
            self.defer_checks = False
            x, acts = self.forward_again(i0, i1, what)
            self.nonfinite(i0, i1, acts, x, what)

    def forward_again(self, i0, i1, what):
        z = (self.z_threshold if "threshold" in what else self.z_dev)[i0:i1]
        with torch.no_grad():
            return self.traces.run(lambda: self.G(z), self.layers)

    def nonfinite(self, i0, i1, acts, x, what="samples"):
        """Count the batch's non-finite values: raise ``NonFiniteError`` (nonfinite="error"), or
        return which samples' images hold any (None if none)."""
        found, bad_images = [], None
        for name, a in acts.items():
            bad = int((~torch.isfinite(a)).sum())
            if bad:
                found.append(f"layer {name!r}: {bad} of {a.numel()} activation values")
        if x is not None:
            nf = ~torch.isfinite(x)
            bad = int(nf.sum())
            if bad:
                found.append(f"images: {bad} of {x.numel()} pixel values")
                bad_images = nf.flatten(1).any(1).cpu().numpy()
        if not self.skip_nonfinite:
            raise NonFiniteError(f"the generator gave non-finite values (NaN or inf) for {what} {i0}..{i1 - 1}: "
                                 f"{'; '.join(found)}; they would make the counts meaningless: give a generator "
                                 f"with finite outputs, or pass nonfinite='skip' (dissect(..., nonfinite='skip')) "
                                 f"to leave them out of the counts")
        return bad_images

    def cached_seg(self, i0, i1):
        r0, r1 = self.rows(i0, i1)
        if self.seg_dev is not None:
            return self.seg_dev[r0:r1].long()
        return torch.from_numpy(np.asarray(self.seg_cache[r0:r1]).astype(np.int64)).to(self.device)

    # -- this rank's share --------------------------------------------------------------------
    def mine(self, batches):
        """This rank's batches of ``batches`` (all of them in one process): round robin, so batch
        j of every pass (pilot, main, refinement) belongs to the same rank."""
        return self.ranks.share(batches)

    def rows(self, i0, i1):
        """The rows of this rank's segmentation cache that hold samples [i0, i1): in a job, one of
        its batches (its batches' rows follow each other in order); in one process, the same."""
        if not self.ranks.distributed:
            return i0, i1
        j = i0 // self.bs
        r0 = (j // self.ranks.size) * self.bs + (i0 - j * self.bs)
        return r0, r0 + (i1 - i0)

    def cache_rows(self):
        return sum(i1 - i0 for i0, i1 in self.mine(self.batches(0, self.n)))

    def advance(self, bar, batches):
        """The job's bar, on rank 0, moves for all ranks: they count their shares at the same pace."""
        bar.update(min(batches * self.ranks.size, bar.total - bar.n))

    def merge_stats(self):
        """The ranks' statistics of the main pass merged: each rank saves its own first (its
        checkpoint), after which the statistics are the job's and are never saved."""
        if not self.ranks.distributed:
            return
        self.save_checkpoint()
        with self.guard.critical():
            for name, st in self.stats.items():
                sum_histogram(st.hist, self.ranks)
                st.moments = merge_moments(st.moments, self.ranks)
                st.topk = merge_topk(st.topk, self.ranks)
            self.merge_samples()
            self.merged = True

    def merge_samples(self):
        """Per-sample marks and concept positions merged (their counts are over each rank's own samples)."""
        self.seg_grid = job_grid(self.seg_grid, self.ranks)
        if self.skip is not None:
            self.skip = any_rank(self.skip, self.ranks)
        have = bool(all_min(torch.tensor([int(self.positions is not None)]), self.ranks))
        if not have:  # (a checkpoint of an older version without them, on some rank)
            self.positions = None
        elif self.seg_grid is not None:
            self.positions = sum_positions(self.positions, self.seg_grid, self.ranks)

    def agree_resume(self):
        """In a job, resume the statistics only if every rank with batches resumed with the
        thresholds placed; else every rank starts them over (keeping its segmentations).  A rank
        with no batches takes rank 0's thresholds."""
        if not self.ranks.distributed:
            return
        placed = self.edges is not None
        owns = bool(self.mine(self.batches(0, self.n)))
        if bool(all_min(torch.tensor([int(placed or not owns)]), self.ranks)):
            sent = broadcast(self.thresholds_state() if self.ranks.writer else None, self.ranks)
            if not placed:
                self.set_thresholds(sent)
                self.stats = self.fresh_stats(self.edges)
                self.next_batch = 0
        elif placed:
            self.edges, self.iqr, self.stats, self.next_batch = None, None, {}, 0

    def thresholds_state(self) -> dict:
        """The thresholds placed so far, on the CPU: the quantile rule's edges, the IQR rule's choice."""
        return {"edges": {k: v.cpu() for k, v in self.edges.items()} if self.edges else None,
                "iqr": {name: {k: v.cpu() for k, v in c._asdict().items()} for name, c in self.iqr.items()}
                if self.iqr is not None else None}

    def set_thresholds(self, state: dict):
        """``thresholds_state``'s (from a checkpoint, or rank 0) on this run's device."""
        if state.get("edges") is not None:
            self.edges = {k: v.to(self.device) for k, v in state["edges"].items()}
        if state.get("iqr") is not None:
            self.iqr = {name: IqrChoice(**{k: v.to(self.device) for k, v in c.items()})
                        for name, c in state["iqr"].items()}

    def fresh_stats(self, edges):
        return {name: _LayerStats.empty(self.units[name], self.k, self.device, edges[name], self.C)
                for name in self.layers}

    def _keep_on_device(self, seg_cache):
        """Off the CPU, the run's segmentations stay on the device (while they fit
        ``Tuning.device_seg_bytes``); the file is written behind, by a thread of its own."""
        if devices.on_host(self.device) or seg_cache.nbytes > self.tuning.device_seg_bytes:
            return None
        dtype = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16}.get(seg_cache.dtype, torch.int32)
        return torch.zeros(seg_cache.shape, dtype=dtype, device=self.device)

    def _write_behind(self, r0, r1):
        part = self.seg_dev[r0:r1]
        out = self.seg_cache

        def write():
            out[r0:r1] = part.cpu().numpy().astype(out.dtype)  # (this thread waits for the copy, not the run)

        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="gandissect-segwrite")
        self._writes.append(self._writer.submit(write))

    def _flush_writes(self):
        """Wait for the segmentations written behind (before a checkpoint says they are there)."""
        pending, self._writes = self._writes, []
        for f in pending:
            f.result()

    def _create_seg_file(self, dtype, shape):
        """``segmentation.npy`` of ``shape``, its disk space reserved whole before it is mapped (a
        map of a sparse file on a full disk dies of SIGBUS); too little space: ``CacheSpaceError``
        and no file."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                  "shape": tuple(int(v) for v in shape)}
        need = int(np.prod(shape)) * dtype.itemsize
        try:
            with open(self.seg_path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                f.flush()
                need += f.tell()
                reserve(f.fileno(), need)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(self.seg_path)
            if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
                raise space_error(self.work_dir, f"the segmentation cache ({shape[0]} samples of "
                                   f"{'x'.join(map(str, shape[1:]))} labels)", need, e) from None
            raise
        return np.load(self.seg_path, mmap_mode="r+")

    def _store_seg(self, i0, i1, seg, bad_images=None):
        with self.guard.critical():
            if self.seg_cache is None:
                dtype = np.uint8 if self.C <= 256 else (np.int16 if self.C <= 32767 else np.int32)
                self.seg_cache = self._create_seg_file(dtype, (self.cache_rows(),) + tuple(seg.shape[1:]))
                self.seg_grid = tuple(seg.shape[-2:])
                self.seg_dev = self._keep_on_device(self.seg_cache)
            elif tuple(seg.shape[1:]) != self.seg_cache.shape[1:]:
                raise ProtocolError(f"segmenter output changed shape from {self.seg_cache.shape[1:]} to "
                                    f"{tuple(seg.shape[1:])} between batches")
            r0, r1 = self.rows(i0, i1)
            if self.seg_dev is not None:
                self.seg_dev[r0:r1] = seg.to(self.seg_dev.dtype)
                self._write_behind(r0, r1)
            else:
                self.seg_cache[r0:r1] = seg.cpu().numpy().astype(self.seg_cache.dtype)
            if self.positions is not None and i1 > self.segmented:  # each sample once (a batch may overlap the
                new = max(i0, self.segmented) - i0                        # pilot's last), not those left out
                part = seg[new:]
                if bad_images is not None:
                    part = part[torch.from_numpy(~bad_images[new:]).to(seg.device)]
                self.positions.update(part)
            if self.skip is not None:
                self.skip[i0:i1] = bad_images if bad_images is not None else False
            self.segmented = max(self.segmented, i1)

    def batches(self, start, stop):
        return [(i, min(i + self.bs, stop)) for i in range(start, stop, self.bs)]

    # -- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self):
        if self.merged:  # the job's statistics: each rank's checkpoint holds its own
            return
        with self.guard.critical():  # an interrupt waits for the checkpoint
            self.check_deferred()
            self._flush_writes()
            if self.seg_cache is not None:
                self.seg_cache.flush()
            buf = io.BytesIO()
            torch.save({
                "key": self.key, "batch_size": self.bs, "next_batch": self.next_batch, "segmented": self.segmented,
                "seg_grid": self.seg_grid, **self.thresholds_state(),
                "stats": {name: s.state_dict() for name, s in self.stats.items()},
                "positions": self.positions.state_dict() if self.positions is not None else None,
                "skip": torch.from_numpy(self.skip.copy()) if self.skip is not None else None}, buf)
            data = buf.getvalue()
            try:
                atomic_write_bytes(self.ckpt_path, data)
            except OSError as e:
                if getattr(e, "errno", None) in SPACE_ERRNOS:
                    raise space_error(self.work_dir, "a checkpoint", len(data), e) from None
                raise

    def load_checkpoint(self):
        if not (os.path.exists(self.ckpt_path) and os.path.exists(self.seg_path)):
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception:
            return False
        if ck.get("key") != self.key or ck.get("batch_size") != self.bs:
            return False  # (batches of another size: other batch indices and cache rows; it starts over)
        try:
            with open(self.seg_path, "r+b") as f:  # a file with holes (an older version's) gets its blocks now
                reserve(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in SPACE_ERRNOS:
                raise space_error(self.work_dir, "the segmentation cache", os.path.getsize(self.seg_path), e) from None
            raise
        seg_cache = np.load(self.seg_path, mmap_mode="r+")
        if seg_cache.shape[0] != self.cache_rows():
            return False
        self.seg_cache = seg_cache
        self.seg_dev = self._keep_on_device(seg_cache)
        if self.seg_dev is not None:
            self.seg_dev.copy_(torch.from_numpy(np.asarray(seg_cache)))
        self.segmented, self.next_batch = int(ck["segmented"]), int(ck["next_batch"])
        self.seg_grid = tuple(ck["seg_grid"]) if ck["seg_grid"] is not None else None
        self.set_thresholds(ck)
        self.stats = {name: _LayerStats.from_state_dict(sd, self.device) for name, sd in ck["stats"].items()}
        # a checkpoint without them (an older version's) resumes without the position counts
        self.positions = (ConceptPixelCounts.from_state_dict(ck["positions"], self.device)
                          if ck.get("positions") is not None else None)
        if self.skip is not None and ck.get("skip") is not None:
            self.skip = ck["skip"].numpy().astype(bool).copy()
        return True

    # -- passes -------------------------------------------------------------------------------
    def execute(self):
        self.probe()
        with self.guard:
            resumed = self.load_checkpoint()
            self.agree_resume()
            placed = self.edges is not None  # (only after a checkpoint, or rank 0's in a job)
            iqr = isinstance(self.rule, IqrRule) and not placed
            pilot = [] if placed else self.batches(0, self.n_pilot)
            main = self.batches(0, self.n)
            done = min(self.next_batch, len(main)) if placed else 0
            if resumed and self.progress:
                counted = main[done - 1][1] if done else 0
                print(f"dissect: resuming from the checkpoint in {self.work_dir}: {counted} of {self.n} samples "
                      f"counted, {self.segmented} segmented", file=sys.stderr, flush=True)
            bar = tqdm(total=len(pilot) + len(main), desc="dissect", disable=not self.progress, initial=done)
            try:
                lanes = self.lanes if thread_safe(self.G) and thread_safe(self.S) else 1  # protocols: Threads
                with SideBySide(self.device, lanes) as self.side, ThreadTraces(self.G, self.layers) as self.traces:
                    try:
                        if iqr:
                            self.iqr_pass()
                        if pilot:
                            self.pilot_pass(self.mine(pilot), bar)
                        self.main_pass(main, bar)
                    finally:
                        bar.close()
                    self.check_deferred()
                    self.merge_stats()
                    if isinstance(self.rule, QuantileRule):  # the IQR rule's levels are not quantiles
                        self.refine()
                    self.check_deferred()
                    self._flush_writes()
            except BaseException as e:
                self.save_on_failure(e)
                raise
            finally:
                if self._writer is not None:
                    self._writer.shutdown(wait=True)
                    self._writer = None
        self.cache = {}
        return self.readout()

    def save_on_failure(self, exc):
        """A checkpoint of the statistics as they stand, when they are whole (an interrupt or an
        error outside a counting section), so that the same call resumes from the last batch."""
        if self._dirty or self.seg_cache is None or isinstance(exc, CacheSpaceError):
            return
        try:
            self.save_checkpoint()
        except Exception as e:  # the original failure is the one to tell
            warnings.warn(f"could not save a checkpoint in {self.work_dir}: {e}", RuntimeWarning, stacklevel=3)

    def pilot_pass(self, batches, bar):
        self.cache = {}
        values = None
        start = time.monotonic()
        def sample(batch, out):
            nonlocal values
            (i0, i1), (acts, seg, fresh, _, bad) = batch, out
            if fresh:
                self._store_seg(i0, i1, seg, bad)
            if values is None:  # the segmentation grid is known from the first batch on
                values = self.pixel_values(self.n_pilot, self.seg_grid)
            self.sample_pilot(i0, i1, acts, values)
            self.advance(bar, 1)

        self.sweep(batches, lambda batch: self.compute(*batch), sample)
        self.check_deferred()
        if self.ranks.distributed:  # every rank's samples in every rank's values
            self.seg_grid = job_grid(self.seg_grid, self.ranks)
            values = values or self.pixel_values(self.n_pilot, self.seg_grid)
            values = {name: all_sum(v, self.ranks) for name, v in values.items()}
            if self.skip is not None:
                self.skip = any_rank(self.skip, self.ranks)
        H, W = self.seg_grid
        population = self.n
        if self.skip is not None and self.skip[:self.n_pilot].any():  # samples left out whole
            kept = torch.from_numpy(~self.skip[:self.n_pilot]).to(self.device)
            if not bool(kept.any()):
                raise NonFiniteError(f"all {self.n_pilot} pilot samples have non-finite images: nothing to count "
                                     f"(nonfinite='skip' leaves such samples out); give a generator with finite outputs")
            values = {name: v[:, kept] for name, v in values.items()}
            population = self.n - int(self.skip[:self.n_pilot].sum())
        edges = {}

        def place(name):
            edges[name] = pilot_edges(values[name], self.q, self.bins, population=population, pixels=H * W)

        self.side.run(place, self.layers, [self.units[name] for name in self.layers])
        stats = self.fresh_stats(edges)
        with self.guard.critical():
            self.edges, self.stats, self.next_batch = edges, stats, 0
        if time.monotonic() - start >= self.checkpoint_every:
            self.save_checkpoint()

    def pixel_values(self, n, grid):
        """Zeros to write the sampled pixel values of n samples into (U, n, R*S) per layer (in a job
        each rank writes its own samples' and the ranks' tensors are summed)."""
        R, S = self.pilot_grid(grid)
        return {name: torch.zeros(self.units[name], n, R * S, device=self.device) for name in self.layers}

    def pilot_grid(self, grid=None):
        """The R x S blocks of the segmentation grid that each hold one pilot pixel per sample."""
        return tuple(min(round(math.sqrt(self.pilot_pixels)), n) for n in (grid or self.seg_grid))

    def sample_pilot(self, i0, i1, acts, values):
        """Keep the batch's activations for the main pass (those of ``self.keeps``) and write its
        pilot values: one random pixel in each block of each sample, independent pixels, spread out."""
        if i0 in self.keeps:  # the main pass reuses them
            self.cache[i0] = acts
        self.sample_pixels(f"{self.seed}:{i0}", i0, i1, acts, values, self.seg_grid)

    def sample_pixels(self, tag, i0, i1, acts, values, grid):
        """``values[layer][:, i0:i1]`` (U, n, R*S): the upsampled activations at one random pixel in
        each of the R x S blocks of ``grid`` of each sample, drawn from a generator seeded by ``tag``."""
        H, W = grid
        R, S = self.pilot_grid(grid)
        g = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
        block = torch.rand(2, i1 - i0, R, S, generator=g)
        y = ((torch.arange(R)[:, None] + block[0]) * (H / R)).long().clamp(max=H - 1)
        x = ((torch.arange(S)[None, :] + block[1]) * (W / S)).long().clamp(max=W - 1)
        pixels = (y * W + x).reshape(i1 - i0, R * S)
        pixels = pixels.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else pixels

        def sample(name):
            for u0, u1 in _unit_chunks(acts[name], grid, self.chunk):
                values[name][u0:u1, i0:i1] = upsample_pixels(acts[name][:, u0:u1], grid, pixels,
                                                             self.convention).transpose(0, 1)

        self.side.run(sample, self.layers, [self.units[name] for name in self.layers])

    def iqr_pass(self):
        """The IQR rule's stage, on its threshold set (``engine.thresholds``): (1) the candidate
        levels from a sample of pixels, the generator only (the first batch is segmented, for the
        grid); (2) every pixel counted at the candidates jointly with the labels; the readout of
        MI / JE chooses each unit's level, which the main pass then counts at."""
        rule, what = self.rule, "threshold-set samples"
        nt = rule.samples
        self.z_threshold = check_sample_z(self.G, nt, rule.seed, sample_latents(self.G, nt, rule.seed)).to(self.device)
        every = self.batches(0, nt)
        batches = self.mine(every)
        bar = tqdm(total=2 * len(every), desc="dissect: IQR thresholds", disable=not self.progress)
        first = {}

        def generate(batch):  # on a lane
            i0, i1 = batch
            if batch == batches[0]:  # the first batch's labels give the grid; kept for step 2
                x, acts, _, bad = self.forward(self.z_threshold[i0:i1], self.layers, None, True, batch, what)
                return acts, self.segment(x, bad, batch, what), bad
            _, acts, _, _ = self.forward(self.z_threshold[i0:i1], self.layers, self.stop_after, False, batch, what)
            return acts, None, None

        values = {}

        def sample(batch, out):
            (i0, i1), (acts, seg, bad) = batch, out
            if seg is not None:
                first.update(seg=seg, bad=bad, grid=tuple(seg.shape[-2:]))
                values.update(self.pixel_values(nt, first["grid"]))
            self.sample_pixels(f"threshold {rule.seed}:{i0}", i0, i1, acts, values, first["grid"])
            self.advance(bar, 1)

        self.sweep(batches, generate, sample)
        self.check_deferred()
        grid, fractions = job_grid(first.get("grid"), self.ranks), rule.fractions
        if self.ranks.distributed:  # every rank's samples in every rank's values
            values = {name: all_sum(v, self.ranks) for name, v in (values or self.pixel_values(nt, grid)).items()}
        self.seg_grid = self.seg_grid or grid  # (the same segmenter: the main pass's grid)
        cands, grids, lookups, hists = {}, {}, {}, {}
        for name in self.layers:
            U = self.units[name]
            cands[name] = c = candidate_levels(values.pop(name).reshape(U, -1), fractions)
            grids[name] = TailHistogram(c.grid, 0)  # (no concepts: only its exact binning is used)
            lookups[name] = c.lookup()
            hists[name] = TailHistogram(c.edges(), self.C)

        def label(batch):  # on a lane
            i0, i1 = batch
            if batch == batches[0]:
                _, acts, _, _ = self.forward(self.z_threshold[i0:i1], self.layers, self.stop_after, False, batch, what)
                return acts, first["seg"], first["bad"]
            x, acts, _, bad = self.forward(self.z_threshold[i0:i1], self.layers, None, True, batch, what)
            return acts, self.segment(x, bad, batch, what), bad

        def count(batch, out):
            acts, seg, bad = out
            if bad is not None and bad.any():  # nonfinite="skip": samples with non-finite images left out
                keep = torch.from_numpy(~bad).to(self.device)
                acts, seg = {k: a[keep] for k, a in acts.items()}, seg[keep]
            seg = dedupe_channels(seg, self.C)
            counts = count_labels(seg, self.C + 1)

            def layer(name):
                hists[name].count_pixels(seg, counts)
                candidate_add(hists[name], grids[name], lookups[name], acts[name], seg, grid, self.convention,
                              self.chunk)

            self.side.run(layer, self.layers, [self.units[name] for name in self.layers])
            self.advance(bar, 1)

        self.sweep(batches, label, count)
        bar.close()
        self.check_deferred()
        for name in self.layers:
            sum_histogram(hists[name], self.ranks)
        choice, edges = {}, {}
        for name in self.layers:
            choice[name] = choose_levels(iqr_scores(hists[name], cands[name].levels), cands[name], fractions)
            edges[name] = choice[name].levels[:, None].float().contiguous()
        stats = self.fresh_stats(edges)
        with self.guard.critical():
            self.iqr, self.edges, self.stats, self.next_batch = choice, edges, stats, 0

    def cached(self, i0, i1, layers):
        """Activations of samples [i0, i1) kept by the pilot, or None."""
        acts = self.cache.get(i0)
        if acts is None or i1 > self.segmented or acts[self.layers[0]].shape[0] != i1 - i0:
            return None
        return {name: acts[name] for name in layers}

    def main_pass(self, batches, bar):
        last = [time.monotonic()]
        planned = [self.planned(i0, i1) for i0, i1 in batches]
        if self.ranks.distributed:  # this rank's batches, each counted alone
            own = self.ranks.share(range(len(batches)))
            keep = all(planned[j] for j in own)
            steps = [(j, j + 1, planned[j]) for j in own if j >= self.next_batch]
        else:
            steps, keep = self.main_steps(batches, planned), all(planned)

        def run(step):  # on a lane, ahead of the statistics
            b, e, kept = step
            if not kept:
                return self.compute(*batches[b])
            return {j: self.compute(*batches[j], need_seg=False)[0] for j in range(b, e)
                    if self.cached(*batches[j], self.layers) is None}

        def count(step, out):  # here, in order
            b, e, kept = step
            i0, i1 = batches[b][0], batches[e - 1][1]
            ext = None
            if kept:
                parts = [out[j] if j in out else self.cached(*batches[j], self.layers) for j in range(b, e)]
                if not keep:
                    for j in range(b, e):
                        self.cache.pop(batches[j][0], None)
                acts = {name: torch.cat([a[name] for a in parts]) if len(parts) > 1 else parts[0][name]
                        for name in self.layers}
                del parts
                seg = self.cached_seg(i0, i1)
            else:
                acts, seg, fresh, ext, bad = out
                if fresh:
                    self._store_seg(i0, i1, seg, bad)
            with self.guard.critical():  # an interrupt waits: the batch is counted whole, or not at all
                self._dirty = True
                self.accumulate(acts, seg, i0, i1, self.stats, ext=ext)
                self.next_batch = e
                self._dirty = False
            del acts, seg, out
            self.advance(bar, e - b)
            if time.monotonic() - last[0] >= self.checkpoint_every and e < len(batches):
                self.save_checkpoint()
                last[0] = time.monotonic()

        self.sweep(steps, run, count)

    def main_steps(self, batches, planned):
        """(b, e, kept): kept batches b..e-1 counted together, or batch b run.  Batches the pilot
        keeps are counted together, as many as one unit chunk holds (computed again if a resumed
        run does not hold them: the groups are the same, so are the bits); they stay for refinement
        only if they are all the samples (else the forward passes to come need their memory)."""
        H, W = self.seg_grid
        group = max(self.bs, self.tuning.chunk_elements // max(self.units[name] * H * W for name in self.layers))
        steps, b = [], 0
        while b < len(batches):
            i0, e = batches[b][0], b
            while e < len(batches) and batches[e][1] - i0 <= group and planned[e]:
                e += 1
            steps.append((b, e, True) if e > b else (b, b + 1, False))
            b = steps[-1][1]
        return [(max(b, self.next_batch), e, kept) for b, e, kept in steps if e > self.next_batch]

    def sweep(self, items, produce, consume):
        """The one loop of every pass (pilot, the IQR rule's threshold set, main pass, refinement):
        ``produce(item)`` (the models) on the lanes, up to ``lanes`` items ahead, ``consume(item,
        out)`` (the statistics) here, in order."""
        with contextlib.closing(self.side.ahead(produce, items)) as ahead:
            for item in items:
                out = next(ahead)
                consume(item, out)
                del out  # not held while the next one is waited for

    def accumulate(self, acts, seg, i0, i1, stats, moments=True, ext=None):
        ids = torch.arange(i0, i1, device=self.device)
        # the batches' rows (moments are added batch by batch, however the batches were grouped and
        # the ranks share them: the same float32 sums), after the samples left out
        kept = np.arange(i0, i1) if self.skip is None else np.arange(i0, i1)[~self.skip[i0:i1]]
        cuts = np.flatnonzero(np.diff(kept // self.bs)) + 1
        slices = list(zip([0, *cuts.tolist()], [*cuts.tolist(), len(kept)]))
        if self.skip is not None and self.skip[i0:i1].any():  # samples with non-finite images: left out whole
            keep = torch.from_numpy(~self.skip[i0:i1]).to(self.device)
            if not bool(keep.any()):
                return
            acts = {name: a[keep] for name, a in acts.items()}
            seg, ids = seg[keep], ids[keep]
            ext = {name: (hi[keep], lo[keep]) for name, (hi, lo) in ext.items()} if ext is not None else None
        seg = dedupe_channels(seg, self.C)
        dense = self.method == "dense"
        # the labels as histogram keys, for each number of edges (the quantile rule's bins, the IQR rule's 1)
        labels = {} if dense else {b: label_keys(seg, b, self.C) for b in {stats[name].hist.bins for name in stats}}
        concepts = count_labels(seg, self.C + 1)
        later = True if dense else None  # (the dense backend's top-k never asks the host whether to add)

        def layer(name):
            st = stats[name]
            r = acts[name].float()
            N = r.shape[0]
            raw, raw_min = ext[name] if ext is not None and name in ext else (r.amax((2, 3)), r.amin((2, 3)))
            bad = None
            if self.skip_nonfinite:  # (with nonfinite="error", compute() has seen to it that all is finite)
                b = ~(torch.isfinite(raw) & torch.isfinite(raw_min))
                if bool(b.any()):
                    bad = b
            st.hist.count_pixels(seg, concepts)
            finite_max = self.skip_pixels(r, bad, seg, st.hist) if bad is not None else None
            if dense:  # whole maps (engine.counting)
                maxima = dense_add(st.hist, r, seg, self.seg_grid, self.convention, self.chunk, bad is not None)
            else:
                low = st.hist.edges[:, 0]
                maxima = torch.empty(r.shape[:2], device=r.device)
                for u0, u1 in _unit_chunks(r, self.seg_grid, self.chunk):  # only the tail is ever interpolated
                    cols = upsample_columns(r[:, u0:u1], self.seg_grid, low[u0:u1], raw[:, u0:u1], raw_min[:, u0:u1],
                                            self.convention)
                    st.hist.add_columns(cols.values, cols.units + u0, cols.pixels, cols.stride, labels[st.hist.bins],
                                        cols.finite, drop_nonfinite=bad is not None)
                    if moments:
                        maxima[:, u0:u1] = _column_maxima(cols, low[u0:u1], (N, u1 - u0))
            if moments:  # on the layer's own grid: upsampling is a convex combination, bounds hold
                bound = source_bounds(raw, raw_min, self.convention)[0]  # of the upsampled maxima
                if bad is None:
                    for b0, b1 in slices:
                        st.moments.add(r[b0:b1], (raw_min[b0:b1].amin(0), raw[b0:b1].amax(0)))
                    st.topk.add(maxima if dense else self.maxima(r, st.topk, maxima, bound), ids, later)
                else:  # finite values only; the maxima of maps with non-finite values are over their finite pixels
                    for b0, b1 in slices:
                        st.moments.add(r[b0:b1], valid=torch.isfinite(r[b0:b1]))
                    maxima = torch.where(bad, finite_max, maxima)
                    bound = bound.masked_fill(bad, -math.inf)
                    st.topk.add(maxima if dense else self.maxima(r, st.topk, maxima, bound), ids, later)

        self.side.run(layer, list(stats), [self.units[name] for name in stats])

    def maxima(self, r, topk, known, bound):
        return _sample_maxima(r, self.seg_grid, topk, known, bound, self.chunk, self.convention)

    def skip_pixels(self, r, bad, seg, hist):
        """Count the non-finite upsampled pixels of the maps ``bad`` (N,U) into ``hist.skipped``
        (per unit, and per unit and label: they are left out of that unit's counts); return (N,U)
        each map's maximum over its finite pixels (-inf if none), for those maps."""
        H, W = self.seg_grid
        U, C1, K = r.shape[1], self.C + 1, seg.shape[1]
        nn, uu = torch.nonzero(bad, as_tuple=True)
        out = torch.full(bad.shape, -math.inf, device=r.device)
        skipped = torch.zeros(U, dtype=torch.long, device=r.device)
        joint = torch.zeros(U * C1, dtype=torch.long, device=r.device)
        per = max(1, self.chunk // max(1, H * W))
        for i in range(0, nn.numel(), per):
            n_, u_ = nn[i:i + per], uu[i:i + per]
            up = upsample(r[n_, u_][:, None], self.seg_grid, self.convention)[:, 0]
            nf = ~torch.isfinite(up)
            skipped.index_add_(0, u_, nf.flatten(1).sum(1))
            out[n_, u_] = up.masked_fill(nf, -math.inf).amax((1, 2))
            for k in range(K):  # deduped labels: each (pixel, concept) pair once, void = C
                key = (u_[:, None, None] * C1 + seg[n_, k])[nf]
                joint += torch.bincount(key, minlength=U * C1)
        hist.skipped += skipped
        hist.skipped_joint += joint.view(U, C1)
        return out

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
            fresh = {name: _LayerStats(None, None, TailHistogram(edges, self.C)) for name, edges in redo.items()}
            names = list(redo)
            batches = self.mine(self.batches(0, self.n))

            def replay(batch):  # on a lane: kept activations, or the generator only (segmentations are cached)
                acts = self.cached(*batch, names)
                if acts is not None:
                    return acts, self.cached_seg(*batch), None
                acts, seg, _, ext, _ = self.compute(*batch, layers=names)
                return acts, seg, ext

            self.sweep(batches, replay, lambda batch, out: self.accumulate(out[0], out[1], *batch, fresh, moments=False,
                                                                           ext=out[2]))
            for name in names:
                sum_histogram(fresh[name].hist, self.ranks)
            with self.guard.critical():
                for name in names:
                    self.stats[name].hist = fresh[name].hist

    def skipped_summary(self):
        """What nonfinite="skip" left out: samples (non-finite images) and, per layer, upsampled pixels."""
        out = {"images": int(self.skip.sum()) if self.skip is not None else 0}
        for name in self.layers:
            out[name] = int(self.stats[name].hist.skipped.sum())
        if any(out.values()) and self.ranks.writer:
            told = ", ".join(f"{k} {v}" for k, v in out.items() if v)
            warnings.warn(f"nonfinite='skip' left out non-finite values: {told} (images: samples left out whole; "
                          f"layers: upsampled unit pixels left out of their unit's counts)", RuntimeWarning,
                          stacklevel=3)
        return out

    def readout(self):
        out = {}
        for name in self.layers:
            st = self.stats[name]
            out[name] = read_layer(st.hist, st.moments, st.topk, self.q, self.shapes[name], self.C, self.skip_nonfinite)
            if self.iqr is not None:
                c = self.iqr[name]
                out[name].update(iqr=c.score.cpu().numpy(), iqr_concept=c.concept.cpu().numpy(),
                                 iqr_fraction=c.fraction.cpu().numpy())
        return out
