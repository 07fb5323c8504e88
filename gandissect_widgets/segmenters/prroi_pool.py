"""Precise RoI pooling over the whole feature map, in plain torch (a CPU/GPU stand-in for the CUDA op).

PrRoIPool (Jiang et al., ECCV 2018) averages the feature map's bilinear interpolation over each
bin: the map is a continuous field f(x, y) = sum_ij F[i, j] hat(x - j) hat(y - i), with
hat(t) = max(0, 1 - |t|) (pixel (i, j) sits at x = j, y = i, and the field is 0 beyond the grid),
and bin (a, b) of an n x n grid over the RoI [x0, x1] x [y0, y1] gets
(1 / area) * integral of f over the bin.  The field is separable, so the integral is exact as
Ay @ F @ Ax^T with Ax[b, j] = integral of hat(x - j) over the bin's x-range.
The UPerNet of the papers pools the RoI [0, W] x [0, H] of each map (spatial scale 1).
"""
from __future__ import annotations

import torch

__all__ = ["prroi_pool_full", "hat_integral_weights"]


def _hat_cdf(t):
    """Integral of hat from -inf to t."""
    t = t.clamp(-1, 1)
    return torch.where(t < 0, (t + 1) ** 2 / 2, 1 - (1 - t) ** 2 / 2)


def hat_integral_weights(n_bins: int, size: int, start: float, stop: float, dtype=torch.float64, device=None):
    """(n_bins, size): integral of hat(x - j) over bin b of [start, stop], divided by the bin width."""
    edges = torch.linspace(start, stop, n_bins + 1, dtype=torch.float64, device=device)
    j = torch.arange(size, dtype=torch.float64, device=device)
    lo, hi = edges[:-1, None] - j[None], edges[1:, None] - j[None]
    width = (edges[1:] - edges[:-1])[:, None]
    w = (_hat_cdf(hi) - _hat_cdf(lo)) / torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, w, torch.zeros_like(w)).to(dtype)


def prroi_pool_full(x: torch.Tensor, bins: int, roi=None) -> torch.Tensor:
    """(N,C,bins,bins): PrRoIPool of each map of ``x`` (N,C,H,W) over ``roi`` = (x0, y0, x1, y1).

    Default roi (0, 0, W, H): what UPerNet's PPM uses.
    """
    N, C, H, W = x.shape
    x0, y0, x1, y1 = roi if roi is not None else (0.0, 0.0, float(W), float(H))
    ay = hat_integral_weights(bins, H, y0, y1, dtype=x.dtype, device=x.device)
    ax = hat_integral_weights(bins, W, x0, x1, dtype=x.dtype, device=x.device)
    return torch.einsum("ah,nchw,bw->ncab", ay, x, ax)
