"""Pictures as arrays: generator output to uint8, unit masks drawn over images, strips and grids.

Numpy and torch only; widgets and reports encode these arrays (PNG/JPEG) elsewhere.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "overlay_mask", "mask_outline", "heatmap", "strip", "grid", "difference", "HEATMAP_STOPS"]

# heatmap's colour ramp (plasma-like), evenly spaced from low to high; figures draw its colour bar from it
HEATMAP_STOPS = ((13, 8, 135), (126, 3, 168), (204, 71, 120), (248, 149, 64), (240, 249, 33))


def to_uint8(images) -> np.ndarray:
    """(N,3,H,W) in [-1,1] -> (N,H,W,3) uint8 (values outside [-1,1] are clamped)."""
    x = images.detach() if torch.is_tensor(images) else torch.as_tensor(images)
    if x.dim() == 3:
        x = x[None]
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _resize_nearest(mask: np.ndarray, size) -> np.ndarray:
    H, W = size
    h, w = mask.shape[-2:]
    if (h, w) == (H, W):
        return mask
    ys = (np.arange(H) * h // H)
    xs = (np.arange(W) * w // W)
    return mask[..., ys[:, None], xs[None, :]]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (inside pixels with an outside 4-neighbour)."""
    m = mask.astype(bool)
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], constant_values=False)
    inner = pad[..., 1:-1, 1:-1] & pad[..., :-2, 1:-1] & pad[..., 2:, 1:-1] & pad[..., 1:-1, :-2] & pad[..., 1:-1, 2:]
    return m & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray, dim: float = 0.5, color=(255, 220, 0)) -> np.ndarray:
    """The image darkened outside ``mask`` with the mask's edge outlined (as the original reports).

    image (H,W,3) or (N,H,W,3) uint8; mask (h,w) / (N,h,w) bool at any grid (resized nearest)."""
    img = image.astype(np.float32)
    m = _resize_nearest(np.asarray(mask, dtype=bool), img.shape[-3:-1])
    out = np.where(m[..., None], img, img * dim)
    edge = mask_outline(m)
    out[edge] = color
    return out.round().astype(np.uint8)


def heatmap(values: np.ndarray, vmin=None, vmax=None) -> np.ndarray:
    """(H,W) floats -> (H,W,3) uint8 with a perceptual colour ramp (dark blue -> yellow)."""
    v = np.asarray(values, dtype=np.float32)
    lo = float(np.min(v)) if vmin is None else vmin
    hi = float(np.max(v)) if vmax is None else vmax
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    stops = np.array(HEATMAP_STOPS, np.float32)
    pos = t * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).round().astype(np.uint8)


def difference(a: np.ndarray, b: np.ndarray, gain: float = 2.0) -> np.ndarray:
    """|a - b| summed over colour, amplified, as a grey image (N,H,W,3) uint8."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16)).sum(-1).astype(np.float32) / 3 * gain
    d = np.clip(d, 0, 255).astype(np.uint8)
    return np.repeat(d[..., None], 3, -1)


def strip(images: np.ndarray, gap: int = 2, fill=255) -> np.ndarray:
    """(N,H,W,C) -> one row (H, N*W + gaps, C); ``fill`` as in ``grid``."""
    return grid(images, cols=len(images), gap=gap, fill=fill)


def grid(images: np.ndarray, cols: int, gap: int = 2, fill=255) -> np.ndarray:
    """(N,H,W,C) -> rows of ``cols`` pictures, ``gap`` pixels apart, filled with ``fill`` (a
    value, or one per channel).  ``fill=None``: the gaps are transparent, the result RGBA (alpha
    255 on the pictures, 0 in the gaps, whose colour is white where alpha is dropped): for pictures
    shown on a background of any colour, such as a dark theme's."""
    images = np.asarray(images)
    if fill is None:
        alpha = np.full(images.shape[:3] + (1,), 255, dtype=images.dtype)
        images = images if images.shape[-1] == 4 else np.concatenate([images, alpha], axis=-1)
        fill = (255,) * (images.shape[-1] - 1) + (0,)
    n, H, W, C = images.shape
    rows = max(1, -(-n // cols))
    out = np.empty((rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, C), dtype=images.dtype)
    out[...] = np.asarray(fill, dtype=images.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = images[i]
    return out
