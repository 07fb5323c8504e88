"""Average causal effect (ACE) of unit sets on a concept, and the removal curve.

ACE of U on c = E_z[s_c(G(z; insert U))] - E_z[s_c(G(z; ablate U))]; removal ratio =
1 - E[s_c(ablate)] / E[s_c(original)] (DESIGN §3).  Every mean comes with a bootstrap confidence
interval over the samples (the same resampled sample sets for all three quantities).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine.hooks import can_run_from, resolve_layers
from gandissect_widgets.engine.interventions import (InsertionValues, Intervention, concept_index,
                                                     concept_presence, layer_activation, render)
from gandissect_widgets.engine.progress import Steps
from gandissect_widgets.engine.protocols import model_device, sample_latents

__all__ = ["AceResult", "measure_ace", "unit_ace", "removal_curve", "bootstrap_ci", "check_units"]


def check_units(units, n_units: int) -> np.ndarray:
    u = np.asarray(units)
    if u.size == 0:
        raise ValueError("empty unit set: give at least one unit index")
    if u.dtype.kind not in "iu":
        raise ValueError(f"unit indices must be integers, got {u.dtype}")
    bad = [int(x) for x in u.reshape(-1) if x < 0 or x >= n_units]
    if bad:
        raise ValueError(f"unit index out of range: {bad[:10]}; the layer has {n_units} units (0..{n_units - 1})")
    return u.reshape(-1).astype(np.int64)


def bootstrap_ci(stat, n: int, rounds: int = 1000, level: float = 0.95, seed: int = 0):
    """(low, high) percentile interval of ``stat(idx)`` over bootstrap resamples of range(n)."""
    rng = np.random.RandomState(seed)
    vals = np.array([stat(rng.randint(0, n, n)) for _ in range(rounds)])
    a = (1 - level) / 2
    return float(np.nanquantile(vals, a)), float(np.nanquantile(vals, 1 - a))


@dataclass
class AceResult:
    """Per-sample presences (N,) of the concept, and the summary figures with CIs."""

    layer: str
    concept: str
    units: list
    original: np.ndarray
    ablated: np.ndarray
    inserted: np.ndarray
    ace: float
    ace_ci: tuple
    removal_ratio: float
    removal_ci: tuple

    def to_json(self):
        return {"layer": self.layer, "concept": self.concept, "units": [int(u) for u in self.units],
                "n_samples": int(len(self.original)),
                "presence": {"original": float(self.original.mean()), "ablated": float(self.ablated.mean()),
                             "inserted": float(self.inserted.mean())},
                "ace": self.ace, "ace_ci": list(self.ace_ci),
                "removal_ratio": self.removal_ratio, "removal_ci": list(self.removal_ci)}


def _removal(orig, abl):
    m = orig.mean()
    return float(1 - abl.mean() / m) if m > 0 else float("nan")


def measure_ace(G, S, layer: str, units, concept, n_samples: int = 200, seed: int = 2, batch_size: int = 16,
                values=None, region=None, insertion: InsertionValues | None = None, bootstrap: int = 1000,
                level: float = 0.95, progress: bool = False, z=None) -> AceResult:
    """ACE and removal ratio of ``units`` of ``layer`` on ``concept`` over ``n_samples`` latents.

    values: insertion constants (C,) or per unit; default ``insertion(layer, concept)``.
    region: optional image-resolution mask where the units are switched (default everywhere).
    z: explicit latents (then n_samples and seed are ignored).
    """
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    if z is None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        z = sample_latents(G, n_samples, seed)
    n_samples = z.shape[0]
    dev = model_device(G)
    first = layer_activation(G, z[:1].to(dev), layer)
    u = check_units(units, first.shape[1])
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.numel() == first.shape[1]:
        values = values[torch.from_numpy(u)]
    abl = Intervention(layer, u, "ablate", region=region)
    ins = Intervention(layer, u, "insert", values=values, region=region)
    out = {"original": [], "ablated": [], "inserted": []}
    for i in tqdm(range(0, n_samples, batch_size), disable=not progress, desc=f"ace {layer}"):
        zb = z[i:i + batch_size].to(dev)
        r = layer_activation(G, zb, layer)
        for name, ivs in (("original", []), ("ablated", [abl]), ("inserted", [ins])):
            x = render(G, zb, ivs, activation=r, layer=layer)
            out[name].append(concept_presence(S, x, c).cpu())
    o, a, n = (torch.cat(out[k]).numpy().astype(np.float64) for k in ("original", "ablated", "inserted"))
    N = len(o)
    ace_ci = bootstrap_ci(lambda idx: n[idx].mean() - a[idx].mean(), N, bootstrap, level)
    rem_ci = bootstrap_ci(lambda idx: _removal(o[idx], a[idx]), N, bootstrap, level, seed=1)
    return AceResult(layer, S.labels[c], u.tolist(), o, a, n, float(n.mean() - a.mean()), ace_ci,
                     _removal(o, a), rem_ci)


def unit_ace(G, S, layer: str, concept, n_samples: int = 64, seed: int = 2, batch_size: int = 16,
             values=None, insertion: InsertionValues | None = None, progress=True, units=None) -> np.ndarray:
    """(U,) single-unit ACE of the units of ``layer`` on ``concept`` (insert it alone minus ablate
    it alone): every unit, or those in ``units`` (the others are NaN).  ``progress``: see
    ``engine.progress`` (a step per group of units and batch of samples)."""
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    dev = model_device(G)
    z = sample_latents(G, n_samples, seed)
    U = layer_activation(G, z[:1].to(dev), layer).shape[1]
    todo = list(range(U)) if units is None else check_units(units, U).tolist()
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    values = torch.as_tensor(values, dtype=torch.float32).to(dev)
    diff = np.full(U, np.nan)
    diff[todo] = 0
    per = max(1, 64 // batch_size)  # units rendered together, one batch of latents each
    batches = range(0, n_samples, batch_size)
    groups = [todo[j:j + per] for j in range(0, len(todo), per)]
    with Steps(progress, len(batches) * len(groups), f"unit ACE {layer}") as steps:
        for i in batches:
            zb = z[i:i + batch_size].to(dev)
            r = layer_activation(G, zb, layer)
            for us in groups:
                _unit_group_ace(G, S, layer, c, zb, r, us, values, diff)
                steps.update()
    return diff / n_samples


def _unit_group_ace(G, S, layer, c, zb, r, us, values, diff):
    """Add to ``diff[u]`` the summed presence difference, insert minus ablate, of each unit of
    ``us`` alone, over the samples ``zb`` (layer output ``r``), in one partial forward per side."""
    B = r.shape[0]
    if not can_run_from(G, layer):  # no partial forward: one unit at a time, edits hooked in
        for u in us:
            pin = concept_presence(S, render(G, zb, [Intervention(layer, [u], "insert", values[u:u + 1])]), c)
            pab = concept_presence(S, render(G, zb, [Intervention(layer, [u], "ablate")]), c)
            diff[u] += float((pin - pab).sum())
        return
    rep = r.repeat(len(us), 1, 1, 1)
    ins, abl = rep.clone(), rep.clone()
    for j, u in enumerate(us):  # r' = r*(1-a) + k*a with a = 1 on unit u alone
        ins[j * B:(j + 1) * B, u] = values[u]
        abl[j * B:(j + 1) * B, u] = 0
    pin = concept_presence(S, render(G, None, [], activation=ins, layer=layer), c)
    pab = concept_presence(S, render(G, None, [], activation=abl, layer=layer), c)
    diff[us] += (pin - pab).view(len(us), B).sum(1).cpu().numpy()


def removal_curve(G, S, layer: str, concept, rankings: dict, ks=(1, 2, 5, 10, 20, 50), n_samples: int = 100,
                  seed: int = 4, batch_size: int = 16, random_draws: int = 5, random_seed: int = 0,
                  progress: bool = True) -> dict:
    """Removal ratio against the number of top units ablated, for each ranking and for random units.

    rankings: {name: unit indices in rank order} (e.g. IoU and ACE rankings).
    Returns {"ks": [...], "curves": {name: [...]}, "random_mean": [...], "random_std": [...],
    "random_draws": [[...], ...], "original": mean presence}.
    """
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    dev = model_device(G)
    z = sample_latents(G, n_samples, seed)
    U = layer_activation(G, z[:1].to(dev), layer).shape[1]
    ks = [int(k) for k in ks if 0 < k <= U]
    rng = np.random.RandomState(random_seed)
    sets = {}
    for name, rank in rankings.items():
        rank = check_units(rank, U)
        for k in ks:
            sets[(name, k)] = rank[:k]
    for d in range(random_draws):
        perm = rng.permutation(U)
        for k in ks:
            sets[(f"random{d}", k)] = perm[:k]
    orig = 0.0
    abl = {key: 0.0 for key in sets}
    for i in tqdm(range(0, n_samples, batch_size), disable=not progress, desc=f"removal {layer}"):
        zb = z[i:i + batch_size].to(dev)
        r = layer_activation(G, zb, layer)
        orig += float(concept_presence(S, render(G, zb, [], activation=r, layer=layer), c).sum())
        for key, units in sets.items():
            x = render(G, zb, [Intervention(layer, units, "ablate")], activation=r, layer=layer)
            abl[key] += float(concept_presence(S, x, c).sum())
    ratio = {key: (1 - v / orig) if orig > 0 else float("nan") for key, v in abl.items()}
    curves = {name: [ratio[(name, k)] for k in ks] for name in rankings}
    draws = [[ratio[(f"random{d}", k)] for k in ks] for d in range(random_draws)]
    arr = np.array(draws) if draws else np.zeros((0, len(ks)))
    return {"layer": layer, "concept": S.labels[c], "ks": ks, "curves": curves,
            "random_mean": arr.mean(0).tolist() if len(arr) else [], "random_std": arr.std(0).tolist() if len(arr) else [],
            "random_draws": draws, "original_presence": orig / n_samples, "n_samples": n_samples}
