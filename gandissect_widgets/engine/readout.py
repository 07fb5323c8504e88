"""The readout of a dissection's counts: thresholds, IoU, moments and top-k as a result's arrays.

One function, ``read_layer``, for either counting backend and either threshold rule: the counts
are a ``stats.TailHistogram`` (pixels above each edge, jointly with the concepts), and the
threshold is the edge whose fraction of pixels above is nearest to ``1 - quantile`` (the IQR
rule's histogram has one edge, its level).  Labels, rankings and interpretability are derived from
these arrays by ``engine.results.Dissection``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from gandissect_widgets.engine.stats import RunningMoments, RunningTopK, TailHistogram

__all__ = ["read_layer", "DEFAULT_MIN_IOU", "concept_index", "descending", "descending_within"]

DEFAULT_MIN_IOU = 0.04  # the papers' interpretability cut-off: a unit whose best IoU exceeds it is interpretable


def concept_index(labels, concept) -> int:
    """The label index of ``concept`` (a name or an index; never 0, unlabeled), with an error listing the concepts."""
    labels = list(labels)
    if isinstance(concept, (int, np.integer)) and not isinstance(concept, bool):
        if 0 < int(concept) < len(labels):
            return int(concept)
        raise ValueError(f"concept index {concept} out of range 1..{len(labels) - 1}")
    if isinstance(concept, str) and concept in labels[1:]:
        return labels.index(concept)
    raise KeyError(f"unknown concept {concept!r}; concepts: {', '.join(map(str, labels[1:]))}")


def descending(values) -> np.ndarray:
    """Indices by descending value, ties by index, NaN last: every ranking of units (by IoU, ACE,
    artifact score, alpha) orders this way, so two views of one ranking never disagree."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.lexsort((np.arange(v.shape[0]), -np.nan_to_num(v, nan=-np.inf)))


def descending_within(groups, values) -> np.ndarray:
    """Indices by ``groups`` (ascending: concept names sort alphabetically), within a group as
    ``descending`` orders them (by descending value, ties by index, NaN last): units by concept."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if g.shape != v.shape:
        raise ValueError(f"{g.shape[0]} groups for {v.shape[0]} values")
    return np.lexsort((np.arange(v.shape[0]), -np.nan_to_num(v, nan=-np.inf), g))


def read_layer(h: TailHistogram, moments: RunningMoments, topk: RunningTopK, quantile: float, shape, concepts: int,
               nonfinite_pixels: bool = False) -> dict:
    """The arrays of one layer (``engine.results``' list): IoU exact at each unit's threshold edge,
    ``IoU = |M & S| / (|M| + |S| - |M & S|)`` over all samples; units with pixels left out
    (nonfinite="skip") count their concept pixels where their values were finite."""
    C = concepts
    j, frac = h.threshold_index(quantile)
    mask, inter = h.iou_counts(j)
    inter = inter[:, :C].clone()
    inter[:, 0] = 0
    concept = h.concept_pixels[:C].clone()
    concept[0] = 0
    skipped = bool(h.skipped.any())
    if skipped:  # each unit's concept pixels: those where its values were finite
        concept_u = h.unit_concept_pixels()[:, :C].clone()
        concept_u[:, 0] = 0
        union = mask[:, None] + concept_u - inter
    else:
        union = mask[:, None] + concept[None, :] - inter
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(),
                      torch.zeros((), dtype=torch.float64, device=union.device))
    thr = h.edges.gather(1, j[:, None])[:, 0]
    mean, std = moments.mean, moments.variance.sqrt()
    vmin, vmax = moments.min, moments.max
    if skipped or moments.count.dim():
        empty = h.unit_pixels() == 0
        thr = torch.where(empty, torch.full((), math.nan, device=thr.device), thr)
        none = moments.counts == 0
        nan = torch.full((), math.nan, dtype=torch.float64, device=mean.device)
        mean, std, vmin, vmax = (torch.where(none, nan, v) for v in (mean, std, vmin, vmax))
    out = {
        "iou": iou.cpu().numpy(), "intersection": inter.cpu().numpy(), "mask_pixels": mask.cpu().numpy(),
        "concept_pixels": concept.cpu().numpy(), "n_pixels": np.asarray(int(h.n_pixels)),
        "thresholds": thr.cpu().numpy().astype(np.float32), "fraction_above": frac.cpu().numpy(),
        "topk_indices": topk.indices.cpu().numpy(), "topk_values": topk.values.float().cpu().numpy(),
        "mean": mean.cpu().numpy(), "std": std.cpu().numpy(),
        "min": vmin.cpu().numpy(), "max": vmax.cpu().numpy(),
        "shape": np.asarray(shape, dtype=np.int64)}
    if nonfinite_pixels:
        out["nonfinite_pixels"] = h.skipped.cpu().numpy()
    return out
