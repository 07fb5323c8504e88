"""The causal commands of the CLI (``gandissect ace|optimize|context|artifacts``): load, run, write.

Each runs as one rank of a ``torchrun`` job when started by one (``torchrun --nproc-per-node K
--no-python gandissect ace ...``), else as one process: the ranks check that they were given the
same arguments, share the work (the engine's ``ranks``), and only the writing rank shows progress,
writes under ``--out`` and prints the result, which is the one a single process gives.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from gandissect_widgets.engine.io import atomic_write_json
from gandissect_widgets.engine.readout import descending

__all__ = ["cmd_ace", "cmd_optimize", "cmd_context", "cmd_artifacts", "load_reference"]


@contextlib.contextmanager
def _ranks(a):
    """This command's place in a ``torchrun`` job (the one ``gandissect`` started, else one started
    here from torchrun's environment, else one process).  The ranks must agree on the arguments;
    ``--device cuda`` becomes this rank's GPU (cuda:LOCAL_RANK); ranks other than the writer are quiet."""
    from gandissect_widgets import cli
    from gandissect_widgets.engine.distributed import DEFAULT_TIMEOUT, agree, gather_objects, job
    device = cli._device(a.device)
    with job(device, timeout=getattr(a, "rank_timeout", None) or DEFAULT_TIMEOUT) as ranks:
        args = {k: repr(v) for k, v in sorted(vars(a).items())}
        differ = {k for other in gather_objects(args, ranks) for k in set(args) | set(other)
                  if other.get(k) != args.get(k)}  # the same set on every rank: the message names just these
        agree({k: args.get(k) for k in sorted(differ)}, ranks, f"the arguments of `{cli.PROG} {a.command}`")
        a.device = str(ranks.device(device))
        a.quiet = a.quiet or not ranks.writer
        yield ranks


def _setup(a, concept=True, dissects=True):
    """Check the common arguments, load the models and a given --dissection, probe the layer: all
    before any computation.  Returns (G, S, device, dissection or None, probe)."""
    from gandissect_widgets import cli
    device = cli._device(a.device)
    cli._check_out_dir(a.out)
    cli._int("--batch-size", a.batch_size, 1)
    cli._seed(a.seed)
    d = _load_dissection(a) if dissects and a.dissection is not None else None
    if dissects and d is None:
        cli._int("--dissect-samples", a.dissect_samples, 1)
    G, S = cli._load_models(a, device)
    probe = cli._probe(G, S, [a.layer], device)
    if concept:
        cli._check_concept(a.concept, probe["labels"], a.segmenter)
    if d is not None:
        if list(d.labels) != probe["labels"]:
            raise cli.UserError(f"--dissection {a.dissection} was made with segmenter "
                                f"{d.settings.get('segmenter', '?')!r}, whose labels differ from segmenter "
                                f"{a.segmenter!r}'s; give --segmenter {d.settings.get('segmenter', 'NAME')}")
        shape = tuple(int(x) for x in d.array(a.layer, "shape"))
        if shape != probe["layers"][a.layer]:
            raise cli.UserError(f"--dissection {a.dissection} has layer {a.layer!r} of shape {shape}, but generator "
                                f"{a.generator!r} gives {probe['layers'][a.layer]}; give the generator it was made "
                                f"with ({d.settings.get('generator', '?')!r})")
    elif dissects:
        cli._check_samples("--dissect-samples", a.dissect_samples, probe, disk_dir=os.path.join(a.out, ".cache"))
        cli._run_state["cache"] = os.path.join(a.out, ".cache")
    return G, S, device, d, probe


def _load_dissection(a):
    from gandissect_widgets.cli import UserError, check_result_dir
    from gandissect_widgets.engine.results import Dissection
    d = Dissection.load(check_result_dir(a.dissection, "--dissection", optional=True))
    if a.layer not in d.layers:
        raise UserError(f"--dissection {a.dissection} has no layer {a.layer!r}; it has {', '.join(d.layers)}: "
                        f"give one of those, or dissect {a.layer!r} first")
    return d


def _dissection(a, G, S, device, d):
    from gandissect_widgets.engine.dissection import dissect
    if d is not None:
        return d
    return dissect(G, S, [a.layer], n_samples=a.dissect_samples, batch_size=max(a.batch_size, 16), device=device,
                   cache_dir=os.path.join(a.out, ".cache"), progress=not a.quiet,
                   generator_name=a.generator, segmenter_name=a.segmenter)


def _write(a, name, doc, figures, ranks):
    """Figures first, then NAME.json (the result), each atomically; on the writing rank alone.
    ``figures``: {file name: a function that draws it}."""
    from gandissect_widgets.report.figures import save_figure
    if not ranks.writer:
        return
    figures = {fname: draw() for fname, draw in figures.items()}
    doc = dict(doc, generator=a.generator, segmenter=a.segmenter)
    written = []
    for fname, fig in figures.items():
        written += save_figure(fig, os.path.join(a.out, fname), formats=("png",))
    atomic_write_json(os.path.join(a.out, f"{name}.json"), doc)
    written.insert(0, os.path.join(a.out, f"{name}.json"))
    print("wrote " + ", ".join(written))


def _units(flag, units, n):
    from gandissect_widgets.cli import UserError
    bad = [u for u in units if not 0 <= u < n]
    if bad:
        raise UserError(f"{flag} {' '.join(map(str, bad))}: out of range; the layer has {n} units, 0 to {n - 1}")
    if len(set(units)) != len(units):
        raise UserError(f"{flag} repeats a unit: {' '.join(map(str, units))}; name each unit once")
    return list(units)


def _ks(flag, ks, n):
    from gandissect_widgets.cli import UserError
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise UserError(f"{flag} {' '.join(map(str, bad))}: each count must be between 1 and {n} (the layer's units)")
    return list(ks)


def cmd_ace(a):
    with _ranks(a) as ranks:
        _ace(a, ranks)


def _ace(a, ranks):
    from gandissect_widgets import cli
    import sys

    from gandissect_widgets.engine.ace import (measure_ace, measure_ace_cost, removal_curve, removal_curve_cost,
                                               unit_ace, unit_ace_cost)
    from gandissect_widgets.engine.interventions import InsertionValues
    from gandissect_widgets.report.figures import ace_ranking_figure, removal_curve_figure
    if a.units is not None and a.top is not None:
        raise cli.UserError("--units and --top both choose the unit set: pick one (--units U ... for your own "
                            "units, --top N for the top N units by IoU)")
    cli._int("--samples", a.samples, 1)
    cli._int("--unit-samples", a.unit_samples, 0)
    cli._int("--random-draws", a.random_draws, 0)
    if a.top is not None:
        cli._int("--top", a.top, 1)
    G, S, device, d, probe = _setup(a)
    n_units = probe["layers"][a.layer][0]
    for flag, n in (("--samples", a.samples), ("--unit-samples", a.unit_samples)):
        cli._check_samples(flag, n, probe, lo=0)
    if a.units is not None:
        _units("--units", a.units, n_units)
    if a.top is not None and a.top > n_units:
        raise cli.UserError(f"--top {a.top}: layer {a.layer!r} has {n_units} units; give --top 1 to {n_units}")
    ks = _ks("--ks", a.ks, n_units) if a.ks is not None else [k for k in (1, 2, 5, 10, 20, 50) if k <= n_units]
    with cli.tidy_on_failure(a.out, cli._run_state.get("cache")):
        d = _dissection(a, G, S, device, d)
    iou_rank = d.ranking(a.layer, a.concept)
    units = a.units if a.units else iou_rank[:a.top or 20].tolist()
    ins = InsertionValues(G, S)
    if not a.quiet:  # what it will cost, before the wait
        plan = ins.cost([a.layer]) + measure_ace_cost(G, a.layer, a.samples, a.batch_size) + removal_curve_cost(
            G, a.layer, dict.fromkeys(["IoU", "ACE"][:1 + (a.unit_samples > 0)], iou_rank), ks, a.samples,
            a.batch_size, a.random_draws)
        if a.unit_samples > 0:
            plan = plan + unit_ace_cost(G, a.layer, a.unit_samples, a.batch_size)
        print(f"gandissect ace: planned {plan}", file=sys.stderr, flush=True)
    res = measure_ace(G, S, a.layer, units, a.concept, n_samples=a.samples, seed=a.seed, batch_size=a.batch_size,
                      insertion=ins, progress=not a.quiet, ranks=ranks)
    doc = {"ace": res.to_json()}
    figures = {}
    rankings = {"IoU": iou_rank}
    if a.unit_samples > 0:
        ua = unit_ace(G, S, a.layer, a.concept, n_samples=a.unit_samples, seed=a.seed + 1,
                      batch_size=a.batch_size, insertion=ins, progress=not a.quiet, ranks=ranks)
        rankings["ACE"] = descending(ua)
        doc["unit_ace"] = [float(x) for x in ua]
        doc["ace_ranking"] = [int(u) for u in rankings["ACE"]]
        figures["ace_ranking"] = lambda: ace_ranking_figure(ua, res.concept, a.layer)
    curve = removal_curve(G, S, a.layer, a.concept, rankings, ks=ks, n_samples=a.samples, seed=a.seed + 2,
                          batch_size=a.batch_size, random_draws=a.random_draws, progress=not a.quiet,
                          ranks=ranks)
    doc["removal_curve"] = curve
    figures["removal_curve"] = lambda: removal_curve_figure(curve)
    _write(a, "ace", doc, figures, ranks)
    if ranks.writer:
        print(f"ACE of {len(units)} units of {a.layer} on {res.concept}: {res.ace:.4f} "
              f"[{res.ace_ci[0]:.4f}, {res.ace_ci[1]:.4f}]; removal ratio {res.removal_ratio:.3f}")


def cmd_optimize(a):
    with _ranks(a) as ranks:
        _optimize(a, ranks)


def _optimize(a, ranks):
    from gandissect_widgets import cli
    from gandissect_widgets.engine.optimize import optimize_intervention
    from gandissect_widgets.report.figures import alpha_figure
    cli._int("--train", a.train, 1)
    cli._int("--test", a.test, 1)
    cli._int("--steps", a.steps, 1)
    cli._number("--lr", a.lr, 0, lo_open=True)
    cli._number("--l2", a.l2, 0)
    G, S, device, d, probe = _setup(a)
    if not callable(getattr(S, "probabilities", None)):
        raise cli.UserError(f"optimize needs class probabilities, and segmenter {a.segmenter!r} has no "
                            "probabilities(); use a segmenter that gives them (sceneworld, planted, upernet, ...)")
    for flag, n in (("--train", a.train), ("--test", a.test)):
        cli._check_samples(flag, n, probe)
    with cli.tidy_on_failure(a.out, cli._run_state.get("cache")):
        d = _dissection(a, G, S, device, d)
    c = d.concept_index(a.concept)
    col = d.iou(a.layer)[:, c]
    init = col / col.max() if col.max() > 0 else None
    res = optimize_intervention(G, S, a.layer, a.concept, n_train=a.train, n_test=a.test, seed=a.seed,
                                steps=a.steps, batch_size=a.batch_size, lr=a.lr, l2=a.l2, init=init,
                                progress=not a.quiet, ranks=ranks)
    _write(a, "optimize", res.to_json(), {"alpha": lambda: alpha_figure(res.alpha, res.concept, a.layer)}, ranks)
    if ranks.writer:
        print(f"held-out ACE with learned alpha: {res.heldout_ace:.4f} (soft {res.heldout_ace_soft:.4f}); "
              f"top units {res.ranking[:10].tolist()}")


def cmd_context(a):
    with _ranks(a) as ranks:
        _context(a, ranks)


def _context(a, ranks):
    from gandissect_widgets import cli
    from gandissect_widgets.engine.context import contextual_insertion
    from gandissect_widgets.engine.hooks import can_run_from
    from gandissect_widgets.report.figures import context_figure
    if a.top is not None:
        cli._int("--top", a.top, 1)
    cli._int("--samples", a.samples, 1)
    cli._int("--locations", a.locations, 0)
    cli._int("--patch", a.patch, 1)
    cli._number("--strength", a.strength, 0, lo_open=True)
    G, S, device, d, probe = _setup(a)
    C, h, w = probe["layers"][a.layer]
    if a.top is not None and a.top > C:
        raise cli.UserError(f"--top {a.top}: layer {a.layer!r} has {C} units; give --top 1 to {C}")
    top = a.top if a.top is not None else min(20, C)
    if a.patch > min(h, w):
        raise cli.UserError(f"--patch {a.patch}: layer {a.layer!r} is {h}x{w} cells; give --patch 1 to {min(h, w)}")
    if not can_run_from(G, a.layer):
        raise cli.UserError(f"context re-renders from layer {a.layer!r} for every cell, and {type(G).__name__} cannot "
                            "run from a layer (it needs to be an nn.Sequential or have forward_from)")
    cli._check_samples("--samples", a.samples, probe)
    with cli.tidy_on_failure(a.out, cli._run_state.get("cache")):
        d = _dissection(a, G, S, device, d)
    units = d.ranking(a.layer, a.concept)[:top]
    res = contextual_insertion(G, S, a.layer, a.concept, units, n_samples=a.samples, seed=a.seed,
                               locations=a.locations or None, batch_size=a.batch_size, strength=a.strength,
                               patch=a.patch, progress=not a.quiet, ranks=ranks)
    _write(a, "context", res.to_json(), {"context": lambda: context_figure(res)}, ranks)
    for name, n, mean, half in res.table(5) if ranks.writer else ():
        print(f"  {name:>12}: {mean:+.4f} ± {half:.4f}  (n={n})")


def load_reference(spec, n, generator_name):
    """Reference images for the Fréchet distance: a folder of images, a .pt tensor, or the world's renders."""
    if spec is None:
        if generator_name not in ("sceneworld", "sceneworld-artifacts"):
            raise ValueError("give --reference (a folder of real images or a .pt tensor (N,3,H,W) in [-1,1]); "
                             "only the sceneworld generators have a default reference (its renders)")
        from gandissect_widgets.world.render import render, to_tensor
        return to_tensor(render(n, seed=12345)[0])
    if os.path.isdir(spec):
        from PIL import Image
        files = sorted(f for f in os.listdir(spec) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))[:n]
        if len(files) < 2:
            raise ValueError(f"{spec} holds {len(files)} images; the reference needs at least 2")
        arr = np.stack([np.asarray(Image.open(os.path.join(spec, f)).convert("RGB")) for f in files])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    from gandissect_widgets.checkpoint import torch_load
    t = torch_load(spec, what="reference tensor")
    if not torch.is_tensor(t) or t.dim() != 4 or t.shape[1] != 3:
        found = f"a tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else f"a {type(t).__name__}"
        raise ValueError(f"{spec} must hold a tensor (N,3,H,W) in [-1,1], found {found}")
    if t.shape[0] < 2:
        raise ValueError(f"{spec} holds {t.shape[0]} image(s); the reference needs at least 2")
    return t[:n].float()


def cmd_artifacts(a):
    with _ranks(a) as ranks:
        _artifacts(a, ranks)


def _artifacts(a, ranks):
    from gandissect_widgets import cli
    from gandissect_widgets.engine.artifacts import artifact_scores
    from gandissect_widgets.report.figures import artifacts_figure
    cli._int("--samples", a.samples, 2)
    top = cli._int("--top-samples", a.top_samples, 2, a.samples) if a.top_samples is not None else min(100, a.samples)
    cli._int("--eval-samples", a.eval_samples, 2)
    cli._int("--reference-samples", a.reference_samples, 2)
    if a.reference is not None and not os.path.exists(a.reference):
        raise cli.UserError(f"--reference {a.reference} does not exist; give a folder of real images or a .pt "
                            "tensor (N,3,H,W) in [-1,1]")
    if a.inception_weights is not None and a.features != "inception":
        raise cli.UserError("--inception-weights goes with --features inception (the default feature space is the "
                            "segmenter's); add --features inception, or leave --inception-weights out")
    device = cli._device(a.device)
    cli._check_out_dir(a.out)
    feature_fn = None
    if a.features == "inception":
        from gandissect_widgets.engine.frechet import inception_features
        feature_fn = inception_features(a.inception_weights, device=device)
    ref = load_reference(a.reference, a.reference_samples, a.generator)  # before any model is loaded
    G, S, device, _, probe = _setup(a, concept=False, dissects=False)
    if feature_fn is None and not any(callable(getattr(S, f, None)) for f in ("features", "probabilities")):
        raise cli.UserError(f"artifacts measures Fréchet distances in the segmenter's feature space, and segmenter "
                            f"{a.segmenter!r} has neither features() nor probabilities(); give a segmenter that has "
                            f"one of them (sceneworld, planted, upernet, ...)")
    _ks("--ks", a.ks, probe["layers"][a.layer][0])
    for flag, n in (("--samples", a.samples), ("--eval-samples", a.eval_samples)):
        cli._check_samples(flag, n, probe)
    base_name = a.baseline or ("sceneworld" if a.generator == "sceneworld-artifacts" else "none")
    baseline = None if base_name == "none" else cli._load("generator", base_name, None, device).to(device).eval()
    ref = ref.to(device)
    res = artifact_scores(G, S, a.layer, ref, n_samples=a.samples, seed=a.seed, top=top, ks=a.ks,
                          n_eval=a.eval_samples, batch_size=a.batch_size, progress=not a.quiet,
                          feature_fn=feature_fn, baseline=baseline, ranks=ranks)
    doc = dict(res.to_json(), baseline=None if baseline is None else base_name)
    _write(a, "artifacts", doc, {"artifacts": lambda: artifacts_figure(res)}, ranks)
    if ranks.writer:
        print("\n".join(res.summary()))
