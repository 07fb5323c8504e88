"""Interventions at the level a user speaks: "ablate these units here", "insert tree there".

- ``Intervention``: a unit set at a layer, ablated or inserted, everywhere or inside a region
  given at image resolution (pooled to the layer grid, max by default).  ``to_edit`` turns it
  into the engine's ``Edit`` (``r' = r*(1-a) + k*a``).
- ``render``: images of latents under a list of interventions, running only the layers after the
  first edited one; it can start from a cached activation, which is what interactive
  re-rendering does.
- ``concept_presence``: s_c(x), the fraction of pixels a segmenter marks as c.
- ``InsertionValues``: per-unit insertion constants k (mean activation where the concept is, or a
  quantile of the unit's activations), computed once per (layer, concept, settings) and cached.
- ``Cost``: the forward passes, segmenter calls and images a causal measurement plans, told
  before it starts (each tool has a ``*_cost`` twin that counts from the same schedule).
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, field
from typing import Sequence

import torch

from gandissect_widgets.engine.hooks import (Edit, TraceDict, can_run_from, edit_layers, resolve_layers,
                                             run_from)
from gandissect_widgets.engine.layer_listing import probe_layers
from gandissect_widgets.engine.progress import Steps
from gandissect_widgets.engine.protocols import model_device, sample_latents, segment
from gandissect_widgets.engine.readout import concept_index  # noqa: F401  (re-exported: the causal tools' lookup)
from gandissect_widgets.engine.upsample import pool_mask

__all__ = ["Intervention", "render", "layer_activation", "concept_presence", "concept_index",
           "InsertionValues", "Cost"]


@dataclass(frozen=True)
class Cost:
    """Planned work: ``forward_passes`` of the generator (``from_layer`` of them run only the
    layers after the edited one), ``segmenter_calls``, and ``images`` rendered in all."""

    forward_passes: int = 0
    from_layer: int = 0
    segmenter_calls: int = 0
    images: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __str__(self):
        part = f" ({self.from_layer:,} from the edited layer on)" if self.from_layer else ""
        return (f"{self.forward_passes:,} forward passes{part}, {self.segmenter_calls:,} segmenter calls, "
                f"{self.images:,} images")


@dataclass
class Intervention:
    """Ablate (``mode="ablate"``) or insert (``mode="insert"``) ``units`` of ``layer``.

    units:  unit indices, or a (C,) weight vector in [0,1] (continuous interventions).
    values: insertion constants k: a scalar, one per unit in ``units``, or one per channel.
    region: None (everywhere) or a mask (H,W) / (N,H,W) in [0,1] at image resolution.
    pooling: how the region reaches the layer grid: "max" (every touched cell) or "mean".
    """

    layer: str
    units: object
    mode: str = "ablate"
    values: object = None
    region: object = None
    pooling: str = "max"

    def __post_init__(self):
        if self.mode not in ("ablate", "insert"):
            raise ValueError(f"mode must be 'ablate' or 'insert', got {self.mode!r}")
        if self.mode == "insert" and self.values is None:
            raise ValueError("an insertion needs values (see InsertionValues) ")
        if self.pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {self.pooling!r}")

    def to_edit(self, layer_shape, image_size=None) -> Edit:
        """The Edit at a layer of shape (C,h,w); ``image_size`` (H,W) checks the region's size."""
        mask = None
        if self.region is not None:
            reg = torch.as_tensor(self.region)
            if reg.dim() not in (2, 3):
                raise ValueError(f"region must be (H,W) or (N,H,W), got shape {tuple(reg.shape)}")
            if image_size is not None and tuple(reg.shape[-2:]) != tuple(image_size):
                raise ValueError(f"region has size {tuple(reg.shape[-2:])}, but images are {tuple(image_size)}")
            mask = pool_mask(reg, layer_shape[-2:], self.pooling)
        value = None if self.mode == "ablate" else self.values
        return Edit(self.layer, self.units, value, mask)


def layer_activation(G, z, layer):
    """The output of ``layer`` for latents ``z`` (the rest of the forward is skipped)."""
    with torch.no_grad(), TraceDict(G, [layer], stop_after=layer) as tr:
        G(z)
    return tr[layer].output


def _edits_by_layer(G, interventions, image_size, shapes):
    edits = {}
    for iv in interventions:
        if isinstance(iv, Edit):
            edits.setdefault(iv.layer, []).append(iv)
            continue
        edits.setdefault(iv.layer, []).append(iv.to_edit(shapes[iv.layer], image_size))
    return edits


def render(G, z, interventions: Sequence = (), activation=None, layer=None, image_size=None, grad=False):
    """Images of ``z`` under ``interventions`` (``Intervention`` or ``Edit`` objects).

    When every intervention is at one layer L of a model that ``run_from`` can restart, only the
    layers after L run; pass ``activation`` (L's unedited output for ``z``) and ``layer=L`` to skip
    the layers before L as well.  Otherwise the full forward runs with the edits hooked in.
    ``grad=True`` keeps the autograd graph (for optimising intervention weights).
    """
    interventions = list(interventions)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        if not interventions:
            if activation is not None and layer is not None and can_run_from(G, layer):
                return run_from(G, layer, activation)
            return G(z)
        layers = sorted({iv.layer for iv in interventions})
        resolve_layers(G, layers)
        if len(layers) == 1 and can_run_from(G, layers[0]):
            L = layers[0]
            if activation is None or layer != L:
                activation = layer_activation(G, z, L)
            shapes = {L: tuple(activation.shape[1:])}
            edits = _edits_by_layer(G, interventions, image_size, shapes)[L]
            r = activation
            for e in edits:
                r = e.apply(r)
            return run_from(G, L, r)
        shapes = {}
        if not all(isinstance(iv, Edit) for iv in interventions):  # regions are pooled to the layers' grids
            shapes = probe_layers(G, layers, z).map_shapes(layers, needs="an intervention in a region")
        edits = [e for es in _edits_by_layer(G, interventions, image_size, shapes).values() for e in es]
        with edit_layers(G, edits):
            return G(z)


def concept_presence(S, images, concept: int, soft: bool = False) -> torch.Tensor:
    """(N,) fraction of pixels segmented as ``concept`` (any label channel).

    ``soft=True`` uses ``S.probabilities`` (mean probability of the concept), differentiable.
    """
    if soft:
        probs = getattr(S, "probabilities", None)
        if probs is None:
            raise ValueError(f"{type(S).__name__} has no probabilities(); soft presence (the optimiser) needs a "
                             "segmenter that gives class probabilities")
        return probs(images)[:, concept].mean((1, 2))
    seg = segment(S, images)
    return (seg == concept).any(1).float().mean((1, 2))


@dataclass
class InsertionValues:
    """Per-unit insertion constants, computed once per (generator, segmenter, layer, settings).

    ``mode="mean"`` (default): the mean of each unit's activation where the concept is present,
    at the layer's grid, each cell weighted by the fraction of its pixels segmented as the concept
    (the original aceoptimize's "weighted mean present feature"; upsampling instead would blur it).
    One pass over the samples gives the values of every concept, for every layer asked at once
    (``prepare``): the first insertion of a concept costs nothing after that of another.
    ``mode="quantile"``: the ``q`` quantile of the unit's activations over all positions of the
    samples (raw layer grid; the same for every concept).
    """

    G: object
    S: object
    n_samples: int = 200
    seed: int = 3
    batch_size: int = 32
    mode: str = "mean"
    q: float = 0.99
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mode not in ("mean", "quantile"):
            raise ValueError(f"insertion value mode must be 'mean' or 'quantile', got {self.mode!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")

    def key(self, layer):
        # G and S are fixed for this instance: hashing their weights here would cost every re-render
        return (layer, self.n_samples, self.seed, self.mode, self.q)

    def cached(self, layer: str) -> bool:
        """Whether ``layer``'s values are at hand (a call then returns at once)."""
        return self.key(layer) in self._cache

    def __call__(self, layer: str, concept, progress=False) -> torch.Tensor:
        """(C,) insertion value of every unit of ``layer`` for ``concept``."""
        c = concept_index(self.S.labels, concept)
        self.prepare([layer], progress)
        table = self._cache[self.key(layer)]
        if self.mode == "quantile":
            return table
        if not table["weight"][c] > 0:
            raise ValueError(f"concept {self.S.labels[c]!r} never appears in {self.n_samples} samples (seed "
                             f"{self.seed}); its mean activation is undefined: use mode='quantile' or more samples")
        if c not in table["values"]:  # one tensor per concept, so repeated calls return the same object
            table["values"][c] = table["total"][c] / table["weight"][c]
        return table["values"][c]

    def cost(self, layers) -> Cost:
        """What ``prepare(layers)`` will compute: nothing when they are cached."""
        if all(self.cached(l) for l in layers):
            return Cost()
        n = -(-self.n_samples // self.batch_size)
        return Cost(n, 0, 0 if self.mode == "quantile" else n, self.n_samples)

    def prepare(self, layers, progress=False):
        """Compute the values of every concept for the ``layers`` not cached yet, in one pass.
        ``progress``: see ``engine.progress`` (a callback may cancel; nothing partial is kept)."""
        layers = [l for l in dict.fromkeys(layers) if not self.cached(l)]
        if not layers:
            return
        resolve_layers(self.G, layers)
        for layer, table in self._compute(layers, progress).items():
            self._cache[self.key(layer)] = table

    def _compute(self, layers, progress):
        dev = model_device(self.G)
        z = sample_latents(self.G, self.n_samples, self.seed)
        K = len(self.S.labels)
        acc = {l: [] for l in layers}  # mean: [(K,C) sums, (K,) weights]; quantile: activations
        batches = range(0, self.n_samples, self.batch_size)
        with torch.no_grad(), Steps(progress, len(batches), f"insertion values of {', '.join(layers)}") as steps:
            for i in batches:
                zb = z[i:i + self.batch_size].to(dev)
                with TraceDict(self.G, layers) as tr:
                    x = self.G(zb)
                seg = None if self.mode == "quantile" else segment(self.S, x)
                for l in layers:
                    r = tr[l].output.float()
                    if seg is None:
                        acc[l].append(r.transpose(0, 1).reshape(r.shape[1], -1).cpu())
                        continue
                    part = _presence_weighted_sums(r, seg, K)
                    acc[l] = part if not acc[l] else [a + b for a, b in zip(acc[l], part)]
                steps.update()
        if self.mode == "mean":
            return {l: {"total": acc[l][0].cpu(), "weight": acc[l][1].cpu(), "values": {}} for l in layers}
        out = {}
        for l in layers:
            allv = torch.cat(acc[l], 1)
            out[l] = torch.quantile(allv, self.q, dim=1) if allv.shape[1] <= 16_000_000 else \
                torch.sort(allv, 1).values[:, int(self.q * (allv.shape[1] - 1))]
        return out


def _label_chunks(seg, K, pixels_per_chunk=1 << 24):
    """(first label, one-hot (N,k,H,W) float of labels first..first+k) over all label channels,
    in chunks of labels small enough to keep memory bounded for large label sets."""
    N, _, H, W = seg.shape
    step = max(1, pixels_per_chunk // max(1, N * H * W))
    for k0 in range(0, K, step):
        ks = torch.arange(k0, min(K, k0 + step), device=seg.device)
        yield k0, (seg[:, :, None] == ks[None, None, :, None, None]).any(1).float()


def _presence_weighted_sums(r, seg, K):
    """[(K,C) sums over samples and cells of r * w_k, (K,) sums of w_k], where w_k is the fraction
    of each cell of the layer's grid that the segmentation marks as label k."""
    sums = torch.zeros(K, r.shape[1], dtype=r.dtype, device=r.device)
    weights = torch.zeros(K, dtype=r.dtype, device=r.device)
    for k0, onehot in _label_chunks(seg, K):
        w = torch.nn.functional.adaptive_avg_pool2d(onehot, r.shape[-2:])  # (N,k,h,w)
        sums[k0:k0 + w.shape[1]] = torch.einsum("nchw,nkhw->kc", r, w)
        weights[k0:k0 + w.shape[1]] = w.sum((0, 2, 3))
    return [sums, weights]
