"""The causal commands of the CLI (``gandissect ace|optimize|context|artifacts``): load, run, write."""
from __future__ import annotations

import os

import numpy as np
import torch

from gandissect_widgets.engine.io import atomic_write_json

__all__ = ["cmd_ace", "cmd_optimize", "cmd_context", "cmd_artifacts", "load_reference"]


def _setup(a):
    from gandissect_widgets.cli import _device, _load
    device = _device(a.device)
    G = _load("generator", a.generator, a.checkpoint, device)
    S = _load("segmenter", a.segmenter, a.segmenter_checkpoint, device)
    os.makedirs(a.out, exist_ok=True)
    return G, S, device


def _dissection(a, G, S, device):
    from gandissect_widgets.engine.dissection import dissect
    from gandissect_widgets.engine.results import Dissection
    if a.dissection:
        d = Dissection.load(a.dissection)
        if a.layer not in d.layers:
            raise ValueError(f"{a.dissection} has no layer {a.layer!r}; it has {', '.join(d.layers)}")
        return d
    return dissect(G, S, [a.layer], n_samples=a.dissect_samples, batch_size=max(a.batch_size, 16), device=device,
                   cache_dir=os.path.join(a.out, ".cache"), progress=not a.quiet,
                   generator_name=a.generator, segmenter_name=a.segmenter)


def _write(a, name, doc, figures):
    from gandissect_widgets.report.figures import save_figure
    doc = dict(doc, generator=a.generator, segmenter=a.segmenter)
    atomic_write_json(os.path.join(a.out, f"{name}.json"), doc)
    written = [os.path.join(a.out, f"{name}.json")]
    for fname, fig in figures.items():
        written += save_figure(fig, os.path.join(a.out, fname), formats=("png",))
    print("wrote " + ", ".join(written))


def cmd_ace(a):
    from gandissect_widgets.engine.ace import measure_ace, removal_curve, unit_ace
    from gandissect_widgets.engine.interventions import InsertionValues
    from gandissect_widgets.report.figures import ace_ranking_figure, removal_curve_figure
    G, S, device = _setup(a)
    d = _dissection(a, G, S, device)
    iou_rank = d.ranking(a.layer, a.concept)
    units = a.units if a.units else iou_rank[:a.top].tolist()
    ins = InsertionValues(G, S)
    res = measure_ace(G, S, a.layer, units, a.concept, n_samples=a.samples, seed=a.seed, batch_size=a.batch_size,
                      insertion=ins, progress=not a.quiet)
    doc = {"ace": res.to_json()}
    figures = {}
    rankings = {"IoU": iou_rank}
    if a.unit_samples > 0:
        ua = unit_ace(G, S, a.layer, a.concept, n_samples=a.unit_samples, seed=a.seed + 1,
                      batch_size=a.batch_size, insertion=ins, progress=not a.quiet)
        rankings["ACE"] = np.lexsort((np.arange(len(ua)), -ua))
        doc["unit_ace"] = [float(x) for x in ua]
        doc["ace_ranking"] = [int(u) for u in rankings["ACE"]]
        figures["ace_ranking"] = ace_ranking_figure(ua, res.concept, a.layer)
    curve = removal_curve(G, S, a.layer, a.concept, rankings, ks=a.ks, n_samples=a.samples, seed=a.seed + 2,
                          batch_size=a.batch_size, random_draws=a.random_draws, progress=not a.quiet)
    doc["removal_curve"] = curve
    figures["removal_curve"] = removal_curve_figure(curve)
    _write(a, "ace", doc, figures)
    print(f"ACE of {len(units)} units of {a.layer} on {res.concept}: {res.ace:.4f} "
          f"[{res.ace_ci[0]:.4f}, {res.ace_ci[1]:.4f}]; removal ratio {res.removal_ratio:.3f}")


def cmd_optimize(a):
    from gandissect_widgets.engine.optimize import optimize_intervention
    from gandissect_widgets.report.figures import alpha_figure
    G, S, device = _setup(a)
    d = _dissection(a, G, S, device)
    c = d.concept_index(a.concept)
    col = d.iou(a.layer)[:, c]
    init = col / col.max() if col.max() > 0 else None
    res = optimize_intervention(G, S, a.layer, a.concept, n_train=a.train, n_test=a.test, seed=a.seed,
                                steps=a.steps, batch_size=a.batch_size, lr=a.lr, l2=a.l2, init=init,
                                progress=not a.quiet)
    _write(a, "optimize", res.to_json(), {"alpha": alpha_figure(res.alpha, res.concept, a.layer)})
    print(f"held-out ACE with learned alpha: {res.heldout_ace:.4f} (soft {res.heldout_ace_soft:.4f}); "
          f"top units {res.ranking[:10].tolist()}")


def cmd_context(a):
    from gandissect_widgets.engine.context import contextual_insertion
    from gandissect_widgets.report.figures import context_figure
    G, S, device = _setup(a)
    d = _dissection(a, G, S, device)
    units = d.ranking(a.layer, a.concept)[:a.top]
    res = contextual_insertion(G, S, a.layer, a.concept, units, n_samples=a.samples, seed=a.seed,
                               locations=a.locations or None, batch_size=a.batch_size, strength=a.strength,
                               patch=a.patch, progress=not a.quiet)
    _write(a, "context", res.to_json(), {"context": context_figure(res)})
    for name, n, mean, half in res.table(5):
        print(f"  {name:>12}: {mean:+.4f} ± {half:.4f}  (n={n})")


def load_reference(spec, n, generator_name):
    """Reference images for the Fréchet distance: a folder of images, a .pt tensor, or the world's renders."""
    if spec is None:
        if generator_name != "sceneworld":
            raise ValueError("give --reference (a folder of real images or a .pt tensor (N,3,H,W) in [-1,1]); "
                             "only the sceneworld generator has a default reference (its renders)")
        from gandissect_widgets.world.render import render, to_tensor
        return to_tensor(render(n, seed=12345)[0])
    if os.path.isdir(spec):
        from PIL import Image
        files = sorted(f for f in os.listdir(spec) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))[:n]
        if len(files) < 2:
            raise ValueError(f"{spec} holds {len(files)} images; the reference needs at least 2")
        arr = np.stack([np.asarray(Image.open(os.path.join(spec, f)).convert("RGB")) for f in files])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    t = torch.load(spec, map_location="cpu", weights_only=True)
    if not torch.is_tensor(t) or t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"{spec} must hold a tensor (N,3,H,W) in [-1,1]")
    return t[:n].float()


def cmd_artifacts(a):
    from gandissect_widgets.engine.artifacts import artifact_scores
    from gandissect_widgets.report.figures import artifacts_figure
    G, S, device = _setup(a)
    ref = load_reference(a.reference, a.reference_samples, a.generator).to(device)
    res = artifact_scores(G, S, a.layer, ref, n_samples=a.samples, seed=a.seed, top=a.top_samples, ks=a.ks,
                          n_eval=a.eval_samples, batch_size=a.batch_size, progress=not a.quiet)
    _write(a, "artifacts", res.to_json(), {"artifacts": artifacts_figure(res)})
    rem = res.removal
    print(f"top artifact units of {a.layer}: {res.ranking[:10].tolist()}")
    for k, top, rnd, sd in zip(rem.get("ks", []), rem.get("fd_top", []), rem.get("fd_random", []),
                               rem.get("fd_random_std", [])):
        print(f"  ablate {k:>3}: distance {rem['fd_original']:.4f} -> {top:.4f} (random units: {rnd:.4f} ± {sd:.4f})")
