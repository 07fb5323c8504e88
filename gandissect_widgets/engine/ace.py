"""Average causal effect (ACE) of unit sets on a concept, and the removal curve.

ACE of U on c = E_z[s_c(G(z; insert U))] - E_z[s_c(G(z; ablate U))]; removal ratio =
1 - E[s_c(ablate)] / E[s_c(original)] (DESIGN §3).  Every mean comes with a bootstrap confidence
interval over the samples (the same resampled sample sets for all three quantities).

Many edits share one forward pass: ``unit_ace`` and ``removal_curve`` stack their edits (one unit,
or one unit set, per copy of a batch of samples) into an ``Edit`` with per-sample unit weights,
about ``images_per_pass`` images a pass, re-run from the layer where the model allows it.
``unit_ace_reference`` is the readable definition the fast path is tested against.  Each tool's
``*_cost`` twin counts, from the same schedule, the passes and segmenter calls it will make (for
the whole job: in a ``torch.distributed`` job each rank makes its share of them).

In a job (``ranks``, see ``engine.distributed``) the tools share whole batches of the same latent
sequence, or (batch, group of edits) pairs, round robin (``shared_map``), so every sample goes
through the models in the same batch as in one process; the per-sample values are gathered back
into sample order and every figure is computed from them on every rank, in one process's order:
each rank returns what one process returns, bit for bit (on a GPU: as far as its kernels are
deterministic, since a batch that one process renders twice may already differ in the last bits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gandissect_widgets.engine.distributed import Ranks, current, gather_objects
from gandissect_widgets.engine.hooks import Edit, TraceDict, can_run_from, check_units, resolve_layers
from gandissect_widgets.engine.interventions import (Cost, InsertionValues, Intervention, concept_index,
                                                     concept_presence, layer_activation, render)
from gandissect_widgets.engine.progress import Steps
from gandissect_widgets.engine.protocols import model_device, sample_latents

__all__ = ["AceResult", "resolve_ranks", "shared_map", "measure_ace", "measure_ace_cost", "unit_ace", "unit_ace_reference", "unit_ace_cost",
           "removal_curve", "removal_curve_cost", "bootstrap_ci", "check_units"]


def resolve_ranks(ranks: Ranks | None = None) -> Ranks:
    """``ranks`` as given; None: ``distributed.current()`` (the job's when a process group is
    initialised, else one process: a plain call in one process behaves as it always did)."""
    return ranks if ranks is not None else current()


def shared_map(fn, items, ranks: Ranks) -> list:
    """``[fn(item) for item in items]`` on every rank, each item computed by the rank whose share
    holds it (``Ranks.share``: round robin, in item order) and gathered back into item order.
    ``fn``'s values must pickle (arrays, numbers).  A rank that died: ``RankFailed`` here."""
    items = list(items)
    mine = [fn(item) for item in ranks.share(items)]
    if not ranks.distributed:
        return mine
    parts = gather_objects(mine, ranks)
    return [parts[ranks.owner(i)][i // ranks.size] for i in range(len(items))]


def _my_steps(items, ranks: Ranks, per_item: int = 1) -> int:
    """Progress steps of this rank's share (the bar is the writer's: its share tracks the job's)."""
    return len(ranks.share(items)) * per_item


def _progress(progress, ranks: Ranks):
    """Progress only on the writing rank."""
    return progress if ranks.writer else False


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


def _batches(n_samples: int, batch_size: int):
    return [(i, min(i + batch_size, n_samples)) for i in range(0, n_samples, batch_size)]


def _groups(items, batch_size: int, images_per_pass: int):
    """``items`` (edits) in groups rendered together, one copy of a batch of samples each."""
    per = max(1, int(images_per_pass) // max(1, batch_size))
    return [items[j:j + per] for j in range(0, len(items), per)]


def _pass_cost(G, layer, n_images: int, segmented: bool = True) -> Cost:
    """One render of ``n_images``: from the layer on where the model allows it."""
    return Cost(1, int(can_run_from(G, layer)), int(segmented), n_images)


def _batch_at(held, b, batches, z, dev, G, layer, resumable):
    """(latents, layer output) of batch ``b``, kept in ``held`` while its passes come in order
    (the layer output only where the generator re-runs from the layer)."""
    if b not in held:
        held.clear()
        zb = z[batches[b][0]:batches[b][1]].to(dev)
        held[b] = zb, (layer_activation(G, zb, layer) if resumable else None)
    return held[b]


def _edited_presence(G, S, layer, c, zb, r, weights, values=None):
    """(P, B) presence of concept ``c`` under P edits at once: row j of ``weights`` (P,C) are the
    unit weights of edit j (k = ``values`` (C,), None: ablation), applied to its own copy of the
    batch ``zb`` (layer output ``r``, or None where the model cannot run from the layer)."""
    P, B = weights.shape[0], zb.shape[0]
    edit = Edit(layer, weights.repeat_interleave(B, 0), values)  # sample j*B+b: edit j on sample b
    if r is not None:
        x = render(G, None, [edit], activation=r.repeat(P, *[1] * (r.dim() - 1)), layer=layer)
    else:
        x = render(G, zb.repeat(P, *[1] * (zb.dim() - 1)), [edit])
    return concept_presence(S, x, c).view(P, B)


def measure_ace_cost(G, layer: str, n_samples: int = 200, batch_size: int = 16) -> Cost:
    """What ``measure_ace`` with these arguments renders (insertion values not included: see
    ``InsertionValues.cost``)."""
    resumable = can_run_from(G, layer)
    cost = Cost(1, 0, 0, 1)  # the layer's and the images' sizes, from one latent
    for i0, i1 in _batches(n_samples, batch_size):  # the layer's output, then original, ablated, inserted
        if resumable:
            cost = cost + Cost(1, 0, 0, i1 - i0)
        cost = cost + _pass_cost(G, layer, i1 - i0) + _pass_cost(G, layer, i1 - i0) + _pass_cost(G, layer, i1 - i0)
    return cost


def measure_ace(G, S, layer: str, units, concept, n_samples: int = 200, seed: int = 2, batch_size: int = 16,
                values=None, region=None, insertion: InsertionValues | None = None, bootstrap: int = 1000,
                level: float = 0.95, progress: bool = False, z=None, ranks: Ranks | None = None) -> AceResult:
    """ACE and removal ratio of ``units`` of ``layer`` on ``concept`` over ``n_samples`` latents.

    values: insertion constants (C,) or per unit; default ``insertion(layer, concept)``.
    region: optional image-resolution mask where the units are switched (default everywhere).
    z: explicit latents (then n_samples and seed are ignored).
    progress: see ``engine.progress`` (a step per batch of samples).
    ranks: a ``torch.distributed`` job (default: the one initialised, else one process): the batches
        are shared, the per-sample presences gathered, the figures and bootstrap intervals computed
        from them on every rank; the result equals one process's bit for bit.  (Insertion values not
        given are computed whole on every rank.)
    """
    ranks = resolve_ranks(ranks)
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    if z is None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        z = sample_latents(G, n_samples, seed)
    n_samples = z.shape[0]
    dev = model_device(G)
    with torch.no_grad(), TraceDict(G, [layer]) as tr:  # the layer's shape and the images' size
        image = G(z[:1].to(dev))
    shape = tuple(tr[layer].output.shape[1:])
    u = check_units(units, shape[0])
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.numel() == shape[0]:
        values = values[torch.from_numpy(u)]
    abl = Intervention(layer, u, "ablate", region=region).to_edit(shape, image.shape[-2:])
    ins = Intervention(layer, u, "insert", values=values, region=region).to_edit(shape, image.shape[-2:])
    batches, resumable = _batches(n_samples, batch_size), can_run_from(G, layer)

    def presences(batch):  # (original, ablated, inserted) presences of one batch
        zb = z[batch[0]:batch[1]].to(dev)
        r = layer_activation(G, zb, layer) if resumable else None
        out = tuple(concept_presence(S, render(G, zb, ivs, activation=r, layer=layer), c).cpu()
                    for ivs in ([], [abl], [ins]))
        steps.update()
        return out
    with Steps(_progress(progress, ranks), _my_steps(batches, ranks), f"ace {layer}") as steps:
        parts = shared_map(presences, batches, ranks)
    o, a, n = (torch.cat([p[j] for p in parts]).numpy().astype(np.float64) for j in range(3))
    N = len(o)
    ace_ci = bootstrap_ci(lambda idx: n[idx].mean() - a[idx].mean(), N, bootstrap, level)
    rem_ci = bootstrap_ci(lambda idx: _removal(o[idx], a[idx]), N, bootstrap, level, seed=1)
    return AceResult(layer, S.labels[c], u.tolist(), o, a, n, float(n.mean() - a.mean()), ace_ci,
                     _removal(o, a), rem_ci)


def _unit_ace_setup(G, S, layer, concept, n_samples, seed, values, insertion, units):
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    dev = model_device(G)
    z = sample_latents(G, n_samples, seed)
    U = layer_activation(G, z[:1].to(dev), layer).shape[1]
    todo = list(range(U)) if units is None else check_units(units, U).tolist()
    if values is None:
        values = (insertion or InsertionValues(G, S))(layer, c)
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1).to(dev)
    if values.numel() != U:
        raise ValueError(f"unit ACE needs one insertion value per unit of {layer} ({U}), got {values.numel()}")
    return c, dev, z, U, todo, values


def _unit_ace_result(per_sample, todo):
    """(U,) mean over samples of the per-sample differences; NaN for units not measured."""
    out = np.full(per_sample.shape[0], np.nan)
    out[todo] = per_sample[todo].sum(1) / per_sample.shape[1]
    return out


def unit_ace_cost(G, layer: str, n_samples: int = 64, batch_size: int = 16, units=None,
                  images_per_pass: int = 64) -> Cost:
    """What ``unit_ace`` with these arguments renders (insertion values not included)."""
    dev = model_device(G)
    U = layer_activation(G, sample_latents(G, 1, 0).to(dev), layer).shape[1]
    todo = list(range(U)) if units is None else check_units(units, U).tolist()
    resumable = can_run_from(G, layer)
    cost = Cost(1, 0, 0, 1)
    for i0, i1 in _batches(n_samples, batch_size):
        if resumable:
            cost = cost + Cost(1, 0, 0, i1 - i0)
        for us in _groups(todo, batch_size, images_per_pass):
            cost = cost + _pass_cost(G, layer, len(us) * (i1 - i0)) + _pass_cost(G, layer, len(us) * (i1 - i0))
    return cost


def unit_ace(G, S, layer: str, concept, n_samples: int = 64, seed: int = 2, batch_size: int = 16,
             values=None, insertion: InsertionValues | None = None, progress=True, units=None,
             images_per_pass: int = 64, ranks: Ranks | None = None) -> np.ndarray:
    """(U,) single-unit ACE of the units of ``layer`` on ``concept`` (insert it alone minus ablate
    it alone): every unit, or those in ``units`` (the others are NaN).

    Units are rendered together: each pass holds about ``images_per_pass`` images (a copy of a
    batch of ``batch_size`` samples per unit), re-run from the layer where the model allows it,
    else whole forward passes with the edits hooked in.  ``unit_ace_cost`` counts the passes.
    ``progress``: see ``engine.progress`` (a step per pass: a group of units and a batch of samples).
    ``ranks``: a ``torch.distributed`` job (default: the one initialised, else one process): the
    passes (batch, group of units) are shared, the per-sample differences gathered; equal to one
    process bit for bit.  Equal to ``unit_ace_reference``, which renders one unit at a time."""
    ranks = resolve_ranks(ranks)
    c, dev, z, U, todo, values = _unit_ace_setup(G, S, layer, concept, n_samples, seed, values, insertion, units)
    resumable = can_run_from(G, layer)
    batches, groups = _batches(n_samples, batch_size), _groups(todo, batch_size, images_per_pass)
    passes = [(b, g) for b in range(len(batches)) for g in range(len(groups))]
    held = {}  # the batch this rank renders now: (latents, layer output); its passes come in order

    def differences(item):
        b, g = item
        zb, r = _batch_at(held, b, batches, z, dev, G, layer, resumable)
        onehot = torch.nn.functional.one_hot(torch.tensor(groups[g], device=dev), U).float()
        pin = _edited_presence(G, S, layer, c, zb, r, onehot, values)
        pab = _edited_presence(G, S, layer, c, zb, r, onehot)
        steps.update()
        return (pin - pab).cpu().numpy()
    per_sample = np.zeros((U, n_samples))
    with torch.no_grad(), Steps(_progress(progress, ranks), _my_steps(passes, ranks), f"unit ACE {layer}") as steps:
        for (b, g), d in zip(passes, shared_map(differences, passes, ranks)):
            per_sample[groups[g], batches[b][0]:batches[b][1]] = d
    return _unit_ace_result(per_sample, todo)


def unit_ace_reference(G, S, layer: str, concept, n_samples: int = 64, seed: int = 2, batch_size: int = 16,
                       values=None, insertion: InsertionValues | None = None, units=None) -> np.ndarray:
    """``unit_ace`` by its definition, one unit and one batch at a time (slow, and readable)."""
    c, dev, z, U, todo, values = _unit_ace_setup(G, S, layer, concept, n_samples, seed, values, insertion, units)
    per_sample = np.zeros((U, n_samples))
    for i0, i1 in _batches(n_samples, batch_size):
        zb = z[i0:i1].to(dev)
        for u in todo:
            inserted = render(G, zb, [Intervention(layer, [u], "insert", values[u:u + 1])])
            ablated = render(G, zb, [Intervention(layer, [u], "ablate")])
            per_sample[u, i0:i1] = (concept_presence(S, inserted, c) - concept_presence(S, ablated, c)).cpu().numpy()
    return _unit_ace_result(per_sample, todo)


def _removal_sets(rankings: dict, ks, U: int, random_draws: int, random_seed: int):
    """{(ranking name or 'random<d>', k): the top k units}, and the ks kept (0 < k <= U)."""
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
    return sets, ks


def removal_curve_cost(G, layer: str, rankings: dict, ks=(1, 2, 5, 10, 20, 50), n_samples: int = 100,
                       batch_size: int = 16, random_draws: int = 5, images_per_pass: int = 64) -> Cost:
    """What ``removal_curve`` with these arguments renders."""
    dev = model_device(G)
    U = layer_activation(G, sample_latents(G, 1, 0).to(dev), layer).shape[1]
    sets, _ = _removal_sets(rankings, ks, U, random_draws, 0)
    cost = Cost(1, 0, 0, 1)
    for i0, i1 in _batches(n_samples, batch_size):
        B = i1 - i0
        cost = cost + Cost(1, 0, 0, B) + _pass_cost(G, layer, B)
        for group in _groups(list(sets), batch_size, images_per_pass):
            cost = cost + _pass_cost(G, layer, len(group) * B)
    return cost


def removal_curve(G, S, layer: str, concept, rankings: dict, ks=(1, 2, 5, 10, 20, 50), n_samples: int = 100,
                  seed: int = 4, batch_size: int = 16, random_draws: int = 5, random_seed: int = 0,
                  progress: bool = True, images_per_pass: int = 64, ranks: Ranks | None = None) -> dict:
    """Removal ratio against the number of top units ablated, for each ranking and for random units.

    rankings: {name: unit indices in rank order} (e.g. IoU and ACE rankings).  The unit sets are
    ablated together, about ``images_per_pass`` images a pass (``removal_curve_cost`` counts them).
    ranks: a ``torch.distributed`` job (default: the one initialised, else one process): the passes
    (a batch unedited, or a batch and a group of unit sets) are shared, their per-batch sums gathered
    and added in one process's order; the random sets are drawn alike on every rank; equal to one
    process bit for bit.
    Returns {"ks": [...], "curves": {name: [...]}, "random_mean": [...], "random_std": [...],
    "random_draws": [[...], ...], "original": mean presence}.
    """
    ranks = resolve_ranks(ranks)
    resolve_layers(G, [layer])
    c = concept_index(S.labels, concept)
    dev = model_device(G)
    z = sample_latents(G, n_samples, seed)
    U = layer_activation(G, z[:1].to(dev), layer).shape[1]
    sets, ks = _removal_sets(rankings, ks, U, random_draws, random_seed)
    keys = list(sets)
    weights = torch.zeros(len(keys), U, device=dev)
    for j, key in enumerate(keys):
        weights[j, torch.from_numpy(np.asarray(sets[key])).to(dev)] = 1
    resumable = can_run_from(G, layer)
    batches, groups = _batches(n_samples, batch_size), _groups(list(range(len(keys))), batch_size, images_per_pass)
    passes = [(b, g) for b in range(len(batches)) for g in [None] + list(range(len(groups)))]  # None: unedited
    held = {}

    def sums(item):  # per-batch presence sums: [unedited], or one per unit set of the group
        b, g = item
        zb, r = _batch_at(held, b, batches, z, dev, G, layer, resumable)
        if g is None:
            out = [float(concept_presence(S, render(G, zb, [], activation=r, layer=layer), c).double().sum())]
        else:
            out = [float(p) for p in _edited_presence(G, S, layer, c, zb, r, weights[groups[g]]).double().sum(1).cpu()]
        steps.update()
        return out
    orig = 0.0
    abl = dict.fromkeys(keys, 0.0)
    with torch.no_grad(), Steps(_progress(progress, ranks), _my_steps(passes, ranks), f"removal {layer}") as steps:
        for (b, g), values in zip(passes, shared_map(sums, passes, ranks)):  # added up in batch order
            if g is None:
                orig += values[0]
            else:
                for j, p in zip(groups[g], values):
                    abl[keys[j]] += p
    ratio = {key: (1 - v / orig) if orig > 0 else float("nan") for key, v in abl.items()}
    curves = {name: [ratio[(name, k)] for k in ks] for name in rankings}
    draws = [[ratio[(f"random{d}", k)] for k in ks] for d in range(random_draws)]
    arr = np.array(draws) if draws else np.zeros((0, len(ks)))
    return {"layer": layer, "concept": S.labels[c], "ks": ks, "curves": curves,
            "random_mean": arr.mean(0).tolist() if len(arr) else [],
            "random_std": arr.std(0).tolist() if len(arr) else [],
            "random_draws": draws, "original_presence": orig / n_samples, "n_samples": n_samples}
