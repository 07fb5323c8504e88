"""What a unit's IoU should be compared with: the highest IoU its threshold allows, and what a
fixed mask scores.

Both follow from the dataset-level IoU of DESIGN.md section 3, ``I / (m + A - I)`` for a mask of
``m`` pixels (summed over the samples) against a concept of area ``A`` (its ``concept_pixels``)
with ``I`` pixels in common:

- **IoU ceiling** ``min(m, A) / max(m, A)``: the IoU is increasing in I and I <= min(m, A), so no
  mask of m pixels does better, and a mask lying inside the concept (m <= A) or covering it
  (m >= A) reaches it.  At the top-1% threshold a concept covering a third of every image has
  ceiling 0.01 / 0.33 = 0.03: below the 0.04 cut-off, none of its units can be interpretable.
- **Position-only baseline**: the best IoU of a *fixed* mask F of k pixels, the same pixels in
  every one of the N samples, chosen from the data.  Its IoU is ``I_F / (N k + A - I_F)`` with
  ``I_F = sum_{p in F} count_c(p)`` (``concept_stats.ConceptPixelCounts``); for a given k the k
  pixels where c is most often maximise I_F and so the IoU.  A unit whose IoU is below its label's
  baseline knows no more than where that concept usually is.  k is the unit's mask size per
  sample, rounded down: ``floor(m / N)`` (40 pixels for the top 1% of a 64x64 grid).

Shapes: U units, C = len(labels) concepts (column 0, unlabeled, is 0), H x W segmentation grid.
Everything here is numpy, float64, exact on the integer counts.
"""
from __future__ import annotations

import numpy as np

__all__ = ["iou_ceiling", "position_iou_table", "position_baseline", "position_mask", "mask_size_per_sample",
           "low_ceiling_concepts", "ceiling_warning_text", "describe_comparison", "describe_unit_iou"]


def _ratio(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def iou_ceiling(mask_pixels, concept_pixels) -> np.ndarray:
    """The highest dataset-level IoU a mask of ``mask_pixels`` (U,) or () pixels can reach with
    concepts of ``concept_pixels`` (C,) pixels: (U, C) (or (C,)), ``min(m, A) / max(m, A)``."""
    m = np.asarray(mask_pixels, dtype=np.float64)[..., None]
    a = np.asarray(concept_pixels, dtype=np.float64)
    if (m < 0).any() or (a < 0).any():
        raise ValueError("pixel counts must be >= 0")
    out = _ratio(np.minimum(m, a), np.maximum(m, a))
    out[..., 0] = 0.0  # unlabeled is no concept
    return out


def _check_counts(counts, samples):
    counts = np.asarray(counts)
    if counts.ndim != 3 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must be integer (C, H, W), got {counts.dtype} of shape {counts.shape}")
    samples = int(samples)
    if samples < 0 or (counts.size and (counts.min() < 0 or counts.max() > samples)):
        raise ValueError(f"counts must lie in 0..samples ({samples}); got {counts.min()}..{counts.max()}")
    return counts.reshape(counts.shape[0], -1).astype(np.int64), samples


def position_iou_table(counts, samples) -> np.ndarray:
    """(C, P + 1) float64: the position-only baseline of every concept for every mask size
    k = 0..P (P = H*W pixels per sample), from ``counts`` (C, H, W) over ``samples`` samples."""
    flat, n = _check_counts(counts, samples)
    P = flat.shape[1]
    best = -np.sort(-flat, axis=1)  # per concept, pixels from the most often covered down
    inter = np.concatenate([np.zeros((flat.shape[0], 1), np.int64), best.cumsum(1)], axis=1)  # (C, P+1)
    area = flat.sum(1)[:, None]
    k = np.arange(P + 1)[None]
    out = _ratio(inter, n * k + area - inter)
    out[0] = 0.0
    return out


def mask_size_per_sample(mask_pixels, samples, pixels_per_sample) -> np.ndarray:
    """The fixed mask's size k for units whose masks hold ``mask_pixels`` over ``samples`` samples:
    ``floor(m / N)``, never more pixels than the unit's own mask (a larger fixed mask would have an
    unfair start on large concepts; so, for a concept larger than the mask, the baseline stays at
    or below the unit's ceiling), within 0..pixels_per_sample."""
    m = np.asarray(mask_pixels, dtype=np.float64)
    if samples <= 0:
        return np.zeros(m.shape, dtype=np.int64)
    return np.clip(np.floor(m / samples + 1e-9), 0, pixels_per_sample).astype(np.int64)  # (1e-9: float noise)


def position_baseline(counts, samples, mask_pixels) -> np.ndarray:
    """(U, C) (or (C,) for a scalar ``mask_pixels``): the IoU of the best fixed mask of each unit's
    size (``mask_size_per_sample``) with every concept."""
    counts = np.asarray(counts)
    table = position_iou_table(counts, samples)
    k = mask_size_per_sample(mask_pixels, samples, counts.shape[1] * counts.shape[2])
    return table[:, k].T if k.ndim else table[:, int(k)]


def position_mask(counts, concept: int, k: int) -> np.ndarray:
    """(H, W) bool: the best fixed mask of ``k`` pixels for ``concept`` (the k pixels where it is
    most often; ties to the first in row-major order)."""
    counts = np.asarray(counts)
    _, H, W = counts.shape
    if not 0 <= int(k) <= H * W:
        raise ValueError(f"mask size k={k} out of range 0..{H * W}")
    order = np.argsort(-counts[int(concept)].reshape(-1), kind="stable")[:int(k)]
    mask = np.zeros(H * W, dtype=bool)
    mask[order] = True
    return mask.reshape(H, W)


def low_ceiling_concepts(labels, ceiling, min_iou) -> list[tuple[str, float]]:
    """[(label, ceiling)] of concepts whose ceiling (C,) is below ``min_iou`` but above 0 (a concept
    never segmented has ceiling 0 for want of pixels, not because of the threshold), lowest first."""
    ceiling = np.asarray(ceiling, dtype=np.float64)
    low = [c for c in range(1, len(labels)) if 0 < ceiling[c] < min_iou]
    return sorted(((labels[c], float(ceiling[c])) for c in low), key=lambda t: (t[1], t[0]))


def ceiling_warning_text(labels, ceiling, min_iou, quantile) -> str | None:
    """One line naming the concepts that cannot reach ``min_iou`` at the threshold, or None."""
    low = low_ceiling_concepts(labels, ceiling, min_iou)
    if not low:
        return None
    top = f"{100 * (1 - quantile):.3g}%"
    names = ", ".join(f"{name} {value:.3f}" for name, value in low)
    return (f"at the top-{top} threshold these concepts cannot reach the interpretability cut-off IoU {min_iou:g} "
            f"(their IoU ceiling, min(mask, area) / max(mask, area)): {names}; no unit can be interpretable for them")


def describe_comparison(baseline: float | None, ceiling: float) -> str:
    """'position-only baseline 0.400, ceiling 0.030' (baseline None: a result without position counts)."""
    base = f"position-only baseline {baseline:.3f}" if baseline is not None else "no position-only baseline"
    return f"{base}, ceiling {ceiling:.3f}"


def describe_unit_iou(iou: float, baseline: float | None, ceiling: float) -> str:
    """'IoU 0.180 (position-only baseline 0.400, ceiling 0.030)': a unit's IoU with what it is compared with."""
    return f"IoU {iou:.3f} ({describe_comparison(baseline, ceiling)})"
