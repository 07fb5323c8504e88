"""The dense counting backend: whole upsampled maps, compared with thresholds, counted per concept.

This is the readable definition of what a dissection counts (DESIGN §3), and the GPU path:
batched on the device, with fixed shapes and no host synchronisation.  ``engine.dissection``'s
``tail`` backend (the CPU path) counts the same statistics from the few interpolation columns
that can reach the histogram (``upsample.upsample_columns``); the two agree count for count.

- ``count_at(up, seg, thresholds, concepts)``: the definition itself, for thresholds given:
  ``|M_u & S_c|``, ``|M_u|``, ``|S_c|`` with ``M_u = up_u > t_u`` and ``S_c`` = any channel says c.
- ``dense_add(hist, r, seg, ...)``: the same for every edge of a ``stats.TailHistogram`` at once
  (a unit's edges around its quantile, or its one threshold): each pixel's bin, counted jointly
  with its labels.  Returns the maxima of the upsampled maps (for the top-k).
- ``candidate_add``: the IQR rule's candidates (``engine.thresholds``), binned on their fine grid.
"""
from __future__ import annotations

import math

import torch

from gandissect_widgets.engine.stats import TailHistogram
from gandissect_widgets.engine.upsample import upsample

__all__ = ["concept_masks", "count_at", "dense_add", "candidate_add", "unit_chunks"]


def concept_masks(seg: torch.Tensor, concepts: int) -> torch.Tensor:
    """(N,K,H,W) or (N,H,W) labels -> (N,C,H,W) bool: pixel in concept c if any channel says c
    (column 0, unlabeled, is False)."""
    if seg.dim() == 3:
        seg = seg[:, None]
    N, K, H, W = seg.shape
    masks = torch.zeros(N, concepts, H, W, dtype=torch.bool, device=seg.device)
    masks.scatter_(1, seg.long(), True)  # a label repeated in channels marks its pixel once
    masks[:, 0] = False
    return masks


def count_at(up: torch.Tensor, seg: torch.Tensor, thresholds: torch.Tensor, concepts: int) -> dict:
    """The counts of a dissection at given thresholds, by definition: ``up`` (N,U,H,W) upsampled
    maps, ``seg`` labels at the same grid, ``thresholds`` (U,).  Returns int64 tensors
    ``mask_pixels`` (U,), ``intersection`` (U,C), ``concept_pixels`` (C,), ``n_pixels`` ()."""
    N, U, H, W = up.shape
    M = (up > thresholds.to(up)[None, :, None, None]).flatten(2).transpose(0, 1).reshape(U, -1)   # (U, N*H*W)
    S = concept_masks(seg, concepts).flatten(2).transpose(0, 1).reshape(concepts, -1)            # (C, N*H*W)
    inter = (M.double() @ S.double().t()).round().long()   # exact: sums of 0/1 below 2^53
    return {"mask_pixels": M.sum(1), "intersection": inter, "concept_pixels": S.sum(1),
            "n_pixels": torch.tensor(N * H * W, dtype=torch.long)}


def unit_chunks(units: int, per_unit: int, chunk_elements: int):
    """Unit ranges [u0, u1) holding at most ``chunk_elements`` values of ``per_unit`` each (one at least)."""
    per = max(1, chunk_elements // max(1, per_unit))
    return [(u0, min(u0 + per, units)) for u0 in range(0, units, per)]


def _columns(up: torch.Tensor, drop_nonfinite: bool) -> torch.Tensor:
    """(N,Uc,H,W) -> (N*H*W, Uc) float32 or float64, pixel-major; NaN (and with ``drop_nonfinite``
    inf) to -inf: the bin that is not counted."""
    v = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])
    if v.dtype not in (torch.float32, torch.float64):
        v = v.float()
    if drop_nonfinite:
        return v.nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    return v.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def dense_add(hist: TailHistogram, r: torch.Tensor, seg: torch.Tensor, size, convention: str = "iclr",
              chunk_elements: int = 1 << 22, drop_nonfinite: bool = False) -> torch.Tensor:
    """Count every upsampled pixel of ``r`` (N,U,h,w) in ``hist`` (edges (U,B)), jointly with the
    deduped labels ``seg`` (N,K,H,W) (``stats.dedupe_channels``); pixels and concept pixels are the
    caller's (``hist.count_pixels``, once a batch).  Returns (N,U) each upsampled map's maximum."""
    N, U = r.shape[:2]
    H, W = size
    maxima = torch.empty(N, U, device=r.device)
    for u0, u1 in unit_chunks(U, N * H * W, chunk_elements):
        up = upsample(r[:, u0:u1], size, convention)                       # the whole maps
        maxima[:, u0:u1] = up.amax((2, 3))
        hist.add_bins(hist.column_bins(_columns(up, drop_nonfinite), u0), seg, u0)
    return maxima


def candidate_add(hist: TailHistogram, grid: TailHistogram, lookup: torch.Tensor, r: torch.Tensor,
                  seg: torch.Tensor, size, convention: str = "iclr", chunk_elements: int = 1 << 22):
    """Count every upsampled pixel of ``r`` in the IQR candidates' histogram ``hist`` (edges: the
    candidate levels), binned on the candidates' fine ``grid`` (a ``TailHistogram`` of the grid's
    edges, for its exact binning) and mapped to candidate bins by ``lookup`` (U, G+1)
    (``thresholds.Candidates.lookup``).  Non-finite pixels are below every candidate."""
    N, U = r.shape[:2]
    H, W = size
    for u0, u1 in unit_chunks(U, N * H * W, chunk_elements):
        up = upsample(r[:, u0:u1], size, convention)
        g = grid.column_bins(_columns(up, True), u0)                       # (N*H*W, Uc) grid bins
        bins = lookup[u0:u1].t().gather(0, g)                               # candidate bins
        hist.add_bins(bins, seg, u0)
