"""Contextual insertion: the same units inserted at one place draw different amounts of a concept
depending on what is there (a door appears on a wall, not in the sky).

For each sample and each chosen cell of the layer grid, the concept's units are set to their
insertion values in that cell alone (the engine's ``Edit``, a mask per copy of the sample, 64
places a pass re-run from the layer); the concept pixels added to the image are tabulated by the
label the unedited image has at the centre of that cell.

In a ``torch.distributed`` job (``ranks``) the places are drawn first, alike on every rank (as
one process draws them), then the batches of samples are shared round robin and their insertions
gathered back in order (``engine.ace.shared_map``): every rank returns one process's table, bit
for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gandissect_widgets.engine.ace import _progress, resolve_ranks, shared_map
from gandissect_widgets.engine.distributed import Ranks
from gandissect_widgets.engine.hooks import Edit, can_run_from, check_units, resolve_layers
from gandissect_widgets.engine.interventions import (InsertionValues, concept_index, layer_activation,
                                                     render)
from gandissect_widgets.engine.progress import Steps
from gandissect_widgets.engine.protocols import model_device, sample_latents, segment

__all__ = ["ContextResult", "contextual_insertion"]

_PER_PASS = 64  # insertions rendered together


@dataclass
class ContextResult:
    layer: str
    concept: str
    units: list
    labels: list            # segmenter labels
    count: np.ndarray       # (L,) insertions whose cell centre had label l
    added_mean: np.ndarray  # (L,) mean fraction of image pixels of the concept added
    added_std: np.ndarray   # (L,) standard deviation of the same
    settings: dict

    def table(self, min_count: int = 1):
        """[(label, count, mean added fraction, 95% half-width)], by descending mean."""
        rows = []
        for l, name in enumerate(self.labels):
            n = int(self.count[l])
            if n >= min_count and l > 0:
                half = 1.96 * self.added_std[l] / np.sqrt(n) if n > 1 else float("nan")
                rows.append((name, n, float(self.added_mean[l]), float(half)))
        return sorted(rows, key=lambda r: -r[2])

    def to_json(self):
        return {"layer": self.layer, "concept": self.concept, "units": [int(u) for u in self.units],
                "settings": self.settings,
                "table": [{"context": r[0], "count": r[1], "added_fraction": r[2], "ci95": r[3]}
                          for r in self.table()]}


def contextual_insertion(G, S, layer: str, concept, units, n_samples: int = 100, seed: int = 5,
                         locations: int | None = 8, batch_size: int = 8, values=None,
                         insertion: InsertionValues | None = None, strength: float = 1.0, patch: int = 1,
                         progress: bool = True, ranks: Ranks | None = None) -> ContextResult:
    """Insert ``units`` (e.g. the concept's top-20 by IoU) at one place at a time.

    locations: places per sample, drawn at random (seeded), or None for every place of the grid.
    patch: the side, in layer cells, of the square set at each place (1: a single cell); the
        context is the label at its centre.  strength: the units are set to ``strength`` times
        their insertion values (small GANs may need 2-4, and a patch, to draw an object).
    progress: see ``engine.progress`` (a step per pass of 64 insertions).
    ranks: a job to share the batches with (default: the one initialised, else one process).
    """
    ranks = resolve_ranks(ranks)
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    if not can_run_from(G, layer):
        raise ValueError(f"contextual insertion re-renders from {layer!r} for every cell; "
                         f"{type(G).__name__} cannot run from a layer (make it an nn.Sequential or give it forward_from)")
    dev = model_device(G)
    z = sample_latents(G, n_samples, seed)
    r0 = layer_activation(G, z[:1].to(dev), layer)
    C, h, w = r0.shape[1:]
    units = check_units(units, C)
    patch = int(patch)
    if not 1 <= patch <= min(h, w):
        raise ValueError(f"patch must be between 1 and {min(h, w)} cells for {layer} ({h}x{w}), got {patch}")
    if not (np.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a positive number, got {strength!r}")
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1).to(dev)
    if values.numel() == C:
        values = values[torch.from_numpy(units).to(dev)]
    values = values * float(strength)
    gh, gw = h - patch + 1, w - patch + 1  # top-left cells of the places
    L = len(S.labels)
    uidx = torch.from_numpy(units).to(dev)
    per = gh * gw if locations is None else min(locations, gh * gw)  # places per sample
    starts = list(range(0, n_samples, batch_size))
    places = _places(starts, batch_size, n_samples, gh * gw, per, locations is None, seed)
    passes = [-(-len(b) // _PER_PASS) for b, _ in places]

    def insertions(j):  # (the context label, the concept fraction added) of each insertion of batch j
        zb = z[starts[j]:starts[j] + batch_size].to(dev)
        r = layer_activation(G, zb, layer)
        seg0 = segment(S, render(G, zb, [], activation=r, layer=layer))
        H, W = seg0.shape[-2:]
        base = (seg0 == c).any(1).float().mean((1, 2))  # (B,)
        b, pos = places[j]
        y, x = pos // gw, pos % gw
        cy = np.minimum(H - 1, ((y + patch / 2) * H / h).astype(np.int64))  # the centre of each place
        cx = np.minimum(W - 1, ((x + patch / 2) * W / w).astype(np.int64))
        labels = seg0[torch.from_numpy(b).to(dev), 0, torch.from_numpy(cy).to(dev),
                      torch.from_numpy(cx).to(dev)].cpu().numpy()
        added = []
        for j0 in range(0, len(b), _PER_PASS):
            j1 = j0 + _PER_PASS
            bidx = torch.from_numpy(b[j0:j1]).to(dev)
            edit = Edit(layer, uidx, values, _patch_masks(y[j0:j1], x[j0:j1], patch, (h, w), r))
            seg1 = segment(S, render(G, None, [edit], activation=r[bidx], layer=layer))
            added.append(((seg1 == c).any(1).float().mean((1, 2)) - base[bidx]).cpu().numpy())
            steps.update()
        return labels, added
    mine = sum(passes[j] for j in ranks.share(range(len(starts))))
    with Steps(_progress(progress, ranks), mine, f"context {layer}") as steps:
        parts = shared_map(insertions, range(len(starts)), ranks)
    labels = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    added = [a for p in parts for a in p[1]]
    added = np.concatenate(added) if added else np.zeros(0, np.float32)
    count = np.bincount(labels, minlength=L).astype(np.float64)
    s1 = np.bincount(labels, weights=added, minlength=L)
    s2 = np.bincount(labels, weights=added ** 2, minlength=L)
    mean = np.divide(s1, count, out=np.zeros(L), where=count > 0)
    var = np.divide(s2, count, out=np.zeros(L), where=count > 0) - mean ** 2
    settings = dict(n_samples=n_samples, seed=seed, locations=locations, grid=[int(h), int(w)],
                    patch=patch, strength=float(strength))
    return ContextResult(layer, S.labels[c], units.tolist(), list(S.labels), count, mean,
                         np.sqrt(np.clip(var, 0, None)), settings)


def _places(starts, batch_size, n_samples, n_places, per, every, seed):
    """For each batch: (the sample in the batch, the place) of each insertion, the places of each
    sample drawn in sample order from one seeded stream (or every place), whoever renders them."""
    rng = np.random.RandomState(seed)
    out = []
    for i in starts:
        B = min(batch_size, n_samples - i)
        chosen = [np.arange(n_places)] * B if every else [rng.choice(n_places, per, replace=False) for _ in range(B)]
        out.append((np.repeat(np.arange(B), [len(p) for p in chosen]), np.concatenate(chosen).astype(np.int64)))
    return out


def _patch_masks(y, x, patch, grid, like):
    """(P,1,h,w) masks, 1 on the ``patch`` x ``patch`` cells from (y[p], x[p]) of each place p."""
    rows = torch.arange(grid[0], device=like.device)
    cols = torch.arange(grid[1], device=like.device)
    y = torch.from_numpy(y).to(like.device)[:, None]
    x = torch.from_numpy(x).to(like.device)[:, None]
    inside_y = (rows[None] >= y) & (rows[None] < y + patch)  # (P,h)
    inside_x = (cols[None] >= x) & (cols[None] < x + patch)  # (P,w)
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(like.dtype)[:, None]
