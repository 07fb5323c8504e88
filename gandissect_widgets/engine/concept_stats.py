"""``ConceptPixelCounts``: where each concept sits, over a dissection's samples.

``counts[c, y, x]`` is the number of samples whose segmentation has concept c at pixel (y, x) of the
segmentation grid.  It is what the position-only baseline (``engine.baselines``) is read from: a
fixed mask that covers the pixels where c usually is scores an IoU without knowing anything of the
image.  A pixel counts for c when any label channel says c, exactly as the dissection counts S_c
(``stats.dedupe_channels``), so ``area`` equals the dissection's ``concept_pixels``.

    counts = ConceptPixelCounts(len(S.labels))
    for seg in batches:                # (N,H,W) or (N,K,H,W) labels, on any device
        counts.update(seg)             # batched, on seg's device, no host synchronisation
    counts.merge(other)                # statistics over A and B combine into those over A + B

Like the statistics of ``engine.stats`` it merges, and has ``state_dict`` / ``from_state_dict``.
"""
from __future__ import annotations

import numpy as np
import torch

from gandissect_widgets.engine.protocols import sample_latents, segment
from gandissect_widgets.engine.stats import dedupe_channels

__all__ = ["ConceptPixelCounts", "count_samples"]


class ConceptPixelCounts:
    """Per concept c and pixel p of an H x W grid, how many samples had c at p.

    concepts: len(labels), label 0 (unlabeled) included (its row stays 0: it is no concept).
    grid: (H, W), or None to take it from the first batch."""

    def __init__(self, concepts: int, grid=None, device=None):
        if not isinstance(concepts, (int, np.integer)) or isinstance(concepts, bool) or concepts < 2:
            raise ValueError(f"concepts must be len(labels) >= 2 (label 0 is unlabeled), got {concepts!r}")
        self.concepts = int(concepts)
        self.device = torch.device(device or "cpu")
        self.grid = None
        self._counts = None
        self.n = torch.zeros((), dtype=torch.long, device=self.device)
        if grid is not None:
            self._set_grid(grid)

    def _set_grid(self, grid):
        H, W = (int(v) for v in grid)
        if H < 1 or W < 1:
            raise ValueError(f"grid must be (H, W) with H, W >= 1, got {tuple(grid)}")
        self.grid = (H, W)
        # one row more for the void label of dedupe_channels (dropped on readout)
        self._counts = torch.zeros(self.concepts + 1, H, W, dtype=torch.long, device=self.device)

    def update(self, seg: torch.Tensor, deduped: bool = False):
        """Count a batch of label maps (N,H,W) or (N,K,H,W) (labels in 0..concepts-1, as
        ``protocols.segment`` checks).  Runs on ``seg``'s device; the counts follow it there.
        ``deduped``: ``seg`` is already ``dedupe_channels(seg, concepts)`` (as the dissection's
        counting has it: this saves doing it twice)."""
        if not torch.is_tensor(seg) or seg.dim() not in (3, 4) or seg.is_floating_point() or seg.dtype == torch.bool:
            raise ValueError(f"expected integer labels (N,H,W) or (N,K,H,W), got "
                             f"{getattr(seg, 'dtype', type(seg).__name__)} of shape {tuple(getattr(seg, 'shape', ()))}")
        if seg.dim() == 3:
            seg = seg[:, None]
        N, K, H, W = seg.shape
        if self.grid is None:
            self._set_grid((H, W))
        elif (H, W) != self.grid:
            raise ValueError(f"labels of grid {H}x{W} do not match the counts' grid {self.grid[0]}x{self.grid[1]}")
        if self._counts.device != seg.device:
            self.to(seg.device)
        if N == 0:
            return self
        labels = seg.long() if deduped else dedupe_channels(seg.long(), self.concepts)  # void = concepts: each pair once
        keys = labels * (H * W) + torch.arange(H * W, device=seg.device).view(1, 1, H, W)
        _add_keys(self._counts.view(-1), keys.reshape(-1), scatter=seg.device.type != "cpu")
        self.n += N
        return self

    def to(self, device):
        self.device = torch.device(device)
        self.n = self.n.to(self.device)
        if self._counts is not None:
            self._counts = self._counts.to(self.device)
        return self

    # -- readout ---------------------------------------------------------------------------------
    @property
    def counts(self) -> torch.Tensor:
        """(C, H, W) int64: samples with concept c at each pixel (row 0, unlabeled, is 0)."""
        if self._counts is None:
            raise ValueError("no labels counted yet: the grid is not known")
        return self._counts[:self.concepts]

    @property
    def area(self) -> torch.Tensor:
        """(C,) int64: sum over samples of |S_c|, the dissection's ``concept_pixels``."""
        return self.counts.sum((1, 2))

    def arrays(self) -> dict:
        """The counts as numpy arrays, as a ``Dissection`` keeps them:
        ``concept_position_counts`` (C,H,W) int64 and ``concept_position_samples`` () int64."""
        return {"concept_position_counts": self.counts.cpu().numpy(),
                "concept_position_samples": np.asarray(int(self.n), dtype=np.int64)}

    # -- merging and checkpoints -------------------------------------------------------------------
    def merge(self, other: "ConceptPixelCounts"):
        if other.concepts != self.concepts:
            raise ValueError(f"cannot merge counts of {other.concepts} concepts into {self.concepts}")
        if other.grid is None:
            return self
        if self.grid is None:
            self._set_grid(other.grid)
        elif other.grid != self.grid:
            raise ValueError(f"cannot merge counts of grid {other.grid} into {self.grid}")
        self._counts += other._counts.to(self.device)
        self.n += other.n.to(self.device)
        return self

    def map_counts(self, fn):
        """Counts and sample count replaced by ``fn`` of them (a sum across ranks, say)."""
        if self._counts is not None:
            self._counts = fn(self._counts)
        self.n = fn(self.n)
        return self

    def state_dict(self):
        return {"concepts": self.concepts, "n": self.n.detach().cpu().clone(),
                "counts": None if self._counts is None else self._counts.detach().cpu().clone()}

    @classmethod
    def from_state_dict(cls, sd, device=None):
        self = cls(int(sd["concepts"]), device=device)
        if sd.get("counts") is not None:
            c = torch.as_tensor(sd["counts"])
            if c.dim() != 3 or c.shape[0] != self.concepts + 1:
                raise ValueError(f"counts of shape {tuple(c.shape)} do not fit {self.concepts} concepts "
                                 f"(expected ({self.concepts + 1}, H, W))")
            self._set_grid(c.shape[1:])
            self._counts = c.to(self.device, torch.long).clone()
        self.n = torch.as_tensor(sd["n"]).to(self.device, torch.long).clone()
        return self

    def __repr__(self):
        grid = "no grid yet" if self.grid is None else f"grid {self.grid[0]}x{self.grid[1]}"
        return f"<ConceptPixelCounts of {self.concepts} labels, {grid}, {int(self.n)} samples>"


def _add_keys(flat, keys, scatter):
    """flat[k] += how often k occurs in keys: ``bincount`` on a CPU (faster there), else a
    fixed-size scatter, which needs no host synchronisation (bincount sizes its output by the data)."""
    if scatter:
        flat.index_add_(0, keys, torch.ones(1, dtype=flat.dtype, device=flat.device).expand(keys.numel()))
    else:
        flat += torch.bincount(keys, minlength=flat.numel())[:flat.numel()]


def count_samples(generator, segmenter, n_samples: int, seed: int = 1, batch_size: int = 32, device=None):
    """Counts over the samples a dissection with these ``n_samples`` and ``seed`` used, by running
    the generator and segmenter on them again (for results made before ``dissect`` counted them).
    The images are those of another batch size: a pixel or two at label edges may come out otherwise."""
    from gandissect_widgets.engine.protocols import model_device
    device = torch.device(device) if device is not None else model_device(generator)
    generator.eval()  # as dissect() does: BatchNorm in training mode would draw other images
    z = sample_latents(generator, int(n_samples), int(seed))
    out = ConceptPixelCounts(len(segmenter.labels), device=device)
    with torch.no_grad():
        for i in range(0, int(n_samples), int(batch_size)):
            out.update(segment(segmenter, generator(z[i:i + batch_size].to(device))))
    return out
