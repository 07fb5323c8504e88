"""Streaming, mergeable per-unit statistics, computed on the device of the data.

- ``RunningMoments``: count, mean, variance, min and max per unit (Chan's parallel update).
- ``RunningTopK``: the k samples with the largest per-sample value of each unit, ties broken by
  the smaller sample index, so merging is exact.
- ``TailHistogram``: per-unit histogram of activations with per-unit bin edges packed around a
  target quantile, jointly with the segmentation label of every pixel.  One pass gives both the
  threshold (an edge, with its exact rank) and the exact intersection/union counts at that
  threshold for every concept: the whole of a dissection in one pass of the generator and the
  segmenter.

Every statistic has ``merge(other)`` (statistics over A and over B combine into those over A+B)
and ``state_dict()`` / ``from_state_dict()`` for checkpoints.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gandissect_widgets.engine import devices

__all__ = ["RunningMoments", "RunningTopK", "TailHistogram", "LabelKeys", "label_keys", "pilot_edges",
           "grid_edges", "pilot_window", "dedupe_channels", "count_labels"]

_EVEN_SLACK = 5e-4  # how far (in bins) float32 edges may stray from even spacing and still bin by arithmetic
_NEAR_EDGE = 1e-3   # values closer than this (in bins) to an edge of such units are binned by search
MAX_BINS = 1024     # the rounding argument of the arithmetic binning holds up to here


def _t(x):
    return x.detach().cpu().clone() if torch.is_tensor(x) else x


class RunningMoments:
    """Per-unit count, mean, M2 (sum of squared deviations), min, max, in float64."""

    def __init__(self, units: int, device=None):
        self.units = units
        dev = torch.device(device or "cpu")
        self.count = torch.zeros((), dtype=torch.float64, device=dev)
        self.mean = torch.zeros(units, dtype=torch.float64, device=dev)
        self.m2 = torch.zeros(units, dtype=torch.float64, device=dev)
        self.min = torch.full((units,), math.inf, dtype=torch.float64, device=dev)
        self.max = torch.full((units,), -math.inf, dtype=torch.float64, device=dev)

    def add(self, x: torch.Tensor, extremes=None, valid: torch.Tensor | None = None):
        """x: (N, U, ...) values; every entry but the unit axis (1) is one observation.
        ``extremes``: their per-unit (min, max), if the caller has them.  ``valid``: a mask of
        x's shape; only the observations it marks are counted (the counts become per unit)."""
        if x.shape[1] != self.units:
            raise ValueError(f"expected {self.units} units on axis 1, got shape {tuple(x.shape)}")
        n = x.numel() // self.units
        if n == 0:
            return
        if valid is not None:
            return self._add_masked(x, valid)
        x = x.reshape(x.shape[0], self.units, -1)
        if x.dtype != torch.float64:
            x = x.float()
        bmean = x.mean((0, 2))
        bm2 = (x - bmean[None, :, None]).square_().sum((0, 2))
        mn, mx = extremes if extremes is not None else (x.amin((0, 2)), x.amax((0, 2)))
        self._combine(float(n), bmean.double(), bm2.double(), mn.double(), mx.double())

    def _add_masked(self, x, valid):
        U = self.units
        x = x.reshape(x.shape[0], U, -1).double()
        v = valid.reshape(x.shape).to(x.device)
        n = v.sum((0, 2)).double()
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        bmean = torch.where(v, x, zero).sum((0, 2)) / n.clamp(min=1)
        bm2 = torch.where(v, (x - bmean[None, :, None]).square(), zero).sum((0, 2))
        mn = torch.where(v, x, torch.full((), math.inf, dtype=x.dtype, device=x.device)).amin((0, 2))
        mx = torch.where(v, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).amax((0, 2))
        self._combine_units(n, bmean, bm2, mn, mx)

    def _combine_units(self, n, mean, m2, mn, mx):
        """``_combine`` with per-unit counts, some of which may be 0."""
        dev = self.mean.device
        n = n.to(dev, torch.float64).expand(self.units)
        count = self.count.expand(self.units)
        tot = count + n
        safe = tot.clamp(min=1)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        delta = mean.to(dev) - self.mean
        self.mean = self.mean + delta * torch.where(tot > 0, n / safe, zero)
        self.m2 = self.m2 + m2.to(dev) + delta ** 2 * torch.where(tot > 0, count * n / safe, zero)
        self.count = tot
        self.min = torch.minimum(self.min, mn.to(dev))
        self.max = torch.maximum(self.max, mx.to(dev))

    def _combine(self, n, mean, m2, mn, mx):
        """``n``: a tensor, or a Python number (no copy to the device: no host synchronisation)."""
        if torch.is_tensor(n) and n.dim() or self.count.dim():
            return self._combine_units(torch.as_tensor(n, dtype=torch.float64), mean, m2, mn, mx)
        n = n.to(self.mean.device) if torch.is_tensor(n) else n
        tot = self.count + n
        delta = mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + m2.to(self.m2.device) + delta ** 2 * (self.count * n / tot)
        self.count = tot
        self.min = torch.minimum(self.min, mn.to(self.min.device))
        self.max = torch.maximum(self.max, mx.to(self.max.device))

    def merge(self, other: "RunningMoments"):
        if other.units != self.units:
            raise ValueError(f"cannot merge moments of {other.units} units into {self.units}")
        if bool((other.count > 0).any()):
            self._combine(other.count, other.mean, other.m2, other.min, other.max)
        return self

    @property
    def variance(self):
        return self.m2 / (self.count - 1).clamp(min=1)

    @property
    def counts(self) -> torch.Tensor:
        """(U,) observations counted per unit (the same for all, but after masked adds)."""
        return self.count.expand(self.units)

    def state_dict(self):
        return {k: _t(getattr(self, k)) for k in ("count", "mean", "m2", "min", "max")}

    @classmethod
    def from_state_dict(cls, sd, device=None):
        self = cls(sd["mean"].shape[0], device)
        for k in ("count", "mean", "m2", "min", "max"):
            setattr(self, k, sd[k].to(self.mean.device))
        return self


class RunningTopK:
    """The k largest (value, sample index) pairs per unit; ties go to the smaller index."""

    def __init__(self, units: int, k: int, device=None):
        if k < 1:
            raise ValueError(f"top-k needs k >= 1, got {k}")
        dev = torch.device(device or "cpu")
        self.units, self.k = units, k
        self.values = torch.empty(units, 0, device=dev)
        self.indices = torch.empty(units, 0, dtype=torch.long, device=dev)

    def add(self, values: torch.Tensor, sample_ids: torch.Tensor, later: bool | None = None):
        """values: (N, U) per-sample scores; sample_ids: (N,) global sample indices.
        ``later=True``: the caller knows the ids are increasing and after every id kept so far
        (a pass in sample order), so nothing is checked on the host (no synchronisation)."""
        if later:
            v = values.detach().t().to(self.values.device, self.values.dtype if self.values.numel() else values.dtype)
            ids = sample_ids.to(self.indices.device).long()[None].expand(self.units, -1)
            return self._keep(torch.cat([self.values.to(v.dtype), v], 1), torch.cat([self.indices, ids], 1), by_id=True)
        if self.values.shape[1] == self.k and not bool((values.detach() >= self.kth()[None].to(values)).any()):
            return  # none can enter
        v = values.detach().t().to(self.values.device, self.values.dtype if self.values.numel() else values.dtype)
        ids = sample_ids.to(self.indices.device).long()[None].expand(self.units, -1)
        # kept values are in order of value, then id: new samples after all kept ones, in order,
        # need no sort by id
        later = ids.shape[1] < 2 or bool((ids[0, 1:] > ids[0, :-1]).all())
        later = later and (self.indices.numel() == 0 or bool(ids[0, 0] > self.indices.max()))
        self._keep(torch.cat([self.values.to(v.dtype), v], 1), torch.cat([self.indices, ids], 1), by_id=later)

    def _keep(self, v, ids, by_id=False):
        """Keep the top k of each row; ``by_id``: equal values already stand in order of id."""
        if not by_id:
            order = torch.sort(ids, dim=1, stable=True).indices
            v, ids = v.gather(1, order), ids.gather(1, order)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.values, self.indices = v.gather(1, order), ids.gather(1, order)

    def kth(self) -> torch.Tensor:
        """(U,) the k-th largest value kept so far (-inf until k values are kept): a sample
        whose score is below it cannot enter."""
        if self.values.shape[1] < self.k:
            return torch.full((self.units,), -math.inf, device=self.values.device)
        return self.values[:, -1].float()

    def merge(self, other: "RunningTopK"):
        if other.units != self.units:
            raise ValueError(f"cannot merge top-k of {other.units} units into {self.units}")
        self._keep(torch.cat([self.values, other.values.to(self.values)], 1),
                   torch.cat([self.indices, other.indices.to(self.indices.device)], 1))
        return self

    def state_dict(self):
        return {"k": self.k, "values": _t(self.values), "indices": _t(self.indices)}

    @classmethod
    def from_state_dict(cls, sd, device=None):
        self = cls(sd["values"].shape[0], int(sd["k"]), device)
        self.values = sd["values"].to(self.values.device)
        self.indices = sd["indices"].to(self.indices.device)
        return self


def dedupe_channels(seg: torch.Tensor, void: int) -> torch.Tensor:
    """(N,K,H,W) labels with 0 and repeats of a label already present at that pixel set to ``void``.

    A pixel belongs to concept c if any channel says c (DESIGN §3); deduping makes every
    (pixel, concept) pair count once however many channels agree.  Label 0 (unlabeled) is no concept.
    """
    void_t = torch.full((), void, dtype=seg.dtype, device=seg.device)
    seg = torch.where(seg == 0, void_t, seg)  # (torch.where: no data-dependent shapes, no host sync)
    for k in range(1, seg.shape[1]):
        dup = torch.zeros_like(seg[:, k], dtype=torch.bool)
        for j in range(k):
            dup |= seg[:, k] == seg[:, j]
        seg[:, k] = torch.where(dup & (seg[:, k] != void_t), void_t, seg[:, k])
    return seg


def count_labels(seg: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int64 counts of the values of ``seg`` (all < size): ``bincount`` on a CPU, a
    fixed-size scatter elsewhere (``bincount`` sizes its output by the data: a host sync)."""
    flat = seg.reshape(-1)
    if devices.on_host(flat.device):
        return torch.bincount(flat, minlength=size)[:size]
    out = torch.zeros(size, dtype=torch.long, device=flat.device)
    return out.index_add_(0, flat.long(), torch.ones(1, dtype=torch.long, device=flat.device).expand(flat.numel()))


class LabelKeys(NamedTuple):
    """Deduped labels (N,K,H,W) as joint-histogram offsets ``label * (bins + 1)``, one channel
    after the other, each of N*H*W pixels and one image of padding (so that slots past a short
    column stay in range): pixel i of the (N,H,W) grid in channel k is ``keys[i + k * plane]``."""
    keys: torch.Tensor
    channels: int
    plane: int


def label_keys(seg: torch.Tensor, bins: int, concepts: int) -> LabelKeys:
    """``seg`` deduped with the void label ``concepts`` (``dedupe_channels``)."""
    N, K, H, W = seg.shape
    dtype = torch.int32 if (concepts + 1) * (bins + 1) < 2 ** 31 else torch.int64
    keys = torch.zeros(K, N + 1, H * W, dtype=dtype, device=seg.device)
    keys[:, :N] = seg.transpose(0, 1).reshape(K, N, H * W) * (bins + 1)
    return LabelKeys(keys.view(-1), K, (N + 1) * H * W)


def grid_edges(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-unit edges (U, bins) float32 covering [lo, hi] (U,): ``(k + j + 1/2) * w`` for
    j = 0..bins-1, with w a power of two (at least 2^-21 of the values' magnitude).

    On such a grid a float32 value's bin is exact arithmetic (``TailHistogram``): in float64,
    ``v - e0`` is exact or far from every edge, and scaling by 1/w is exact.  The bins are at
    most twice as wide as ``(hi - lo) / (bins - 2)``.
    """
    if bins < 3:
        raise ValueError(f"grid edges need at least 3 bins, got {bins}")
    lo, hi = lo.double().nan_to_num(0.0, 3e38, -3e38), hi.double().nan_to_num(0.0, 3e38, -3e38)
    hi = torch.maximum(lo, hi)
    scale = torch.maximum(lo.abs(), hi.abs())
    w = torch.maximum((hi - lo) / (bins - 2), torch.maximum(scale * 2.0 ** -21, torch.full_like(scale, 2.0 ** -100)))
    w = torch.exp2(torch.log2(w).ceil())
    e0 = (torch.floor(lo / w - 0.5) + 0.5) * w
    steps = torch.arange(bins, dtype=torch.float64, device=lo.device)
    return (e0[:, None] + w[:, None] * steps[None]).float().contiguous()


def pilot_edges(values: torch.Tensor, quantile: float, bins: int = 128, window=(0.005, 0.004),
                population: int | None = None, pixels: int | None = None) -> torch.Tensor:
    """Per-unit bin edges on a grid (``grid_edges``) covering the pilot's values at ranks
    ``quantile - below`` and ``quantile + above``.

    values: (U, M) pilot activations, or (U, n, S): S random pixels (of ``pixels``) of each of the
    first n of ``population`` samples, in which case the window is sized for each unit from the
    pilot's own error (``pilot_window``) and ``window`` is ignored.  Otherwise window: (below,
    above) rank widths, each a float or a (U,) tensor.  The window must hold the true quantile
    despite the pilot's error (a pilot that misses is repaired by refinement); its lower end
    decides how much of every map is binned.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    U = values.shape[0]
    flat = values.reshape(U, -1).float()
    M = flat.shape[1]
    finite = torch.isfinite(flat)
    if M and not bool(finite.all()):
        return _pilot_edges_nonfinite(values, finite, quantile, bins, window, population, pixels)
    pos = lambda rank: (torch.as_tensor(rank, dtype=torch.float64).clamp(0, 1) * (M - 1)).round().long().expand(U)  # noqa: E731
    if values.dim() == 3:
        below = above = torch.full((U,), _WINDOW_CAP, dtype=torch.float64)
    else:
        below, above = (torch.as_tensor(x, dtype=torch.float64).expand(U) for x in window)
    # only the upper tail is read: select it rather than sort everything
    k = M - int(pos(quantile - below).min())
    top, where = torch.topk(flat, k, dim=1, sorted=True)                         # descending
    at = lambda p: top.gather(1, (M - 1 - p).clamp(max=k - 1).to(top.device)[:, None])[:, 0]  # noqa: E731
    if values.dim() == 3:
        n, S = values.shape[1:]
        # each sample's fraction of pilot pixels above the pilot's quantile, from the tail alone
        above_q = (top > at(pos(quantile))[:, None]).float()
        fractions = torch.zeros(U, n, device=top.device).scatter_add_(1, torch.div(where, S, rounding_mode="floor"), above_q) / S
        below = above = pilot_window(fractions, S, population or n, pixels or 0).cpu().double().clamp(max=_WINDOW_CAP)
    return grid_edges(at(pos(quantile - below)), at(pos(quantile + above)), bins)


_WINDOW_CAP = 0.012  # the widest a pilot's window may get: a pilot worse than this is repaired


def _pilot_edges_nonfinite(values, finite, quantile, bins, window, population, pixels):
    """``pilot_edges`` where some values are NaN or infinite (left out, ``nonfinite="skip"``):
    units with only finite values as usual; each other unit from its finite values alone, in the
    widest window (refinement repairs a miss); units with none get edges around 0 (they count nothing)."""
    U = values.shape[0]
    ok = finite.reshape(U, -1).all(1)
    edges = torch.empty(U, bins, dtype=torch.float32, device=values.device)
    if bool(ok.any()):
        edges[ok] = pilot_edges(values[ok], quantile, bins, window, population, pixels)
    flat = values.reshape(U, -1)
    for u in torch.nonzero(~ok).view(-1).tolist():
        v = flat[u][finite.reshape(U, -1)[u]]
        if v.numel() == 0:
            edges[u] = grid_edges(torch.zeros(1, device=values.device), torch.zeros(1, device=values.device), bins)[0]
        else:
            edges[u] = pilot_edges(v[None], quantile, bins, window=(_WINDOW_CAP, _WINDOW_CAP))[0]
    return edges


def pilot_window(fractions: torch.Tensor, pixels_seen: int, population: int, pixels: int, z: float = 4.5,
                 least: float = 5e-4) -> torch.Tensor:
    """Per-unit half-width (U,) in rank of a window around the pilot's quantile that holds the
    quantile of the whole data set.  ``fractions`` (U, n): of ``pixels_seen`` random pixels (of
    ``pixels``) of each of the first n of ``population`` samples, the fraction above the pilot's
    quantile.

    The pilot's rank error has two parts: which samples it saw (none, if it saw them all) and
    which pixels of them: var = s_f^2 (1/n - 1/population) + mean(f(1-f))/(S n), where s_f^2 is
    the variance of the fractions f less their pixel noise.  The window is ``z`` standard errors
    plus ``least``.  It assumes the pilot's samples represent the rest: a unit that fires on a few
    samples the pilot hardly saw can miss its window (the dissection then refines it).  The pixel
    term is that of independent random pixels; the dissection's pilot takes one pixel in each block
    of a grid, whose error is smaller (0.7 of it on SceneWorld): the window is on the safe side.
    """
    f = fractions.double()
    U, n = f.shape
    S = pixels_seen
    fpc = max(0.0, 1 - S / pixels) if pixels > 1 else 1.0
    pixel_var = (f * (1 - f)).mean(1) * fpc / S
    sample_var = ((f.var(1) if n > 1 else torch.zeros_like(pixel_var)) - pixel_var).clamp(min=0)
    var = sample_var * max(0.0, 1 / n - 1 / population) + pixel_var / n
    return (z * var.sqrt() + least).float()


def _at_least_float32(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class TailHistogram:
    """Per-unit histogram of activations over per-unit ``edges`` (U,B), jointly with concepts.

    Bins: 0 = (-inf, e0], j = (e_{j-1}, e_j], B = (e_{B-1}, inf).  Only values above e0 are binned
    (the tail); bin 0 is the remainder.  ``joint[u, c, j]`` counts pixels of unit u in bin j whose
    label is c, so thresholding at edge e_j gives, exactly:
    mask count = sum_{b>j} hist[u, b] and intersection = sum_{b>j} joint[u, c, b].
    Labels arrive deduped (``dedupe_channels``) with the void label ``concepts`` (ignored).
    """

    def __init__(self, edges: torch.Tensor, concepts: int):
        self.edges = edges.float().contiguous()
        U, B = self.edges.shape
        if U == 0 or B == 0:
            raise ValueError("a TailHistogram needs at least one unit and one edge")
        if B > MAX_BINS:  # _bins' rounding argument holds up to here
            raise ValueError(f"a TailHistogram takes at most {MAX_BINS} edges per unit, got {B}")
        self.units, self.bins, self.concepts = U, B, concepts
        dev = self.edges.device
        self.n_pixels = torch.zeros((), dtype=torch.long, device=dev)
        self.hist = torch.zeros(U, B + 1, dtype=torch.long, device=dev)
        self.joint = torch.zeros(U, concepts + 1, B + 1, dtype=torch.long, device=dev)
        self.concept_pixels = torch.zeros(concepts + 1, dtype=torch.long, device=dev)
        # pixels left out of a unit's counts (non-finite upsampled values, ``nonfinite="skip"``):
        # how many per unit, and per unit and label (so its concept pixels can be less them)
        self.skipped = torch.zeros(U, dtype=torch.long, device=dev)
        self.skipped_joint = torch.zeros(U, concepts + 1, dtype=torch.long, device=dev)
        self._prepare()

    def _prepare(self):
        e = self.edges.double()
        B = self.bins
        # evenly spaced edges bin by arithmetic: j = ceil((v - e0) / width), computed in float64;
        # exact for float32 values on a grid (``grid_edges``, a dissection's); for other evenly
        # spaced units, values within _NEAR_EDGE of an edge are searched for; a unit whose float32
        # edges stray from even spacing by more than _EVEN_SLACK of a bin gets inv = 0, so that
        # every one of its values is searched for
        width = (e[:, -1] - e[:, 0]) / max(B - 1, 1)
        ok = torch.isfinite(width) & (width > 0) & (B > 1)
        width = torch.where(ok, width, torch.ones_like(width))
        even = e[:, :1] + width[:, None] * torch.arange(B, dtype=torch.float64, device=e.device)[None]
        stray = ((e - even).abs().amax(1) / width).nan_to_num(math.inf)
        ok &= stray < _EVEN_SLACK
        k = e[:, 0] / width - 0.5
        self._grid = ok & (torch.frexp(width).mantissa == 0.5) & (k == k.round()) & (k.abs() < 2 ** 22) & (e == even).all(1)
        self._all_grid = bool(self._grid.all())
        self._e0 = e[:, 0].clone()
        self._inv = torch.where(ok, 1 / width, torch.zeros_like(width))
        # a grid at least B+1 bins away from 0 bins exactly in float32 too: inside it v - e0 is
        # exact (Sterbenz), outside it the guess is at or beyond an end anyway
        away = (e[:, 0] >= (B + 1) * width) | (e[:, -1] <= -(B + 1) * width)
        self._all_exact32 = self._all_grid and bool(away.all())
        self._e0_32, self._inv_32 = self._e0.float(), self._inv.float()
        C1 = self.concepts + 1
        size = self.units * C1 * (B + 1)
        self._key_dtype = torch.int32 if size < 2 ** 31 else torch.int64
        self._key_offset = (torch.arange(self.units, device=e.device) * (C1 * (B + 1))).to(self._key_dtype)

    def bin_of(self, vals: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """Bin 1..B of each value above its unit's lowest edge: j with e_{j-1} < v <= e_j
        (e_B = inf), exactly.  ``m``: value i belongs to unit ``u[m[i]]`` (values grouped, e.g.
        by interpolation tile)."""
        if m is not None:
            u = u.index_select(0, m)
        return self._bins(vals, u, None).clamp_(1, self.bins).long()

    def _bins(self, vals, units, per_column):
        """Bins as float64 ceil((v - e0) * inv), exact (see ``_prepare``), not yet clamped.

        ``vals`` (V,) of ``units`` (V,); or, with ``per_column``, ``vals`` (P, Mc) whose column i
        holds values of unit ``units[i]``.  Values far below the lowest edge are not searched
        for (their bin is 0 or less); NaN must not be passed."""
        vals = _at_least_float32(vals)
        if self.bins == 1:  # one edge (a threshold given, e.g. the IQR rule's): above it or not
            return (vals > self.edges[:, 0].to(vals.dtype).index_select(0, units)).to(torch.float64)
        if self._all_exact32 and vals.dtype == torch.float32:
            e0, inv = self._e0_32.index_select(0, units), self._inv_32.index_select(0, units)
            return (vals - e0).mul_(inv).ceil_()
        e0, inv = self._e0.index_select(0, units), self._inv.index_select(0, units)
        t = (vals.double() - e0).mul_(inv)
        guess = t.ceil()
        if self._all_grid and vals.dtype != torch.float64:
            return guess
        near = ~((guess - t).sub_(0.5).abs_() <= 0.5 - _NEAR_EDGE) & ~(t <= -1)  # NaN (inf - inf, inf * 0): searched
        if vals.dtype != torch.float64:  # float64 values are not exact on the grid
            near &= ~self._grid.index_select(0, units)
        near = torch.nonzero(near.view(-1)).squeeze(1)
        step = 1 << 14
        for i in range(0, near.numel(), step):  # each against its own unit's edges
            at = near[i:i + step]
            v = vals.reshape(-1).index_select(0, at)
            u = units.index_select(0, at % units.numel() if per_column else at)
            rows = self.edges.index_select(0, u).to(v.dtype)
            guess.view(-1)[at] = torch.searchsorted(rows, v[:, None])[:, 0].to(guess.dtype)
        return guess

    def count_pixels(self, seg: torch.Tensor, concept_counts: torch.Tensor | None = None):
        """Count the pixels and concept pixels of a batch of deduped labels (N,K,H,W), once a batch
        (``concept_counts``: their ``bincount`` if the caller has it)."""
        C1 = self.concepts + 1
        self.n_pixels += seg.shape[0] * seg.shape[-2] * seg.shape[-1]
        if concept_counts is None:
            concept_counts = count_labels(seg, C1)
        self.concept_pixels += concept_counts[:C1]

    def _count(self, key, channel):
        """Add bincounts of joint-cell keys (bin 0 is a dump: not counted)."""
        B, C1 = self.bins, self.concepts + 1
        counts = torch.bincount(key.reshape(-1), minlength=self.units * C1 * (B + 1))
        counts = counts[:self.units * C1 * (B + 1)].view(self.units, C1, B + 1)[:, :, 1:]
        self.joint[:, :, 1:] += counts
        if channel == 0:  # channel 0 labels every pixel (0 -> void): its counts summed over labels are the histogram
            self.hist[:, 1:] += counts.sum(1)

    def add_columns(self, values: torch.Tensor, units: torch.Tensor, pixels: torch.Tensor, stride: int,
                    labels: "LabelKeys", finite: bool = True, drop_nonfinite: bool = False):
        """Add every value of ``upsample_columns``' columns (those at or below the lowest edge
        fall in the uncounted bin 0): ``values`` (P, Mc), column i of unit ``units[i]``, its
        slot p at pixel ``pixels[i] + p * stride`` of the labels' (N,H,W) grid.
        ``finite``: whether ``values`` are free of NaN (-inf and inf are fine).
        ``drop_nonfinite``: NaN and inf go to bin 0 too (the caller counts them in ``skipped``)."""
        if values.numel() == 0:
            return
        if drop_nonfinite:
            values = values.nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        elif not finite:
            values = values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        bins = self._bins(values, units, True).clamp_(0, self.bins).to(self._key_dtype)
        key = bins.add_(self._key_offset.index_select(0, units))
        index = torch.int32 if labels.keys.numel() < 2 ** 31 else torch.int64
        slots = pixels.to(index)[None] + torch.arange(values.shape[0], device=pixels.device, dtype=index)[:, None] * stride
        for k in range(labels.channels):
            lab = labels.keys.index_select(0, (slots.add_(labels.plane) if k else slots).view(-1)).view_as(key)
            self._count(key.add_(lab) if k == labels.channels - 1 else key + lab, k)

    def column_bins(self, values: torch.Tensor, unit_offset: int = 0) -> torch.Tensor:
        """Bins 0..B (long) of values (M, Uc) whose column i holds values of unit ``unit_offset + i``
        (0: at or below the lowest edge).  NaN must not be passed."""
        units = torch.arange(unit_offset, unit_offset + values.shape[1], device=values.device)
        return self._bins(values, units, True).clamp_(0, self.bins).long()

    def add_bins(self, bins: torch.Tensor, seg: torch.Tensor, unit_offset: int = 0):
        """Count every pixel's bin: ``bins`` (N*H*W, Uc), pixel-major over the (N,H,W) grid of the
        deduped labels ``seg`` (N,K,H,W), column i of unit ``unit_offset + i``.  Bin 0 is not counted
        (as in ``add_columns``).  A fixed-size scatter on the device: no host synchronisation."""
        B1, C1 = self.bins + 1, self.concepts + 1
        Uc = bins.shape[1]
        rows = slice(unit_offset, unit_offset + Uc)
        cell = bins + torch.arange(Uc, device=bins.device)[None] * (C1 * B1)     # unit u, label 0, bin b
        ones = torch.ones(1, dtype=torch.long, device=bins.device).expand(cell.numel())
        hist, joint = self.hist[rows], self.joint[rows]                          # views: counted in place
        hist.view(-1).index_add_(0, (bins + torch.arange(Uc, device=bins.device)[None] * B1).view(-1), ones)
        for k in range(seg.shape[1]):
            lab = seg[:, k].reshape(-1, 1) * B1                                    # (N*H*W, 1)
            joint.view(-1).index_add_(0, (cell + lab).view(-1), ones)
        hist[:, 0] = 0
        joint[:, :, 0] = 0

    def add(self, acts: torch.Tensor, seg: torch.Tensor, unit_offset: int = 0, count_concepts: bool = True):
        """acts: (N,Uc,H,W) upsampled activations of units [unit_offset, unit_offset+Uc);
        seg: (N,K,H,W) deduped labels at the same grid.  Call once per unit chunk;
        pixels and concept counts are counted on the chunk with unit_offset == 0."""
        N, Uc, H, W = acts.shape
        if seg.shape[0] != N or seg.shape[-2:] != acts.shape[-2:]:
            raise ValueError(f"labels {tuple(seg.shape)} do not match activations {tuple(acts.shape)}")
        acts = _at_least_float32(acts)  # half values compare with float32 edges exactly once widened
        if count_concepts:
            self.count_pixels(seg)
        low = self.edges[unit_offset:unit_offset + Uc, 0].to(acts.dtype)
        flat = (acts > low.view(1, Uc, 1, 1)).view(-1).nonzero().squeeze(1)  # the tail, a few %
        HW = H * W
        n_i = flat // (Uc * HW)
        rem = flat - n_i * (Uc * HW)
        # each tail value is a column of one slot
        self.add_columns(acts.reshape(-1)[flat][None], rem // HW + unit_offset, n_i * HW + rem % HW, 0,
                         label_keys(seg, self.bins, self.concepts))

    # -- readout -------------------------------------------------------------------------------
    def counts_above(self) -> torch.Tensor:
        """(U, B) number of values strictly above each edge."""
        tail = self.hist[:, 1:].flip(1).cumsum(1).flip(1)  # tail[:, j] = sum_{b >= j+1} hist
        return tail

    def unit_pixels(self) -> torch.Tensor:
        """(U,) pixels counted per unit: all of them, less those left out (``skipped``)."""
        return self.n_pixels - self.skipped

    def unit_concept_pixels(self) -> torch.Tensor:
        """(U, C+1) concept pixels counted per unit (less those left out of its counts)."""
        return self.concept_pixels[None] - self.skipped_joint

    def fractions_above(self) -> torch.Tensor:
        """(U, B) fraction of each unit's counted pixels above each edge (NaN where it counted none)."""
        if not bool(self.skipped.any()):
            return self.counts_above().double() / max(int(self.n_pixels), 1)
        n = self.unit_pixels()
        frac = self.counts_above().double() / n.clamp(min=1).double()[:, None]
        return torch.where((n > 0)[:, None], frac, torch.full((), math.nan, dtype=frac.dtype, device=frac.device))

    def threshold_index(self, quantile: float):
        """Per unit: the edge whose fraction of values above is nearest to 1 - quantile,
        and that fraction (NaN for a unit that counted no pixel, whose edge is then the first)."""
        frac = self.fractions_above()
        err = (frac - (1 - quantile)).abs().nan_to_num(0.0)
        j = err.argmin(1)
        return j, frac.gather(1, j[:, None])[:, 0]

    def straddling_bounds(self, quantile: float, vmin: torch.Tensor, vmax: torch.Tensor):
        """Per unit, the (lo, hi] value interval holding the target rank (for refinement)."""
        frac = self.fractions_above()  # decreasing in j
        target = 1 - quantile
        # first edge with frac <= target: the target lies between edge j-1 and edge j
        below = (frac <= target)
        has = below.any(1)
        j = torch.where(has, below.float().argmax(1), torch.full_like(has, self.bins, dtype=torch.long))
        e = self.edges.double()
        lo = torch.where(j > 0, e.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], vmin.to(e))
        hi = torch.where(j < self.bins, e.gather(1, j.clamp(max=self.bins - 1)[:, None])[:, 0], vmax.to(e))
        return lo, hi

    def iou_counts(self, j: torch.Tensor):
        """For thresholds at edge ``j`` (U,): mask counts (U,), intersections (U,C+1)."""
        mask_count = self.counts_above().gather(1, j[:, None])[:, 0]
        tail = self.joint[:, :, 1:].flip(2).cumsum(2).flip(2)  # (U, C1, B)
        inter = tail.gather(2, j.view(-1, 1, 1).expand(-1, tail.shape[1], 1))[:, :, 0]
        return mask_count, inter

    def merge(self, other: "TailHistogram"):
        if other.edges.shape != self.edges.shape or not torch.equal(other.edges.to(self.edges), self.edges):
            raise ValueError("cannot merge TailHistograms with different edges")
        if other.concepts != self.concepts:
            raise ValueError(f"cannot merge histograms of {other.concepts} concepts into {self.concepts}")
        dev = self.hist.device
        self.n_pixels += other.n_pixels.to(dev)
        self.hist += other.hist.to(dev)
        self.joint += other.joint.to(dev)
        self.concept_pixels += other.concept_pixels.to(dev)
        self.skipped += other.skipped.to(dev)
        self.skipped_joint += other.skipped_joint.to(dev)
        return self

    def state_dict(self):
        return {k: _t(getattr(self, k)) for k in ("edges", "n_pixels", "hist", "joint", "concept_pixels",
                                                  "skipped", "skipped_joint")}

    @classmethod
    def from_state_dict(cls, sd, device=None):
        self = cls(sd["edges"].to(device or "cpu"), sd["joint"].shape[1] - 1)
        for k in ("n_pixels", "hist", "joint", "concept_pixels", "skipped", "skipped_joint"):
            if k in sd:
                setattr(self, k, sd[k].to(self.edges.device))
        return self
