"""Artifact units: units whose ablation makes the samples they fire on look more like real data.

As in the paper, a unit is scored on its own top-activating samples: the Fréchet distance of
those samples to a reference set, before and after ablating the unit; the score is the
improvement (before - after).  Then the top-k units are ablated everywhere and the distance of
ordinary samples is reported before and after, beside the same number of random units (and,
when given, beside a baseline generator: e.g. the clean GAN an artifact variant came from).

Every distance and improvement carries a bootstrap interval over the generated samples (the
reference held fixed; resamples drawn as ``engine.ace.bootstrap_ci`` draws them, basic intervals,
see ``bootstrap_interval``); the quantities compared are resampled together (paired), so "helps"
and "does not help" can be told apart.

In a ``torch.distributed`` job (``ranks``) the sample batches, the units and the removal
measurements (one a distance: unedited, baseline, top-k, each random draw) are shared round robin
(``engine.ace.shared_map``) and gathered in order; the random unit sets are drawn alike on every
rank; every rank returns what one process returns, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gandissect_widgets.engine.ace import _my_steps, _progress, resolve_ranks, shared_map
from gandissect_widgets.engine.distributed import Ranks
from gandissect_widgets.engine.frechet import (bootstrap_indices, feature_stats, frechet_distance,
                                               frechet_resampled, segmenter_features, sqrtm_psd)
from gandissect_widgets.engine.hooks import resolve_layers
from gandissect_widgets.engine.interventions import Intervention, layer_activation, render
from gandissect_widgets.engine.progress import Steps
from gandissect_widgets.engine.protocols import model_device, sample_latents

__all__ = ["ArtifactResult", "artifact_scores", "reference_stats", "bootstrap_interval"]


def bootstrap_interval(point, values, level: float = 0.95):
    """(low, high) basic bootstrap interval: the percentile interval of ``2 * point - values``.

    A resample repeats samples, so the Fréchet distance of a resample lies above the distance of
    the set (the estimate's small-sample bias, large on a hundred samples); reflecting the bootstrap
    values about the point corrects that shift, where a percentile interval (``ace.bootstrap_ci``,
    right for means) would sit above the point.  ``point`` broadcasts against ``values`` (pooled
    draws: one point per row); NaNs are left out."""
    a = (1 - level) / 2
    v = (2 * np.asarray(point, dtype=np.float64) - np.asarray(values, dtype=np.float64)).ravel()
    if v.size == 0 or np.isnan(v).all():
        return (float("nan"), float("nan"))
    return float(np.nanquantile(v, a)), float(np.nanquantile(v, 1 - a))


@dataclass
class ArtifactResult:
    layer: str
    fd_before: np.ndarray            # (U,) distance of each unit's top samples, unedited
    fd_after: np.ndarray             # (U,) the same samples with the unit ablated
    ranking: np.ndarray              # units by descending improvement
    removal: dict = field(default_factory=dict)  # top-k vs random ablation on ordinary samples, with intervals
    settings: dict = field(default_factory=dict)
    score_ci: np.ndarray | None = None  # (U, 2) bootstrap interval of each unit's score (NaN: not scored)

    @property
    def score(self):
        return self.fd_before - self.fd_after

    def to_json(self):
        ci = None if self.score_ci is None else [[float(a), float(b)] for a, b in self.score_ci]
        return {"layer": self.layer, "ranking": [int(u) for u in self.ranking],
                "score": [float(s) for s in self.score], "score_ci": ci,
                "fd_before": [float(s) for s in self.fd_before],
                "fd_after": [float(s) for s in self.fd_after], "removal": self.removal, "settings": self.settings}

    def summary(self, n_units: int = 10) -> list[str]:
        """The result in a few lines of text (what ``gandissect artifacts`` prints)."""
        level = self.settings.get("level", 0.95)
        top = [int(u) for u in self.ranking[:n_units]]
        lines = [f"top artifact units of {self.layer}: {top}"]
        if self.score_ci is not None and top:
            lines.append("  scores (" + f"{level:.0%} intervals): " + ", ".join(
                f"{u}: {self.score[u]:.4f} [{self.score_ci[u][0]:.4f}, {self.score_ci[u][1]:.4f}]" for u in top[:5]))
        rem = self.removal
        if not rem:
            return lines
        iv = (lambda ci: f"[{ci[0]:.4f}, {ci[1]:.4f}]")
        head = f"distance of {rem['n_eval']} samples: {rem['fd_original']:.4f} {iv(rem['fd_original_ci'])}"
        if "fd_baseline" in rem:
            head += f"; baseline generator: {rem['fd_baseline']:.4f} {iv(rem['fd_baseline_ci'])}"
        lines.append(head)

        def verdict(ci):
            return "helps" if ci[0] > 0 else ("makes it worse" if ci[1] < 0 else "does not help")
        for j, k in enumerate(rem.get("ks", [])):
            gain, rgain = rem["gain_top_ci"][j], rem["gain_random_ci"][j]
            line = (f"  ablate {k:>3} top units:    {rem['fd_top'][j]:.4f} {iv(rem['fd_top_ci'][j])}, "
                    f"improvement {iv(gain)}: {verdict(gain)}")
            if "fd_baseline" in rem:
                d = rem["top_vs_baseline_ci"][j]
                line += "; vs baseline " + iv(d) + (": restored" if d[0] <= 0 <= d[1] else "")
            lines.append(line)
            lines.append(f"  ablate {k:>3} random units: {rem['fd_random'][j]:.4f} {iv(rem['fd_random_ci'][j])} "
                         f"({len(rem['fd_random_draws'][j])} draws), improvement {iv(rgain)}: {verdict(rgain)}")
        return lines


def reference_stats(reference, feature_fn, batch_size: int = 64):
    """(mu, sigma) of the reference: a (N,3,H,W) image tensor in [-1,1], or a (mu, sigma) pair."""
    if isinstance(reference, tuple) and len(reference) == 2:
        return reference
    if not torch.is_tensor(reference) or reference.dim() != 4:
        raise ValueError("reference must be an image tensor (N,3,H,W) in [-1,1] or a (mu, sigma) pair")
    feats = torch.cat([feature_fn(reference[i:i + batch_size]) for i in range(0, len(reference), batch_size)])
    return feature_stats(feats.numpy())


def _features(G, z, feature_fn, dev, batch_size, ivs=()):
    out = []
    for i in range(0, len(z), batch_size):
        zb = z[i:i + batch_size].to(dev)
        out.append(feature_fn(render(G, zb, list(ivs))))
    return torch.cat(out).numpy()


def artifact_scores(G, S, layer: str, reference, n_samples: int = 1000, seed: int = 6, top: int = 100,
                    units=None, ks=(5, 10, 20), n_eval: int = 500, random_draws: int = 3, batch_size: int = 32,
                    feature_fn=None, progress: bool = True, baseline=None, bootstrap: int = 1000,
                    unit_bootstrap: int = 200, level: float = 0.95, ranks: Ranks | None = None) -> ArtifactResult:
    """Score units of ``layer`` (all, or ``units``) by the Fréchet-distance improvement on their
    ``top`` samples among ``n_samples``; then ablate the top-k units (k in ``ks``) on ``n_eval``
    fresh samples and compare with ``random_draws`` sets of k random units, and with ``baseline``
    (a generator of the same latent space, unedited) when given.

    ``bootstrap``: resamples for the intervals of the removal figures; ``unit_bootstrap``: for each
    unit's score (0: no unit intervals); ``level``: their coverage.  ``ranks``: a job to share the
    work with (default: the one initialised, else one process), see the module doc."""
    ranks = resolve_ranks(ranks)
    resolve_layers(G, [layer])
    if top < 2 or top > n_samples:
        raise ValueError(f"top must be in 2..n_samples ({n_samples}), got {top}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}")
    if bootstrap < 0 or unit_bootstrap < 0:
        raise ValueError(f"bootstrap rounds must be >= 0, got bootstrap={bootstrap}, unit_bootstrap={unit_bootstrap}")
    dev = model_device(G)
    feature_fn = feature_fn or segmenter_features(S)
    mu_r, s_r = reference_stats(reference, feature_fn)
    ref_sqrt = sqrtm_psd(np.atleast_2d(s_r))
    z = sample_latents(G, n_samples, seed)
    progress = _progress(progress, ranks)

    def sample_batch(i):  # each unit's maximum and the features, of one batch of samples
        zb = z[i:i + batch_size].to(dev)
        r = layer_activation(G, zb, layer)
        out = r.amax((2, 3)).cpu(), feature_fn(render(G, zb, [], activation=r, layer=layer))
        steps.update()
        return out
    starts = range(0, n_samples, batch_size)
    with Steps(progress, _my_steps(starts, ranks), f"artifacts {layer}: samples") as steps:
        parts = shared_map(sample_batch, starts, ranks)
    maxima, feats = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).numpy()
    U = maxima.shape[1]
    units = np.arange(U) if units is None else np.asarray(units, dtype=np.int64)
    unit_idx = bootstrap_indices(top, unit_bootstrap, seed + 1)

    def unit_score(u):  # (distance before, after, the score's interval) of unit u on its top samples
        idx = torch.argsort(maxima[:, u], descending=True, stable=True)[:top].numpy()
        f_before = feats[idx]
        f_after = _features(G, z[idx], feature_fn, dev, batch_size, ivs=[Intervention(layer, [int(u)], "ablate")])
        b = frechet_distance(*feature_stats(f_before), mu_r, s_r)
        a = frechet_distance(*feature_stats(f_after), mu_r, s_r)
        ci = (np.nan, np.nan)
        if unit_bootstrap:
            ci = bootstrap_interval(
                b - a, frechet_resampled(f_before, mu_r, s_r, unit_idx, ref_sqrt=ref_sqrt)
                - frechet_resampled(f_after, mu_r, s_r, unit_idx, ref_sqrt=ref_sqrt), level)
        steps.update()
        return b, a, ci
    before, after = np.full(U, np.nan), np.full(U, np.nan)
    score_ci = np.full((U, 2), np.nan) if unit_bootstrap else None
    with Steps(progress, _my_steps(units, ranks), f"artifacts {layer}: units") as steps:
        for u, (b, a, ci) in zip(units, shared_map(unit_score, units, ranks)):
            before[u], after[u] = b, a
            if unit_bootstrap:
                score_ci[u] = ci
    score = np.where(np.isnan(before), -np.inf, before - after)
    ranking = np.lexsort((np.arange(U), -score))[:len(units)]
    removal = {}
    if n_eval >= 2:
        removal = _removal(G, layer, units, ranking, ks, feature_fn, (mu_r, s_r, ref_sqrt), seed, n_samples, n_eval,
                           random_draws, batch_size, baseline, bootstrap, level, dev, ranks, progress)
    settings = dict(n_samples=n_samples, seed=seed, top=top, n_eval=n_eval, random_draws=random_draws,
                    bootstrap=bootstrap, unit_bootstrap=unit_bootstrap, level=level,
                    feature_space=getattr(feature_fn, "__qualname__", "custom"))
    return ArtifactResult(layer, before, after, ranking, removal, settings, score_ci)


def _removal(G, layer, units, ranking, ks, feature_fn, ref, seed, n_samples, n_eval, random_draws, batch_size,
             baseline, bootstrap, level, dev, ranks=None, progress=False):
    """Top-k vs random-k ablation on fresh samples: distances with intervals, paired by resample.
    Every distance is one measurement; the random sets are drawn first (as one process draws them),
    then the measurements are shared."""
    ranks = resolve_ranks(ranks)
    mu_r, s_r, ref_sqrt = ref
    ze = sample_latents(G, n_samples + n_eval, seed)[n_samples:]
    idx = bootstrap_indices(n_eval, bootstrap, seed)
    rng = np.random.RandomState(seed)
    ks = [int(k) for k in ks if 0 < k <= len(units)]
    jobs = [(G, ())] + ([(baseline, ())] if baseline is not None else [])  # (model, interventions)
    for k in ks:
        jobs.append((G, [Intervention(layer, ranking[:k], "ablate")]))
        jobs += [(G, [Intervention(layer, rng.choice(units, k, replace=False), "ablate")]) for _ in range(random_draws)]

    def measure(j):
        model, ivs = jobs[j]
        f = _features(model, ze, feature_fn, dev, batch_size, ivs=ivs)
        point = frechet_distance(*feature_stats(f), mu_r, s_r)
        out = point, frechet_resampled(f, mu_r, s_r, idx, ref_sqrt=ref_sqrt) if bootstrap else np.full(1, np.nan)
        steps.update()
        return out
    with Steps(progress, _my_steps(jobs, ranks), f"artifacts {layer}: removal") as steps:
        measured = iter(shared_map(measure, range(len(jobs)), ranks))

    def ci(point, v):
        return list(bootstrap_interval(point, v, level))
    base, base_b = next(measured)
    rem = {"n_eval": n_eval, "fd_original": base, "fd_original_ci": ci(base, base_b), "ks": [], "fd_top": [],
           "fd_top_ci": [], "gain_top_ci": [], "fd_random": [], "fd_random_std": [], "fd_random_draws": [],
           "fd_random_ci": [], "gain_random_ci": []}
    if baseline is not None:
        clean, clean_b = next(measured)
        rem.update(fd_baseline=clean, fd_baseline_ci=ci(clean, clean_b), top_vs_baseline_ci=[], random_vs_baseline_ci=[])
    for k in ks:
        top_fd, top_b = next(measured)
        draws = [next(measured) for _ in range(random_draws)]
        rnd = np.array([d[0] for d in draws]) if draws else np.full(1, np.nan)
        rnd_b = np.stack([d[1] for d in draws]) if draws else np.full((1, 1), np.nan)
        rp = rnd[:, None]                               # pooled intervals: each draw reflected about its own point
        rem["ks"].append(int(k))
        rem["fd_top"].append(top_fd)
        rem["fd_top_ci"].append(ci(top_fd, top_b))
        rem["gain_top_ci"].append(ci(base - top_fd, base_b - top_b))
        rem["fd_random"].append(float(np.mean(rnd)))
        rem["fd_random_std"].append(float(np.std(rnd)))
        rem["fd_random_draws"].append([float(x) for x in rnd] if draws else [])
        rem["fd_random_ci"].append(ci(rp, rnd_b))       # pooled over draws: which units, and which samples
        rem["gain_random_ci"].append(ci(base - rp, base_b[None] - rnd_b))
        if baseline is not None:
            rem["top_vs_baseline_ci"].append(ci(top_fd - clean, top_b - clean_b))
            rem["random_vs_baseline_ci"].append(ci(rp - clean, rnd_b - clean_b[None]))
    return rem
