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

import torch

__all__ = ["RunningMoments", "RunningTopK", "TailHistogram", "pilot_edges", "dedupe_channels"]

_EVEN_SLACK = 5e-4  # how far (in bins) float32 edges may stray from even spacing and still bin by arithmetic
_NEAR_EDGE = 1e-3   # values closer than this (in bins) to an edge are binned by search
MAX_BINS = 1024     # float32 rounding of the guess stays below 2e-4 of a bin up to 1024 bins


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

    def add(self, x: torch.Tensor):
        """x: (N, U, ...) values; every entry but the unit axis (1) is one observation."""
        if x.shape[1] != self.units:
            raise ValueError(f"expected {self.units} units on axis 1, got shape {tuple(x.shape)}")
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // self.units
        if n == 0:
            return
        bmean = x.mean(dims, dtype=torch.float64) if x.dtype == torch.float64 else x.float().mean(dims)
        shape = [1] * x.dim()
        shape[1] = self.units
        bm2 = ((x - bmean.to(x.dtype).view(shape)) ** 2).sum(dims)
        self._combine(torch.tensor(float(n), dtype=torch.float64), bmean.double(), bm2.double(),
                      x.amin(dims).double(), x.amax(dims).double())

    def _combine(self, n, mean, m2, mn, mx):
        n = n.to(self.mean.device)
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
        if float(other.count) > 0:
            self._combine(other.count, other.mean, other.m2, other.min, other.max)
        return self

    @property
    def variance(self):
        return self.m2 / (self.count - 1).clamp(min=1)

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

    def add(self, values: torch.Tensor, sample_ids: torch.Tensor):
        """values: (N, U) per-sample scores; sample_ids: (N,) global sample indices."""
        v = values.detach().t().to(self.values.device, self.values.dtype if self.values.numel() else values.dtype)
        ids = sample_ids.to(self.indices.device).long()[None].expand(self.units, -1)
        self._keep(torch.cat([self.values.to(v.dtype), v], 1), torch.cat([self.indices, ids], 1))

    def _keep(self, v, ids):
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
    seg = seg.clone()
    seg[seg == 0] = void
    for k in range(1, seg.shape[1]):
        for j in range(k):
            seg[:, k][seg[:, k] == seg[:, j]] = void
    return seg


def pilot_edges(values: torch.Tensor, quantile: float, bins: int = 128,
                window=(0.005, 0.004)) -> torch.Tensor:
    """Per-unit bin edges, evenly spaced in value between the pilot's values at ranks
    ``quantile - window[0]`` and ``quantile + window[1]``.

    values: (U, M) pilot activations.  The window must hold the true quantile despite the
    pilot's error (a pilot that misses is repaired by refinement); its lower end decides how
    much of every map is binned.  On the SceneWorld GAN a pilot of 512 samples x 64 pixels
    placed the 0.99 quantile within 0.0035 of its rank over 2048 samples (128 x 256: 0.009).
    Even spacing lets ``TailHistogram`` bin by arithmetic.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    U, M = values.shape
    lo = max(0.0, quantile - window[0])
    hi = min(1.0, quantile + window[1])
    pos_lo, pos_hi = round(lo * (M - 1)), round(hi * (M - 1))
    # only the upper tail is read: select it rather than sort everything
    top = torch.topk(values.float(), M - pos_lo, dim=1, sorted=True).values.flip(1)
    vlo, vhi = top[:, 0].double(), top[:, pos_hi - pos_lo].double()
    steps = torch.linspace(0, 1, bins, dtype=torch.float64, device=top.device)
    return (vlo[:, None] + (vhi - vlo)[:, None] * steps[None]).float().contiguous()


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
        self._prepare()

    def _prepare(self):
        e = self.edges.double()
        B = self.bins
        # evenly spaced edges (a dissection's) bin by arithmetic: j = ceil((v - e0) / width);
        # a unit whose float32 edges stray from even spacing by more than _EVEN_SLACK of a bin
        # gets inv = 0, so that every one of its values is searched for
        width = (e[:, -1] - e[:, 0]) / max(B - 1, 1)
        ok = torch.isfinite(width) & (width > 0) & (B > 1)
        width = torch.where(ok, width, torch.ones_like(width))
        even = e[:, :1] + width[:, None] * torch.arange(B, dtype=torch.float64, device=e.device)[None]
        stray = ((e - even).abs().amax(1) / width).nan_to_num(math.inf)
        ok &= stray < _EVEN_SLACK
        self._e0 = self.edges[:, 0].clone()
        self._inv = torch.where(ok, 1 / width, torch.zeros_like(width)).float()

    def bin_of(self, vals: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """Bin 1..B of each value above its unit's lowest edge: j with e_{j-1} < v <= e_j
        (e_B = inf), exactly.  ``m``: value i belongs to unit ``u[m[i]]`` (values grouped, e.g.
        by interpolation tile)."""
        e0, inv = self._e0.index_select(0, u), self._inv.index_select(0, u)
        if m is not None:
            e0, inv = e0.index_select(0, m), inv.index_select(0, m)
        return self._bins(vals, e0, inv, u if m is None else u.index_select(0, m))

    def _bins(self, vals, e0, inv, units):
        """Bins of values with their units' lowest edges and inverse bin widths (see bin_of).

        The guess ceil((v - e0) * inv) is off by float32 rounding (about 2e-7 t bins at position
        t: < 2e-4 of a bin up to 1024 bins, and positions beyond B are clamped to B anyway) plus
        the edges' stray from even spacing (< _EVEN_SLACK): a guess whose position lies farther
        than _NEAR_EDGE from every edge is right; the others (and units with inv = 0, and NaN
        positions from infinite values) are searched exactly."""
        vals = _at_least_float32(vals)
        t = (vals.float() - e0).mul_(inv)
        guess = t.ceil()
        near = ~((guess - t).sub_(0.5).abs_() <= 0.5 - _NEAR_EDGE)  # NaN (inf values): searched
        guess = guess.clamp_(1, self.bins).long()
        near = torch.nonzero(near).squeeze(1)
        step = 1 << 14
        for i in range(0, near.numel(), step):  # each against its own unit's edges
            at = near[i:i + step]
            v = vals.index_select(0, at)
            rows = self.edges.index_select(0, units.index_select(0, at)).to(v.dtype)
            guess[at] = torch.searchsorted(rows, v[:, None])[:, 0]
        return guess

    def count_pixels(self, seg: torch.Tensor):
        """Count the pixels and concept pixels of a batch of deduped labels (N,K,H,W), once a batch."""
        C1 = self.concepts + 1
        self.n_pixels += seg.shape[0] * seg.shape[-2] * seg.shape[-1]
        self.concept_pixels += torch.bincount(seg.reshape(-1), minlength=C1)[:C1]

    def add_tail(self, n_i, u, pix, vals, seg: torch.Tensor, m: torch.Tensor | None = None):
        """Add the tail values ``vals`` (each above its unit's lowest edge) of units ``u`` at
        sample ``n_i`` (index into ``seg``) and flat pixel ``pix`` of the (H,W) grid of ``seg``
        (N,K,H,W, deduped).  Values at or below the lowest edge must not be passed.
        ``m``: values are grouped: value i is of sample ``n_i[m[i]]`` and unit ``u[m[i]]``."""
        if vals.numel() == 0:
            return
        B, C1 = self.bins, self.concepts + 1
        K = seg.shape[1]
        HW = seg.shape[-2] * seg.shape[-1]
        # per group: where its labels start, its unit's first joint cell, its unit's binning
        ints = torch.stack([n_i * (K * HW), u * (C1 * (B + 1)), u], 1)
        floats = torch.stack([self._e0.index_select(0, u), self._inv.index_select(0, u)], 1)
        if m is not None:  # one gather of rows per kind, for all values
            ints, floats = ints.index_select(0, m), floats.index_select(0, m)
        key = self._bins(vals, floats[:, 0], floats[:, 1], ints[:, 2]).add_(ints[:, 1])
        where = ints[:, 0] + pix
        seg_flat = seg.reshape(-1)
        size = self.units * C1 * (B + 1)
        for k in range(K):
            lab = seg_flat.index_select(0, where + k * HW if k else where)
            counts = torch.bincount(lab.mul_(B + 1).add_(key), minlength=size).view(self.units, C1, B + 1)
            self.joint += counts
            if k == 0:  # channel 0 labels every pixel (0 -> void): its counts summed over labels are the histogram
                self.hist += counts.sum(1)

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
        self.add_tail(n_i, rem // HW + unit_offset, rem % HW, acts.reshape(-1)[flat], seg)

    # -- readout -------------------------------------------------------------------------------
    def counts_above(self) -> torch.Tensor:
        """(U, B) number of values strictly above each edge."""
        tail = self.hist[:, 1:].flip(1).cumsum(1).flip(1)  # tail[:, j] = sum_{b >= j+1} hist
        return tail

    def threshold_index(self, quantile: float):
        """Per unit: the edge whose fraction of values above is nearest to 1 - quantile,
        and that fraction."""
        n = max(int(self.n_pixels), 1)
        frac = self.counts_above().double() / n
        err = (frac - (1 - quantile)).abs()
        j = err.argmin(1)
        return j, frac.gather(1, j[:, None])[:, 0]

    def straddling_bounds(self, quantile: float, vmin: torch.Tensor, vmax: torch.Tensor):
        """Per unit, the (lo, hi] value interval holding the target rank (for refinement)."""
        n = max(int(self.n_pixels), 1)
        frac = self.counts_above().double() / n  # decreasing in j
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
        return self

    def state_dict(self):
        return {k: _t(getattr(self, k)) for k in ("edges", "n_pixels", "hist", "joint", "concept_pixels")}

    @classmethod
    def from_state_dict(cls, sd, device=None):
        self = cls(sd["edges"].to(device or "cpu"), sd["joint"].shape[1] - 1)
        for k in ("n_pixels", "hist", "joint", "concept_pixels"):
            setattr(self, k, sd[k].to(self.edges.device))
        return self
