"""The dissection's statistics merged across the ranks of a job (``engine.distributed``).

Each rank counts its own batches; these turn the ranks' partial statistics into the ones a single
process would have counted over all samples, identically on every rank:
- integer counters (histograms, joint counts, concept positions) are summed: bit for bit;
- top-k lists are merged by value, ties to the smaller sample index, as ``RunningTopK`` keeps
  them in one process: bit for bit;
- moments (float64 count, mean, M2) are combined in rank order (Chan et al.): equal to one
  process's running sums to the last bits (the order of additions differs), the extremes exactly;
- pilot values (each rank fills its own samples' columns of a zero tensor) are summed: x + 0 is x.
In one process each is the identity.
"""
from __future__ import annotations

import numpy as np
import torch

from gandissect_widgets.engine.concept_stats import ConceptPixelCounts
from gandissect_widgets.engine.distributed import Ranks, all_max, all_sum, gather_objects
from gandissect_widgets.engine.stats import RunningMoments, RunningTopK, TailHistogram

__all__ = ["sum_histogram", "merge_moments", "merge_topk", "sum_positions", "job_grid", "any_rank"]

_COUNTERS = ("n_pixels", "hist", "joint", "concept_pixels", "skipped", "skipped_joint")


def sum_histogram(h: TailHistogram, ranks: Ranks) -> TailHistogram:
    """``h`` with every counter summed over the ranks (the edges are the same on every rank)."""
    if ranks.distributed:
        for name in _COUNTERS:
            setattr(h, name, all_sum(getattr(h, name), ranks))
    return h


def merge_moments(m: RunningMoments, ranks: Ranks) -> RunningMoments:
    return _merged(m, ranks, m.mean.device)


def merge_topk(t: RunningTopK, ranks: Ranks) -> RunningTopK:
    return _merged(t, ranks, t.values.device)


def _merged(stat, ranks: Ranks, device):
    """Every rank's ``stat`` (a statistic with ``state_dict``/``from_state_dict``/``merge``) merged
    in rank order, the same on every rank."""
    if not ranks.distributed:
        return stat
    parts = gather_objects(stat.state_dict(), ranks)
    out = type(stat).from_state_dict(parts[0], device)
    for sd in parts[1:]:
        out.merge(type(stat).from_state_dict(sd, device))
    return out


def sum_positions(p: ConceptPixelCounts, grid, ranks: Ranks) -> ConceptPixelCounts:
    """The concept position counts over every rank's samples, on ``grid`` (ranks that segmented
    nothing contribute zeros)."""
    if not ranks.distributed:
        return p
    out = ConceptPixelCounts(p.concepts, grid=grid, device=p.device).merge(p)
    return out.map_counts(lambda t: all_sum(t, ranks))


def job_grid(grid, ranks: Ranks):
    """The segmentation grid (H, W) as the ranks that saw a segmentation know it (None if none did)."""
    if not ranks.distributed:
        return grid
    g = all_max(torch.tensor(list(grid) if grid else [0, 0], dtype=torch.long), ranks)
    return (int(g[0]), int(g[1])) if int(g[0]) > 0 else None


def any_rank(flags: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Boolean ``flags`` set where any rank set them (per-sample marks such as samples left out)."""
    if not ranks.distributed:
        return flags
    return all_max(torch.from_numpy(flags.astype(np.int32)), ranks).numpy().astype(bool)
