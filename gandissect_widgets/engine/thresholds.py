"""Threshold rules: how a dissection picks each unit's threshold t_u (DESIGN §3).

- ``QuantileRule`` (``"quantile"``, the default): t_u is the ``quantile`` of u's upsampled
  activations over all pixels of the dissection's own samples (0.99: the top 1%), read within a
  rank tolerance.  The counting pass finds it itself: a pilot places per-unit bin edges around the
  quantile, the pass counts the pixels above each edge jointly with the concepts, and the readout
  takes the edge nearest the target rank (``engine.dissection``).
- ``IqrRule`` (``"iqr"``, the ICLR paper's default for GANs; reference 1.5): per unit, among
  candidate levels at the top 0.1% ... 100% of its activations (fractions ``logspace(-3, 0, 100)``),
  the level that maximises, for the unit's best concept, the mutual information of (unit mask,
  concept mask) over their joint entropy (``IQR = MI / JE``), chosen on a separate threshold set of
  samples (seed 2).  The dissection then counts at that one level.

The IQR tables are exact: each candidate's 2x2 table of (mask, concept) counts is counted over
every pixel of the threshold set (the original mixed a category-conditioned ``pred`` with a global
``truth``, reference 7.1; here both are fractions of all pixels).  The candidates themselves are
quantiles of a sample of pixels (the pilot's sampler: one random pixel in each block of a grid,
every pixel when ``pilot_pixels`` covers the grid), each moved to the nearest edge of a fine
per-unit grid (``MAX_BINS`` edges over the sample's range, ``stats.grid_edges``), on which a
value's bin is exact arithmetic.  The original's conditional quantile sketch had 2048 bins.
The reference's other rules are kept: MI is 0 at the last level (100%) and for concepts covering
less than 1e-3 of the pixels, and IQR is 0 where the mask and the concept agree on at most 80% of
the pixels or where the level is <= 0.

Each rule has a ``name`` and ``settings()``, which go into the cache key and the result's settings.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from gandissect_widgets.engine.stats import MAX_BINS, TailHistogram, grid_edges

__all__ = ["THRESHOLDS", "QuantileRule", "IqrRule", "threshold_rule", "iqr_fractions", "Candidates",
           "candidate_levels", "mutual_information", "iqr_scores", "IqrChoice", "choose_levels"]

THRESHOLDS = ("quantile", "iqr")
_MIN_TRUTH = 1e-3   # concepts covering less of the pixels get MI 0 (reference 1.5: 1e-4 skipped, 1e-3 zeroed)
_AGREEMENT = 0.8    # IQR is 0 where mask and concept agree on at most this fraction of the pixels


class QuantileRule:
    """t_u = the ``quantile`` of u's upsampled activations (the top 1% at 0.99)."""
    name = "quantile"

    def __init__(self, quantile: float = 0.99):
        self.quantile = float(quantile)

    def settings(self) -> dict:
        return {"threshold": self.name, "quantile": self.quantile}


class IqrRule:
    """The ICLR paper's per-unit IQR threshold, chosen on a threshold set (see the module docstring)."""
    name = "iqr"

    def __init__(self, samples: int, seed: int = 2, candidates: int = 100, pilot_pixels: int = 64):
        self.samples, self.seed, self.candidates, self.pilot_pixels = int(samples), int(seed), int(candidates), int(pilot_pixels)

    @property
    def fractions(self) -> torch.Tensor:
        return iqr_fractions(self.candidates)

    def settings(self) -> dict:
        return {"threshold": self.name, "threshold_samples": self.samples, "threshold_seed": self.seed,
                "iqr_candidates": self.candidates, "iqr_pilot_pixels": self.pilot_pixels}


def threshold_rule(name: str, quantile: float = 0.99, samples: int = 1000, seed: int = 2, candidates: int = 100,
                   pilot_pixels: int = 64):
    """The rule called ``name`` ("quantile" or "iqr")."""
    if name == "quantile":
        return QuantileRule(quantile)
    if name == "iqr":
        return IqrRule(samples, seed, candidates, pilot_pixels)
    raise ValueError(f"threshold must be one of {', '.join(map(repr, THRESHOLDS))}, got {name!r} "
                     f"('quantile': the top 1% of each unit; 'iqr': the ICLR paper's per-unit IQR rule)")


def iqr_fractions(n: int = 100) -> torch.Tensor:
    """(n,) float64 candidate top fractions, log-spaced from 1e-3 to 1 (the reference's grid)."""
    return torch.logspace(-3, 0, n, dtype=torch.float64)


class Candidates(NamedTuple):
    """Per unit, J candidate levels (in the order of the fractions: the highest first), each an
    edge of the unit's fine grid: ``levels[u, j] = grid[u, index[u, j]]``."""
    grid: torch.Tensor    # (U, G) float32, ascending, on a power-of-two grid (exact binning)
    index: torch.Tensor   # (U, J) long
    levels: torch.Tensor  # (U, J) float32

    def edges(self) -> torch.Tensor:
        """(U, J) the levels ascending: the edges of the candidates' joint histogram."""
        return self.levels.flip(1).contiguous()

    def lookup(self) -> torch.Tensor:
        """(U, G+1) long: for a value in grid bin g (grid[g-1] < v <= grid[g]), how many candidate
        levels lie below it, i.e. its bin in the candidates' histogram (exact: levels are grid edges)."""
        G = self.grid.shape[1]
        k = self.index.sort(1).values                                                   # (U, J)
        g = torch.arange(G + 1, device=k.device).expand(k.shape[0], -1) - 1
        return torch.searchsorted(k, g.contiguous(), right=True)


def candidate_levels(values: torch.Tensor, fractions: torch.Tensor, grid_bins: int = MAX_BINS) -> Candidates:
    """Candidates from a sample of each unit's upsampled values (U, M): for fraction f, the value
    with floor(f * M) sample values above it (the (floor(f M) + 1)-th largest; the minimum at
    f = 1), moved to the nearest edge of a ``grid_bins``-edge grid over the sample's range.
    Non-finite values are left out (they count as the unit's finite minimum)."""
    U, M = values.shape
    v = values.float()
    finite = torch.isfinite(v)
    low = torch.where(finite, v, torch.full((), float("inf"), device=v.device)).amin(1)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))
    v = torch.where(finite, v, low[:, None])
    top = v.sort(1, descending=True).values
    m = (fractions.to(torch.float64) * M).floor().long().clamp(max=M - 1).to(v.device)     # (J,)
    raw = top[:, m]                                                                       # (U, J)
    grid = grid_edges(top[:, -1], top[:, 0], grid_bins)                                  # (U, G)
    w = (grid[:, 1] - grid[:, 0]).double()
    index = ((raw.double() - grid[:, :1].double()) / w[:, None]).round().long().clamp(0, grid_bins - 1)
    return Candidates(grid, index, grid.gather(1, index))


def mutual_information(isect: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor):
    """(MI, JE, agreement) of the 2x2 table of (unit mask, concept mask) given as fractions of
    the pixels: ``isect`` both, ``pred`` the mask, ``truth`` the concept (broadcast together).
    Cells are clamped to [0, 1]; 0 log 0 = 0.  The one formula of the IQR rule and the readout."""
    a11 = isect
    a10 = pred - isect
    a01 = truth - isect
    a00 = 1 - (truth + pred - isect)
    cells = [x.clamp(0, 1) for x in (a11, a10, a01, a00)]
    rows = (pred, pred, 1 - pred, 1 - pred)          # P(mask) of each cell: 11, 10, 01, 00
    cols = (truth, 1 - truth, truth, 1 - truth)      # P(concept) of each cell

    def xlogy(x, y):
        return torch.where(x > 0, x * torch.log(torch.where(x > 0, y, torch.ones_like(y))), torch.zeros_like(x))

    mi = sum(xlogy(a, a / (r * c)) for a, r, c in zip(cells, rows, cols))
    je = -sum(xlogy(a, a) for a in cells)
    return mi, je, cells[0] + cells[3]


def iqr_scores(hist: TailHistogram, levels: torch.Tensor) -> torch.Tensor:
    """(U, C, J) float64 IQR = MI / JE of (unit mask at candidate j, concept c), from the exact
    counts of ``hist``, the candidates' joint histogram (edges ``Candidates.edges()``, ascending),
    with the reference's rules (module docstring); ``levels`` (U, J) in the order of the fractions.
    Column 0 (unlabeled) is 0."""
    C = hist.concepts
    P = hist.n_pixels.double().clamp(min=1)
    mask = hist.counts_above().double()                                                 # (U, J), ascending
    tail = hist.joint[:, :C, 1:].flip(2).cumsum(2).flip(2).double()                     # (U, C, J)
    pred = (mask / P).flip(1)[:, None, :]                                                # in fraction order
    isect = (tail / P).flip(2)
    truth = (hist.concept_pixels[:C].double() / P)[None, :, None]
    mi, je, agreement = mutual_information(isect, pred, truth)
    mi[:, :, -1] = 0                                                   # the last level (100%) says nothing
    mi = torch.where(truth < _MIN_TRUTH, torch.zeros_like(mi), mi)     # rare concepts
    iqr = (mi / je).nan_to_num(0.0, 0.0, 0.0)
    iqr = torch.where((agreement <= _AGREEMENT) | (levels.double()[:, None, :] <= 0), torch.zeros_like(iqr), iqr)
    iqr[:, 0] = 0
    return iqr


class IqrChoice(NamedTuple):
    """Per unit: the chosen level, its concept (argmax over concepts of the best IQR), that IQR
    and the candidate's top fraction."""
    levels: torch.Tensor    # (U,) float32
    concept: torch.Tensor   # (U,) long
    score: torch.Tensor     # (U,) float64
    fraction: torch.Tensor  # (U,) float64


def choose_levels(iqr: torch.Tensor, candidates: Candidates, fractions: torch.Tensor) -> IqrChoice:
    """Each unit's level: ``max_iqr[c, u] = max_j iqr``, ``c* = argmax_c max_iqr``, the level of
    the best j for c* (ties: the first, i.e. the smaller concept index and the higher level)."""
    best, at = iqr.max(2)                        # (U, C): over candidates
    score, concept = best.max(1)                 # (U,): over concepts
    j = at.gather(1, concept[:, None])[:, 0]
    return IqrChoice(candidates.levels.gather(1, j[:, None])[:, 0], concept, score,
                     fractions.to(j.device)[j])
