"""Learn a continuous intervention vector alpha in [0,1]^C that causes a concept (DESIGN §3).

Minimise ``-ACE(alpha) + lambda * ||alpha||^2`` where ACE(alpha) is the difference in the soft
presence of the concept (the segmenter's class probabilities) between inserting
(``r*(1-alpha) + k*alpha``) and ablating (``r*(1-alpha)``) the units, with Adam, alpha clamped
to [0,1] after each step, gradients through the generator's later layers and the segmenter.
Held-out samples measure what was learned, so the figure is not fit to its own data.

In a ``torch.distributed`` job (``ranks``) every rank trains alike (the steps are sequential; a
shared batch would change the sums' order) and takes rank 0's alpha and losses, so that a GPU's
nondeterministic kernels cannot leave the ranks with different vectors; the held-out batches and
the top-k ACEs are shared (``engine.ace.shared_map``), so the result is one process's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine.ace import _progress, measure_ace, resolve_ranks, shared_map
from gandissect_widgets.engine.distributed import Ranks, broadcast
from gandissect_widgets.engine.hooks import Edit, resolve_layers
from gandissect_widgets.engine.interventions import (InsertionValues, concept_index, concept_presence,
                                                     layer_activation, render)
from gandissect_widgets.engine.protocols import model_device, sample_latents
from gandissect_widgets.engine.readout import descending

__all__ = ["OptimizeResult", "optimize_intervention"]


@dataclass
class OptimizeResult:
    layer: str
    concept: str
    alpha: np.ndarray                 # (C,) learned weights in [0,1]
    ranking: np.ndarray               # (C,) units by descending alpha (ties by unit index)
    heldout_ace_soft: float           # soft-presence ACE of alpha on held-out samples
    heldout_ace: float                # hard (segmentation) ACE of alpha on held-out samples
    topk_ace: dict                    # {k: hard ACE of the top-k units switched fully, held out}
    losses: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_json(self):
        return {"layer": self.layer, "concept": self.concept, "alpha": [float(a) for a in self.alpha],
                "ranking": [int(u) for u in self.ranking], "heldout_ace_soft": self.heldout_ace_soft,
                "heldout_ace": self.heldout_ace, "topk_ace": {str(k): v for k, v in self.topk_ace.items()},
                "losses": [float(x) for x in self.losses], "settings": self.settings}


def _ace_alpha(G, S, zb, layer, c, alpha, k, soft, grad):
    r = layer_activation(G, zb, layer)
    x_in = render(G, zb, [Edit(layer, alpha, k)], activation=r, layer=layer, grad=grad)
    x_ab = render(G, zb, [Edit(layer, alpha, None)], activation=r, layer=layer, grad=grad)
    return concept_presence(S, x_in, c, soft=soft) - concept_presence(S, x_ab, c, soft=soft)


def optimize_intervention(G, S, layer: str, concept, n_train: int = 256, n_test: int = 128, seed: int = 10,
                          steps: int = 200, batch_size: int = 8, lr: float = 0.01, l2: float = 0.005,
                          init=None, values=None, insertion: InsertionValues | None = None,
                          topks=(10, 20), progress: bool = True, ranks: Ranks | None = None) -> OptimizeResult:
    """Optimise alpha for ``concept`` at ``layer``; train and held-out latents come from ``seed``
    (the first ``n_train`` train, the next ``n_test`` held out).  ``init``: (C,) starting alpha
    (e.g. the concept's IoU column over its max, as the paper does); default 0.5 everywhere.
    ``ranks``: a job (default: the one initialised, else one process), see the module doc."""
    ranks = resolve_ranks(ranks)
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    if not callable(getattr(S, "probabilities", None)):
        raise ValueError(f"{type(S).__name__} has no probabilities(); the optimiser needs class probabilities")
    if n_train < 1 or n_test < 1 or steps < 1:
        raise ValueError(f"n_train, n_test and steps must be >= 1, got {n_train}, {n_test}, {steps}")
    dev = model_device(G)
    z = sample_latents(G, n_train + n_test, seed)
    ztr, zte = z[:n_train], z[n_train:]
    C = layer_activation(G, ztr[:1].to(dev), layer).shape[1]
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    k = torch.as_tensor(values, dtype=torch.float32).to(dev).reshape(-1)
    if k.numel() != C:
        raise ValueError(f"values must have one insertion constant per unit ({C}), got {k.numel()}")
    a0 = torch.full((C,), 0.5) if init is None else torch.as_tensor(np.asarray(init, dtype=np.float32)).reshape(-1)
    if a0.numel() != C:
        raise ValueError(f"init must have {C} entries, got {a0.numel()}")
    alpha = a0.clamp(0, 1).to(dev).clone().requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=lr)
    losses = []
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), disable=not _progress(progress, ranks), desc=f"optimise {S.labels[c]} @ {layer}"):
        idx = torch.randint(0, n_train, (batch_size,), generator=g)
        zb = ztr[idx].to(dev)
        ace = _ace_alpha(G, S, zb, layer, c, alpha, k, soft=True, grad=True).mean()
        loss = -ace + l2 * (alpha ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            alpha.clamp_(0, 1)
        losses.append(float(loss.detach()))
    alpha_np, losses = broadcast((alpha.detach().cpu().numpy(), losses), ranks)
    a = torch.from_numpy(alpha_np).to(dev)

    def heldout(i):  # (soft, hard) per-sample ACEs of one held-out batch
        zb = zte[i:i + batch_size].to(dev)
        return tuple(_ace_alpha(G, S, zb, layer, c, a, k, soft=soft, grad=False).cpu() for soft in (True, False))
    with torch.no_grad():
        parts = shared_map(heldout, range(0, n_test, batch_size), ranks)
    soft, hard = [p[0] for p in parts], [p[1] for p in parts]
    ranking = descending(alpha_np)
    topk_ace = {}
    for kk in topks:
        if 0 < kk <= C:
            res = measure_ace(G, S, layer, ranking[:kk], c, z=zte, values=k.cpu(), batch_size=batch_size,
                              bootstrap=200, ranks=ranks)
            topk_ace[int(kk)] = res.ace
    settings = dict(n_train=n_train, n_test=n_test, seed=seed, steps=steps, batch_size=batch_size, lr=lr, l2=l2)
    return OptimizeResult(layer, S.labels[c], alpha_np, ranking, float(torch.cat(soft).mean()),
                          float(torch.cat(hard).mean()), topk_ace, losses, settings)
