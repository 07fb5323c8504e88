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
from gandissect_widgets.engine.thresholds import mutual_information

__all__ = ["read_layer", "DEFAULT_MIN_IOU", "DEFAULT_MIN_IQR", "concept_index", "descending", "descending_within",
           "iqr_at_threshold", "interpretable"]

DEFAULT_MIN_IOU = 0.04  # the papers' interpretability cut-off: a unit whose best IoU exceeds it is interpretable
# the ICLR code's second condition under its IQR rule (``iqr_threshold``, reference 1.7): the unit's
# IQR with its label at its threshold, over the dissection samples, must exceed it too (that code's
# IoU cut-off was 0.05; the PNAS code's, and ours, 0.04)
DEFAULT_MIN_IQR = 0.01


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


def iqr_at_threshold(intersection, mask_pixels, concept_pixels, n_pixels) -> np.ndarray:
    """(U, C) float64 IQR = MI / JE of (unit mask at its threshold, concept) over the dissection's
    samples, from a result's counts (``read_layer``'s arrays of those names): the ICLR code's
    ``iou_iqr`` (its bincount pass), with its rules there: MI and JE at least 0, 0/0 = 0, and none of
    the threshold choice's (agreement, rare concepts).  Both margins are fractions of all pixels, as
    in ``thresholds.iqr_scores`` (the original divided by the pixels of images holding the concept's
    category).  Column 0 (unlabeled) is 0.  Under nonfinite="skip" the totals are the layer's."""
    inter = torch.as_tensor(np.asarray(intersection), dtype=torch.float64)
    P = max(float(np.asarray(n_pixels)), 1.0)
    pred = torch.as_tensor(np.asarray(mask_pixels), dtype=torch.float64)[:, None] / P
    truth = torch.as_tensor(np.asarray(concept_pixels), dtype=torch.float64)[None, :] / P
    if inter.shape != (pred.shape[0], truth.shape[1]):
        raise ValueError(f"intersection has shape {tuple(inter.shape)}, but there are {pred.shape[0]} units and "
                         f"{truth.shape[1]} concepts")
    mi, je, _ = mutual_information(inter / P, pred, truth)
    iqr = (mi.clamp(min=0) / je.clamp(min=0)).nan_to_num(0.0, 0.0, 0.0)
    iqr[:, 0] = 0
    return iqr.numpy()


def interpretable(unit_ious, min_iou: float = DEFAULT_MIN_IOU, unit_iqrs=None,
                  min_iqr: float = DEFAULT_MIN_IQR) -> np.ndarray:
    """(U,) bool: a unit's IoU with its label exceeds ``min_iou`` and, when ``unit_iqrs`` (its IQR
    with that label at its threshold, ``iqr_at_threshold``) is given, that exceeds ``min_iqr``: the
    ICLR code's rule under its IQR thresholds (a mask on half the pixels, independent of a concept
    on a tenth of them, has IoU 0.09 with it and tells nothing about it: IQR 0)."""
    ok = np.asarray(unit_ious, dtype=np.float64) > min_iou
    if unit_iqrs is not None:
        ok &= np.asarray(unit_iqrs, dtype=np.float64) > min_iqr
    return ok


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
