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

The work directory (``cache_dir/dissect-<key>/work``) holds the segmentation cache
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
import errno
import io
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import zlib

try:
    import fcntl
except ImportError:  # not on Windows: no locking there
    fcntl = None

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine.hooks import ThreadTraces, TraceDict, resolve_layers
from gandissect_widgets.engine.io import atomic_write_bytes, cache_key
from gandissect_widgets.engine.layer_listing import describe_output
from gandissect_widgets.engine.protocols import (NonFiniteError, ProtocolError, check_generator, check_images,
                                                 check_sample_z, check_segmenter, fingerprint, model_device,
                                                 sample_latents, segment)
from gandissect_widgets.engine.results import Dissection
from gandissect_widgets.engine.sidebyside import SideBySide
from gandissect_widgets.engine.stats import (MAX_BINS, RunningMoments, RunningTopK, TailHistogram,
                                             dedupe_channels, grid_edges, label_keys, pilot_edges)
from gandissect_widgets.engine.upsample import upsample, upsample_columns, upsample_max, upsample_pixels

__all__ = ["dissect", "ENGINE_VERSION", "WorkDirError", "CacheSpaceError", "CacheBusyError", "NonFiniteError"]

# 2: pilot window (0.01, 0.008) below/above the quantile; 3: evenly spaced edges, window
# (0.005, 0.004), pilot of 512 samples x 64 pixels; 4: edges on a power-of-two grid, a window
# sized per unit from the pilot's own error, pilot pixels one in each block of an 8 x 8 grid
ENGINE_VERSION = 4
_CHUNK_ELEMENTS = 1 << 25  # upsampled values (at most) held at once per layer
_PILOT_CACHE_BYTES = 256 << 20  # raw pilot activations kept for the main pass, at most
_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_LOCK_POLL = 0.1  # seconds between tries for a work directory another process holds
NONFINITE = ("error", "skip")


class WorkDirError(OSError, ValueError):
    """The dissection's work directory cannot be used (one-line message naming it and what to do)."""

    def __init__(self, message, directory=None, err=None):
        super().__init__(message)
        self.errno = err
        self.directory = directory


class CacheSpaceError(WorkDirError):
    """Not enough disk space in the work directory; nothing partial was left there."""


class CacheBusyError(WorkDirError):
    """Another process works on the same dissection (same cache key) and ``lock_wait`` ran out."""


def _fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _free_space(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _space_error(directory, what, need, cause=None):
    free = _free_space(directory)
    have = f", {_fmt_bytes(free)} free" if free is not None else ""
    err = CacheSpaceError(f"not enough disk space in {directory}: {what} needs {_fmt_bytes(need)}{have}; free some "
                          f"space, dissect fewer samples, or give another cache_dir (--cache-dir)",
                          directory, errno.ENOSPC)
    if cause is not None:
        err.__cause__ = cause
    return err


def _reserve(fd, size):
    """Allocate ``size`` bytes of the file ``fd`` on disk now (``posix_fallocate``; zeros written
    where the file system cannot), so that a memory map of it never meets a full disk."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                               errno.ENOSYS):
                raise
    block = bytes(1 << 20)
    pos = os.fstat(fd).st_size  # (holes before the end, left by other writers, stay: none of ours makes them)
    while pos < size:
        n = min(len(block), size - pos)
        pos += os.pwrite(fd, block[:n], pos)


class _InterruptGuard:
    """A SIGINT (Ctrl-C) that arrives inside ``critical()`` is held until the section ends, then
    raised; elsewhere it is raised at once.  Only where signals can be handled (the main thread);
    elsewhere no KeyboardInterrupt can arrive anyway."""

    def __init__(self):
        self.depth, self.pending = 0, False
        self._prev, self._installed = None, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                prev = signal.getsignal(signal.SIGINT)
            except (ValueError, OSError):
                prev = None
            if callable(prev):
                self._prev = prev
                try:
                    signal.signal(signal.SIGINT, self._handler)
                    self._installed = True
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._prev)
            self._installed = False
        return False

    def _handler(self, signum, frame):
        if self.depth > 0:
            self.pending = True  # a second Ctrl-C inside the section waits too: it is short
            return
        self._prev(signum, frame)

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending:
            self.pending = False
            self._prev(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


class _WorkLock:
    """An exclusive ``fcntl.flock`` on ``work_dir/lock``, held while a process works there.

    The holder may delete the directory (with the lock file) when done; a process that then gets
    the lock of a deleted file sees that the path no longer names it, and tries again."""

    def __init__(self, work_dir, done_path, wait=None, progress=True):
        self.work_dir, self.done_path = work_dir, done_path
        self.path = os.path.join(work_dir, "lock")
        self.wait, self.progress = wait, progress
        self.fd = None

    def _holder(self, fd):
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""
        return f" (pid {text})" if text.isdigit() else ""

    def acquire(self) -> bool:
        """True once the lock is held; False if the result appeared meanwhile (load it, no lock)."""
        if fcntl is None:
            os.makedirs(self.work_dir, exist_ok=True)
            return True
        deadline = None if self.wait is None else time.monotonic() + max(0.0, float(self.wait))
        told = False
        while True:
            if os.path.exists(self.done_path):
                return False
            try:
                os.makedirs(self.work_dir, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileNotFoundError:  # the holder removed the directory just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(f"{self.work_dir}: this file system cannot lock files ({os.strerror(e.errno)}); "
                                  f"the dissection runs unlocked: do not share this cache_dir between processes",
                                  RuntimeWarning, stacklevel=4)
                    self.fd = fd
                    return True
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CacheBusyError(
                        f"another process{holder} is working on this dissection in {self.work_dir}; wait for it "
                        f"to finish (lock_wait=None waits and then loads its result), or give another cache_dir",
                        self.work_dir, errno.EWOULDBLOCK) from None
                if not told and self.progress:
                    print(f"dissect: another process{holder} is working on this dissection in {self.work_dir}; "
                          f"waiting for it, then loading its result", file=sys.stderr, flush=True)
                    told = True
                time.sleep(_LOCK_POLL)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # locked a lock file its holder had removed: take the one there now
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid is only for messages (a full disk may refuse it)
            self.fd = fd
            return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _remove_work(work_dir, result_dir):
    """Remove a work directory that holds nothing to resume from, and its result directory if empty."""
    if os.path.exists(os.path.join(work_dir, "checkpoint.pt")):
        return
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(result_dir)


def dissect(generator, segmenter, layers, n_samples: int = 1000, seed: int = 1, quantile: float = 0.99,
            batch_size: int = 32, device=None, cache_dir=None, topk: int = 20, bins: int = 128,
            pilot_samples: int = 512, pilot_pixels: int = 64, rank_tolerance: float = 5e-4,
            checkpoint_every: float = 60.0, progress: bool = True, lanes: int = 2,
            generator_name: str | None = None, segmenter_name: str | None = None,
            nonfinite: str = "error", lock_wait: float | None = None) -> Dissection:
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
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
    if lock_wait is not None and not (isinstance(lock_wait, (int, float)) and not isinstance(lock_wait, bool)
                                      and lock_wait >= 0):
        raise ValueError(f"lock_wait must be None (wait as long as it takes) or seconds >= 0, got {lock_wait!r}")
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
    if nonfinite != "error":  # "error" gives a result only where nothing was left out: the same key as before
        key_parts["nonfinite"] = nonfinite
    key = cache_key(**key_parts)
    settings["cache_key"] = key
    settings["nonfinite"] = nonfinite

    def run_in(work_dir):
        run = _Run(generator, segmenter, layers, labels, n_samples, seed, quantile, batch_size, device, topk,
                   bins, pilot_samples, pilot_pixels, rank_tolerance, checkpoint_every, progress, work_dir, key,
                   lanes, nonfinite)
        arrays = run.execute()
        out = dict(settings)
        if nonfinite == "skip":
            out["nonfinite_skipped"] = run.skipped_summary()
        return Dissection(labels, arrays, out)

    if cache_dir is None:
        work_dir = tempfile.mkdtemp(prefix="gandissect-")
        try:
            return run_in(work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    result_dir = os.path.join(os.fspath(cache_dir), f"dissect-{key}")
    done = os.path.join(result_dir, "dissect.json")
    if os.path.exists(done):
        return Dissection.load(result_dir)
    work_dir = os.path.join(result_dir, "work")
    lock = _WorkLock(work_dir, done, lock_wait, progress)
    if not lock.acquire():  # another process finished it while this one waited
        return Dissection.load(result_dir)
    try:
        if os.path.exists(done):
            return Dissection.load(result_dir)
        result = run_in(work_dir)
        result.save(result_dir)
        shutil.rmtree(work_dir, ignore_errors=True)  # the lock file too: a waiting process takes the result
        return result
    finally:
        try:
            _remove_work(work_dir, result_dir)  # unless it holds a checkpoint to resume from
        finally:
            lock.release()


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
                 pilot_pixels, tol, checkpoint_every, progress, work_dir, key, lanes, nonfinite="error"):
        self.G, self.S, self.layers, self.labels = G, S, layers, labels
        self.n, self.seed, self.q, self.bs, self.device = int(n), int(seed), float(quantile), int(batch_size), device
        self.k, self.bins, self.tol = int(k), int(bins), float(tol)
        self.n_pilot, self.pilot_pixels = min(int(pilot_samples), self.n), int(pilot_pixels)
        self.checkpoint_every, self.progress, self.lanes = checkpoint_every, progress, int(lanes)
        self.work_dir, self.key = work_dir, key
        self.skip_nonfinite = nonfinite == "skip"
        self.ckpt_path = os.path.join(work_dir, "checkpoint.pt")
        self.seg_path = os.path.join(work_dir, "segmentation.npy")
        self.C = len(labels)
        self.z = check_sample_z(G, self.n, self.seed, sample_latents(G, self.n, self.seed))
        self.segmented = 0
        self.seg_cache = None
        self.seg_grid = None
        # samples left out whole (non-finite images, nonfinite="skip"), known up to self.segmented
        self.skip = np.zeros(self.n, dtype=bool) if self.skip_nonfinite else None
        self.stats: dict[str, _LayerStats] = {}
        self.next_batch = 0
        self.edges: dict[str, torch.Tensor] | None = None
        self.cache: dict[int, dict[str, torch.Tensor]] = {}  # the pilot's kept activations, by first sample
        self.guard = _InterruptGuard()
        self._dirty = False  # statistics half changed (an error inside a counting section): never saved

    # -- forward ------------------------------------------------------------------------------
    def probe(self):
        order, shapes, sizes, kinds = [], {}, {}, {}
        z = self.z[:1].to(self.device)

        def record(out, name):
            if name not in order:
                order.append(name)
            shapes[name] = tuple(out.shape) if torch.is_tensor(out) else None
            kinds[name] = describe_output(out)
            sizes[name] = out[0].numel() * out.element_size() if torch.is_tensor(out) and out.shape[0] else 0
            return out

        with torch.no_grad(), TraceDict(self.G, self.layers, retain_output=False, edit_output=record):
            x = self.G(z)
        check_images(x, 1)
        for name in self.layers:
            if name not in order:
                raise ProtocolError(f"layer {name!r} did not run in a forward pass of {type(self.G).__name__}")
            if shapes[name] is None or len(shapes[name]) != 4:
                raise ProtocolError(f"layer {name!r} outputs {kinds[name]}; dissection needs a convolutional "
                                    "feature map (N,C,h,w)")
        self.order = order
        self.stop_after = order[-1]
        self.units = {name: shapes[name][1] for name in self.layers}
        self.shapes = {name: shapes[name][1:] for name in self.layers}
        # the pilot batches whose activations the pilot keeps for the main pass, while they fit:
        # decided by sizes alone, so that a resumed run groups the batches as a whole one does
        per, held, self.keeps = sum(sizes[name] for name in self.layers), 0, set()
        for i0, i1 in self.batches(0, self.n_pilot):
            if held + (i1 - i0) * per <= _PILOT_CACHE_BYTES:
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
        Images and activations are checked for NaN and inf here, with one host sync a batch."""
        layers = layers or self.layers
        z = self.z[i0:i1].to(self.device)
        cached = i1 <= self.segmented
        fresh = need_seg and not cached
        stop = None if fresh else [l for l in self.order if l in layers][-1]
        with torch.no_grad():
            x, acts = self.traces.run(lambda: self.G(z), layers, stop_after=stop)
            if fresh:
                check_images(x, i1 - i0)
            ext = {name: (a.amax((2, 3)).float(), a.amin((2, 3)).float()) for name, a in acts.items()}
            flags = [torch.isfinite(hi).all() & torch.isfinite(lo).all() for hi, lo in ext.values()]
            if fresh:
                flags.append(torch.isfinite(x).all())
            bad_images = None
            if not bool(torch.stack(flags).all()):  # (a NaN or inf anywhere in a map is in its max or min)
                bad_images = self.nonfinite(i0, i1, acts, x if fresh else None)
            seg = None
            if need_seg:
                if cached:
                    seg = self.cached_seg(i0, i1)
                else:
                    if bad_images is not None:  # left out whole; the segmenter sees zeros instead
                        x = torch.where(torch.from_numpy(bad_images).to(x.device)[:, None, None, None],
                                        torch.zeros((), dtype=x.dtype, device=x.device), x)
                    seg = segment(self.S, x)
        return acts, seg, fresh, ext, bad_images

    def nonfinite(self, i0, i1, acts, x):
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
            raise NonFiniteError(f"the generator gave non-finite values (NaN or inf) for samples {i0}..{i1 - 1}: "
                                 f"{'; '.join(found)}; they would make the counts meaningless: give a generator "
                                 f"with finite outputs, or pass nonfinite='skip' (dissect(..., nonfinite='skip')) "
                                 f"to leave them out of the counts")
        return bad_images

    def cached_seg(self, i0, i1):
        return torch.from_numpy(np.asarray(self.seg_cache[i0:i1]).astype(np.int64)).to(self.device)

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
                _reserve(f.fileno(), need)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(self.seg_path)
            if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
                raise _space_error(self.work_dir, f"the segmentation cache ({self.n} samples of "
                                   f"{'x'.join(map(str, shape[1:]))} labels)", need, e) from None
            raise
        return np.load(self.seg_path, mmap_mode="r+")

    def _store_seg(self, i0, i1, seg, bad_images=None):
        with self.guard.critical():
            if self.seg_cache is None:
                dtype = np.uint8 if self.C <= 256 else (np.int16 if self.C <= 32767 else np.int32)
                self.seg_cache = self._create_seg_file(dtype, (self.n,) + tuple(seg.shape[1:]))
                self.seg_grid = tuple(seg.shape[-2:])
            elif tuple(seg.shape[1:]) != self.seg_cache.shape[1:]:
                raise ProtocolError(f"segmenter output changed shape from {self.seg_cache.shape[1:]} to "
                                    f"{tuple(seg.shape[1:])} between batches")
            self.seg_cache[i0:i1] = seg.cpu().numpy().astype(self.seg_cache.dtype)
            if self.skip is not None:
                self.skip[i0:i1] = bad_images if bad_images is not None else False
            self.segmented = max(self.segmented, i1)

    def batches(self, start, stop):
        return [(i, min(i + self.bs, stop)) for i in range(start, stop, self.bs)]

    # -- checkpoint ---------------------------------------------------------------------------
    def save_checkpoint(self):
        with self.guard.critical():  # an interrupt waits for the checkpoint
            if self.seg_cache is not None:
                self.seg_cache.flush()
            buf = io.BytesIO()
            torch.save({
                "key": self.key, "next_batch": self.next_batch, "segmented": self.segmented,
                "seg_grid": self.seg_grid, "edges": {k: v.cpu() for k, v in (self.edges or {}).items()} or None,
                "stats": {name: s.state_dict() for name, s in self.stats.items()},
                "skip": torch.from_numpy(self.skip.copy()) if self.skip is not None else None}, buf)
            data = buf.getvalue()
            try:
                atomic_write_bytes(self.ckpt_path, data)
            except OSError as e:
                if getattr(e, "errno", None) in _SPACE_ERRNOS:
                    raise _space_error(self.work_dir, "a checkpoint", len(data), e) from None
                raise

    def load_checkpoint(self):
        if not (os.path.exists(self.ckpt_path) and os.path.exists(self.seg_path)):
            return False
        try:
            ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception:
            return False
        if ck.get("key") != self.key:
            return False
        try:
            with open(self.seg_path, "r+b") as f:  # a file with holes (an older version's) gets its blocks now
                _reserve(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in _SPACE_ERRNOS:
                raise _space_error(self.work_dir, "the segmentation cache", os.path.getsize(self.seg_path), e) from None
            raise
        seg_cache = np.load(self.seg_path, mmap_mode="r+")
        if seg_cache.shape[0] != self.n:
            return False
        self.seg_cache = seg_cache
        self.segmented, self.next_batch = int(ck["segmented"]), int(ck["next_batch"])
        self.seg_grid = tuple(ck["seg_grid"]) if ck["seg_grid"] is not None else None
        if ck["edges"] is not None:
            self.edges = {k: v.to(self.device) for k, v in ck["edges"].items()}
        self.stats = {name: _LayerStats.from_state_dict(sd, self.device) for name, sd in ck["stats"].items()}
        if self.skip is not None and ck.get("skip") is not None:
            self.skip = ck["skip"].numpy().astype(bool).copy()
        return True

    # -- passes -------------------------------------------------------------------------------
    def execute(self):
        self.probe()
        with self.guard:
            resumed = self.load_checkpoint()
            pilot = [] if (resumed and self.edges is not None) else self.batches(0, self.n_pilot)
            main = self.batches(0, self.n)
            done = min(self.next_batch, len(main)) if resumed and self.edges is not None else 0
            if resumed and self.progress:
                counted = main[done - 1][1] if done else 0
                print(f"dissect: resuming from the checkpoint in {self.work_dir}: {counted} of {self.n} samples "
                      f"counted, {self.segmented} segmented", file=sys.stderr, flush=True)
            bar = tqdm(total=len(pilot) + len(main), desc="dissect", disable=not self.progress, initial=done)
            try:
                with SideBySide(self.device, self.lanes) as self.side, ThreadTraces(self.G, self.layers) as self.traces:
                    try:
                        if pilot:
                            self.pilot_pass(pilot, bar)
                        self.main_pass(main, bar)
                    finally:
                        bar.close()
                    self.refine()
            except BaseException as e:
                self.save_on_failure(e)
                raise
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
        with contextlib.closing(self.side.ahead(lambda batch: self.compute(*batch), batches)) as ahead:
            for (i0, i1), (acts, seg, fresh, _, bad) in zip(batches, ahead):
                if fresh:
                    self._store_seg(i0, i1, seg, bad)
                if values is None:  # the segmentation grid is known from the first batch on
                    R, S = self.pilot_grid()
                    values = {name: torch.empty(self.units[name], self.n_pilot, R * S, device=self.device)
                              for name in self.layers}
                self.sample_pilot(i0, i1, acts, values)
                bar.update(1)
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
        stats = {name: _LayerStats(self.units[name], self.k, self.device) for name in self.layers}
        for name in self.layers:
            stats[name].hist = TailHistogram(edges[name], self.C)
        with self.guard.critical():
            self.edges, self.stats, self.next_batch = edges, stats, 0
        if time.monotonic() - start >= self.checkpoint_every:
            self.save_checkpoint()

    def pilot_grid(self):
        """The R x S blocks of the segmentation grid that each hold one pilot pixel per sample."""
        return tuple(min(round(math.sqrt(self.pilot_pixels)), n) for n in self.seg_grid)

    def sample_pilot(self, i0, i1, acts, values):
        """Keep the batch's activations for the main pass (those of ``self.keeps``) and write its
        pilot values: one random pixel in each block of each sample, independent pixels, spread out."""
        if i0 in self.keeps:  # the main pass reuses them
            self.cache[i0] = acts
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
        # batches the pilot keeps are counted together, as many as one unit chunk holds (computed
        # again if a resumed run does not hold them: the groups are the same, so are the bits);
        # they stay for refinement only if they are all the samples (else the forward passes to
        # come need their memory)
        group = max(self.bs, _CHUNK_ELEMENTS // max(self.units[name] * H * W for name in self.layers))
        planned = [self.planned(i0, i1) for i0, i1 in batches]
        keep = all(planned)
        steps, b = [], 0  # (b, e, kept): kept batches b..e-1 counted together, or batch b run
        while b < len(batches):
            i0, e = batches[b][0], b
            while e < len(batches) and batches[e][1] - i0 <= group and planned[e]:
                e += 1
            steps.append((b, e, True) if e > b else (b, b + 1, False))
            b = steps[-1][1]
        steps = [(max(b, self.next_batch), e, kept) for b, e, kept in steps if e > self.next_batch]

        def run(step):  # on a lane, ahead of the statistics
            b, e, kept = step
            if not kept:
                return self.compute(*batches[b])
            return {j: self.compute(*batches[j], need_seg=False)[0] for j in range(b, e)
                    if self.cached(*batches[j], self.layers) is None}

        with contextlib.closing(self.side.ahead(run, steps)) as ahead:
            for b, e, kept in steps:
                i0, i1 = batches[b][0], batches[e - 1][1]
                out = next(ahead)
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
                bar.update(e - b)
                if time.monotonic() - last >= self.checkpoint_every and e < len(batches):
                    self.save_checkpoint()
                    last = time.monotonic()

    def accumulate(self, acts, seg, i0, i1, stats, moments=True, ext=None):
        ids = torch.arange(i0, i1, device=self.device)
        if self.skip is not None and self.skip[i0:i1].any():  # samples with non-finite images: left out whole
            keep = torch.from_numpy(~self.skip[i0:i1]).to(self.device)
            if not bool(keep.any()):
                return
            acts = {name: a[keep] for name, a in acts.items()}
            seg, ids = seg[keep], ids[keep]
            ext = {name: (hi[keep], lo[keep]) for name, (hi, lo) in ext.items()} if ext is not None else None
        seg = dedupe_channels(seg, self.C)
        labels = label_keys(seg, self.bins, self.C)
        concepts = torch.bincount(seg.reshape(-1), minlength=self.C + 1)

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
            low = st.hist.edges[:, 0]
            maxima = torch.empty(r.shape[:2], device=r.device)
            for u0, u1 in _unit_chunks(r, self.seg_grid):  # only the tail is ever interpolated
                cols = upsample_columns(r[:, u0:u1], self.seg_grid, low[u0:u1], raw[:, u0:u1], raw_min[:, u0:u1])
                st.hist.add_columns(cols.values, cols.units + u0, cols.pixels, cols.stride, labels, cols.finite,
                                    drop_nonfinite=bad is not None)
                if moments:
                    maxima[:, u0:u1] = _column_maxima(cols, low[u0:u1], (N, u1 - u0))
            if moments:  # on the layer's own grid: upsampling is a convex combination, bounds hold
                if bad is None:
                    st.moments.add(r, (raw_min.amin(0), raw.amax(0)))
                    st.topk.add(_sample_maxima(r, self.seg_grid, st.topk, maxima, raw), ids)
                else:  # finite values only; the maxima of maps with non-finite values are over their finite pixels
                    st.moments.add(r, valid=torch.isfinite(r))
                    maxima = torch.where(bad, finite_max, maxima)
                    raw = raw.masked_fill(bad, -math.inf)
                    st.topk.add(_sample_maxima(r, self.seg_grid, st.topk, maxima, raw), ids)

        self.side.run(layer, list(stats), [self.units[name] for name in stats])

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
        per = max(1, _CHUNK_ELEMENTS // max(1, H * W))
        for i in range(0, nn.numel(), per):
            n_, u_ = nn[i:i + per], uu[i:i + per]
            up = upsample(r[n_, u_][:, None], self.seg_grid)[:, 0]
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
            fresh = {}
            for name, edges in redo.items():
                s = _LayerStats.__new__(_LayerStats)
                s.hist = TailHistogram(edges, self.C)
                fresh[name] = s
            names = list(redo)
            batches = self.batches(0, self.n)

            def replay(batch):  # on a lane: kept activations, or the generator only (segmentations are cached)
                acts = self.cached(*batch, names)
                if acts is not None:
                    return acts, self.cached_seg(*batch), None
                acts, seg, _, ext, _ = self.compute(*batch, layers=names)
                return acts, seg, ext

            with contextlib.closing(self.side.ahead(replay, batches)) as ahead:
                for (i0, i1), (acts, seg, ext) in zip(batches, ahead):
                    self.accumulate(acts, seg, i0, i1, fresh, moments=False, ext=ext)
            with self.guard.critical():
                for name in names:
                    self.stats[name].hist = fresh[name].hist

    def skipped_summary(self):
        """What nonfinite="skip" left out: samples (non-finite images) and, per layer, upsampled pixels."""
        out = {"images": int(self.skip.sum()) if self.skip is not None else 0}
        for name in self.layers:
            out[name] = int(self.stats[name].hist.skipped.sum())
        if any(out.values()):
            told = ", ".join(f"{k} {v}" for k, v in out.items() if v)
            warnings.warn(f"nonfinite='skip' left out non-finite values: {told} (images: samples left out whole; "
                          f"layers: upsampled unit pixels left out of their unit's counts)", RuntimeWarning,
                          stacklevel=3)
        return out

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
            skipped = bool(h.skipped.any())
            if skipped:  # each unit's concept pixels: those where its values were finite
                concept_u = h.unit_concept_pixels()[:, :self.C].clone()
                concept_u[:, 0] = 0
                union = mask[:, None] + concept_u - inter
            else:
                union = mask[:, None] + concept[None, :] - inter
            iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.zeros((), dtype=torch.float64, device=union.device))
            thr = h.edges.gather(1, j[:, None])[:, 0]
            mean, std = st.moments.mean, st.moments.variance.sqrt()
            vmin, vmax = st.moments.min, st.moments.max
            if skipped or st.moments.count.dim():
                empty = h.unit_pixels() == 0
                thr = torch.where(empty, torch.full((), math.nan, device=thr.device), thr)
                none = st.moments.counts == 0
                nan = torch.full((), math.nan, dtype=torch.float64, device=mean.device)
                mean, std, vmin, vmax = (torch.where(none, nan, v) for v in (mean, std, vmin, vmax))
            out[name] = {
                "iou": iou.cpu().numpy(), "intersection": inter.cpu().numpy(), "mask_pixels": mask.cpu().numpy(),
                "concept_pixels": concept.cpu().numpy(), "n_pixels": np.asarray(int(h.n_pixels)),
                "thresholds": thr.cpu().numpy().astype(np.float32), "fraction_above": frac.cpu().numpy(),
                "topk_indices": st.topk.indices.cpu().numpy(), "topk_values": st.topk.values.float().cpu().numpy(),
                "mean": mean.cpu().numpy(), "std": std.cpu().numpy(),
                "min": vmin.cpu().numpy(), "max": vmax.cpu().numpy(),
                "shape": np.asarray(self.shapes[name], dtype=np.int64)}
            if self.skip_nonfinite:
                out[name]["nonfinite_pixels"] = h.skipped.cpu().numpy()
        return out
