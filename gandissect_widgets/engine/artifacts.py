"""Artifact units: units whose ablation makes the samples they fire on look more like real data.

As in the paper, a unit is scored on its own top-activating samples: the Fréchet distance of
those samples to a reference set, before and after ablating the unit; the score is the
improvement (before - after).  Then the top-k units are ablated everywhere and the distance of
ordinary samples is reported before and after, beside the same number of random units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from gandissect_widgets.engine.hooks import resolve_layers
from gandissect_widgets.engine.frechet import feature_stats, frechet_distance, segmenter_features
from gandissect_widgets.engine.interventions import Intervention, layer_activation, render
from gandissect_widgets.engine.protocols import model_device, sample_latents

__all__ = ["ArtifactResult", "artifact_scores", "reference_stats"]


@dataclass
class ArtifactResult:
    layer: str
    fd_before: np.ndarray            # (U,) distance of each unit's top samples, unedited
    fd_after: np.ndarray             # (U,) the same samples with the unit ablated
    ranking: np.ndarray              # units by descending improvement
    removal: dict = field(default_factory=dict)  # top-k vs random ablation on ordinary samples
    settings: dict = field(default_factory=dict)

    @property
    def score(self):
        return self.fd_before - self.fd_after

    def to_json(self):
        return {"layer": self.layer, "ranking": [int(u) for u in self.ranking],
                "score": [float(s) for s in self.score], "fd_before": [float(s) for s in self.fd_before],
                "fd_after": [float(s) for s in self.fd_after], "removal": self.removal, "settings": self.settings}


def reference_stats(reference, feature_fn, batch_size: int = 64):
    """(mu, sigma) of the reference: a (N,3,H,W) image tensor in [-1,1], or a (mu, sigma) pair."""
    if isinstance(reference, tuple) and len(reference) == 2:
        return reference
    if not torch.is_tensor(reference) or reference.dim() != 4:
        raise ValueError("reference must be an image tensor (N,3,H,W) in [-1,1] or a (mu, sigma) pair")
    feats = torch.cat([feature_fn(reference[i:i + batch_size]) for i in range(0, len(reference), batch_size)])
    return feature_stats(feats.numpy())


def _features(G, z, feature_fn, dev, batch_size, layer=None, ivs=()):
    out = []
    for i in range(0, len(z), batch_size):
        zb = z[i:i + batch_size].to(dev)
        out.append(feature_fn(render(G, zb, list(ivs))))
    return torch.cat(out).numpy()


def artifact_scores(G, S, layer: str, reference, n_samples: int = 1000, seed: int = 6, top: int = 100,
                    units=None, ks=(5, 10, 20), n_eval: int = 500, random_draws: int = 3, batch_size: int = 32,
                    feature_fn=None, progress: bool = True) -> ArtifactResult:
    """Score units of ``layer`` (all, or ``units``) by the Fréchet-distance improvement on their
    ``top`` samples among ``n_samples``; then ablate the top-k units (k in ``ks``) on ``n_eval``
    fresh samples and compare with k random units."""
    resolve_layers(G, [layer])
    if top < 2 or top > n_samples:
        raise ValueError(f"top must be in 2..n_samples ({n_samples}), got {top}")
    dev = model_device(G)
    feature_fn = feature_fn or segmenter_features(S)
    mu_r, s_r = reference_stats(reference, feature_fn)
    z = sample_latents(G, n_samples, seed)
    maxima, feats = [], []
    for i in tqdm(range(0, n_samples, batch_size), disable=not progress, desc=f"artifacts {layer}: samples"):
        zb = z[i:i + batch_size].to(dev)
        r = layer_activation(G, zb, layer)
        maxima.append(r.amax((2, 3)).cpu())
        feats.append(feature_fn(render(G, zb, [], activation=r, layer=layer)))
    maxima, feats = torch.cat(maxima), torch.cat(feats).numpy()
    U = maxima.shape[1]
    units = np.arange(U) if units is None else np.asarray(units, dtype=np.int64)
    before, after = np.full(U, np.nan), np.full(U, np.nan)
    for u in tqdm(units, disable=not progress, desc=f"artifacts {layer}: units"):
        idx = torch.argsort(maxima[:, u], descending=True, stable=True)[:top]
        before[u] = frechet_distance(*feature_stats(feats[idx.numpy()]), mu_r, s_r)
        f_after = _features(G, z[idx], feature_fn, dev, batch_size, ivs=[Intervention(layer, [int(u)], "ablate")])
        after[u] = frechet_distance(*feature_stats(f_after), mu_r, s_r)
    score = np.where(np.isnan(before), -np.inf, before - after)
    ranking = np.lexsort((np.arange(U), -score))[:len(units)]
    removal = {}
    if n_eval >= 2:
        ze = sample_latents(G, n_samples + n_eval, seed)[n_samples:]
        base = frechet_distance(*feature_stats(_features(G, ze, feature_fn, dev, batch_size)), mu_r, s_r)
        rng = np.random.RandomState(seed)
        removal = {"n_eval": n_eval, "fd_original": base, "ks": [], "fd_top": [], "fd_random": [], "fd_random_std": []}
        for k in ks:
            if not 0 < k <= len(units):
                continue
            top_fd = frechet_distance(*feature_stats(_features(
                G, ze, feature_fn, dev, batch_size, ivs=[Intervention(layer, ranking[:k], "ablate")])), mu_r, s_r)
            rnd = [frechet_distance(*feature_stats(_features(
                G, ze, feature_fn, dev, batch_size, ivs=[Intervention(layer, rng.choice(units, k, replace=False), "ablate")])),
                mu_r, s_r) for _ in range(random_draws)]
            removal["ks"].append(int(k))
            removal["fd_top"].append(top_fd)
            removal["fd_random"].append(float(np.mean(rnd)))
            removal["fd_random_std"].append(float(np.std(rnd)))
    settings = dict(n_samples=n_samples, seed=seed, top=top, n_eval=n_eval, random_draws=random_draws,
                    feature_space=getattr(feature_fn, "__qualname__", "custom"))
    return ArtifactResult(layer, before, after, ranking, removal, settings)
