"""The one upsampling of activation maps to the segmentation grid (DESIGN §3).

Thresholds, IoU, top-k and every visualisation go through ``upsample`` so that a mask drawn on
an image is exactly the mask that was counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample", "pool_mask"]


def upsample(r: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, ``align_corners=False`` (half-pixel centres, edges clamped); (N,C,h,w) -> (N,C,H,W)."""
    size = tuple(int(s) for s in size)
    if r.dim() == 3:
        return upsample(r[None], size)[0]
    if tuple(r.shape[-2:]) == size:
        return r
    return F.interpolate(r, size=size, mode="bilinear", align_corners=False)


def pool_mask(mask: torch.Tensor, size, mode: str = "max") -> torch.Tensor:
    """An image-resolution region (H,W) or (N,1,H,W) in [0,1] pooled to a layer grid (h,w).

    ``max`` marks every layer cell the region touches (GANPaint's default); ``mean`` gives the
    fraction of the cell covered.
    """
    m = torch.as_tensor(mask)
    squeeze = m.dim() == 2
    if squeeze:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    m = m.float()
    if mode == "max":
        out = F.adaptive_max_pool2d(m, tuple(size))
    elif mode == "mean":
        out = F.adaptive_avg_pool2d(m, tuple(size))
    else:
        raise ValueError(f"mask pooling must be 'max' or 'mean', got {mode!r}")
    return out[0, 0] if squeeze else out
