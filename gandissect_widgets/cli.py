"""The command line: ``gandissect dissect ...``, ``gandissect layers ...``, ``gandissect models``."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

__all__ = ["main", "build_parser"]


def _add_model_args(p, with_segmenter=True):
    p.add_argument("--generator", default="sceneworld", help="registered generator name (default: sceneworld)")
    p.add_argument("--checkpoint", default=None, help="local weights file for the generator family")
    if with_segmenter:
        p.add_argument("--segmenter", default="sceneworld", help="registered segmenter name (default: sceneworld)")
        p.add_argument("--segmenter-checkpoint", default=None, help="local weights for the segmenter family")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gandissect", description="GAN Dissection from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dissect", help="dissect layers of a generator against a segmenter")
    _add_model_args(p)
    p.add_argument("--layers", nargs="+", required=True, help="layer paths (see `gandissect layers`)")
    p.add_argument("--samples", type=int, default=1000, help="number of generated samples (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="latent seed (default 1)")
    p.add_argument("--quantile", type=float, default=0.99, help="threshold quantile (default 0.99: top 1%%)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lanes", type=int, default=2,
                   help="on a CPU, batches run through the models at once, one per thread (default 2; 1 uses the least memory)")
    p.add_argument("--topk", type=int, default=20, help="top-activating samples kept per unit")
    p.add_argument("--min-iou", type=float, default=0.04, help="IoU above which a unit is interpretable")
    p.add_argument("--out", required=True, help="output directory (dissect.json, arrays.npz)")
    p.add_argument("--cache-dir", default=None,
                   help="cache/resume directory (default: OUT/.cache; 'none' to disable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("layers", help="list a generator's layers with their output shapes")
    _add_model_args(p, with_segmenter=False)
    p.add_argument("--all", action="store_true", help="also list nested modules")

    sub.add_parser("models", help="list registered generators and segmenters")

    def causal(name, help_):
        p = sub.add_parser(name, help=help_)
        _add_model_args(p)
        p.add_argument("--layer", required=True, help="the layer to intervene at")
        p.add_argument("--out", required=True, help="output directory (JSON and PNG figures)")
        p.add_argument("--dissection", default=None,
                       help="a directory written by `gandissect dissect` (else the layer is dissected here)")
        p.add_argument("--dissect-samples", type=int, default=500, help="samples if dissecting here (default 500)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--quiet", action="store_true")
        return p

    p = causal("ace", "average causal effect of a unit set, single-unit ACE ranking, removal curve")
    p.add_argument("--concept", required=True)
    p.add_argument("--units", type=int, nargs="+", default=None, help="unit set (default: top --top units by IoU)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--unit-samples", type=int, default=32, help="samples per unit for the ACE ranking (0: skip)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--random-draws", type=int, default=5)

    p = causal("optimize", "learn a continuous intervention vector for a concept")
    p.add_argument("--concept", required=True)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--l2", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=10)

    p = causal("context", "insert a concept's top units one cell at a time, tabulated by what is there")
    p.add_argument("--concept", required=True)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--locations", type=int, default=8, help="places per sample (0: every place)")
    p.add_argument("--patch", type=int, default=1, help="side of the inserted square, in layer cells")
    p.add_argument("--strength", type=float, default=1.0, help="multiple of the units' insertion values")
    p.add_argument("--seed", type=int, default=5)

    p = causal("artifacts", "rank units by how much ablating them improves sample quality")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--top-samples", type=int, default=100, help="top-activating samples per unit")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--reference", default=None,
                   help="real images: a folder of images or a .pt tensor (N,3,H,W) in [-1,1]; "
                        "default for sceneworld: its renders")
    p.add_argument("--reference-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=6)

    from gandissect_widgets.report.html import add_parser as add_report_parser
    add_report_parser(sub)
    return parser


def _device(name):
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load(kind, name, checkpoint, device):
    from gandissect_widgets import registry
    opts = {"device": device}
    if checkpoint:
        opts["checkpoint"] = checkpoint
    load = registry.load_generator if kind == "generator" else registry.load_segmenter
    return load(name, **opts)


def layer_table(G, include_nested=False):
    """[(path, output shape)] of the modules that run in a forward of one sample."""
    from gandissect_widgets.engine.hooks import TraceDict, layer_names
    names = layer_names(G)
    if not include_nested:
        names = [n for n in names if "." not in n]
    shapes = {}

    def record(out, name):
        shapes[name] = tuple(out.shape[1:]) if torch.is_tensor(out) else type(out).__name__
        return out

    dev = next((p.device for p in G.parameters()), torch.device("cpu"))
    with torch.no_grad(), TraceDict(G, names, retain_output=False, edit_output=record):
        G(G.sample_z(1, 0).to(dev))
    return [(n, shapes[n]) for n in names if n in shapes]


def cmd_dissect(a):
    from gandissect_widgets.engine.dissection import dissect
    device = _device(a.device)
    G = _load("generator", a.generator, a.checkpoint, device)
    S = _load("segmenter", a.segmenter, a.segmenter_checkpoint, device)
    cache = None if (a.cache_dir or "").lower() == "none" else (a.cache_dir or os.path.join(a.out, ".cache"))
    d = dissect(G, S, a.layers, n_samples=a.samples, seed=a.seed, quantile=a.quantile, batch_size=a.batch_size,
                device=device, cache_dir=cache, topk=a.topk, progress=not a.quiet, lanes=a.lanes,
                generator_name=a.generator, segmenter_name=a.segmenter)
    d.save(a.out, min_iou=a.min_iou)
    for layer in d.layers:
        counts = d.concept_counts(layer, a.min_iou)
        print(f"{layer}: {int(d.interpretable(layer, a.min_iou).sum())}/{len(d.thresholds(layer))} "
              f"interpretable units; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {os.path.join(a.out, 'dissect.json')} and {os.path.join(a.out, 'arrays.npz')}")


def cmd_layers(a):
    G = _load("generator", a.generator, a.checkpoint, _device(a.device))
    rows = layer_table(G, include_nested=a.all)
    width = max(len(n) for n, _ in rows)
    for n, s in rows:
        print(f"{n:<{width}}  {s}")


def cmd_models(a):
    from gandissect_widgets.registry import list_generators, list_segmenters
    print(json.dumps({"generators": list_generators(), "segmenters": list_segmenters()}, indent=1))


def main(argv=None) -> int:
    from gandissect_widgets import causal_cli
    from gandissect_widgets.report.html import cmd_report
    args = build_parser().parse_args(argv)
    commands = {"dissect": cmd_dissect, "layers": cmd_layers, "models": cmd_models, "ace": causal_cli.cmd_ace,
                "optimize": causal_cli.cmd_optimize, "context": causal_cli.cmd_context,
                "artifacts": causal_cli.cmd_artifacts, "report": cmd_report}
    try:
        commands[args.command](args)
    except (KeyError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        if os.environ.get("GANDISSECT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gandissect {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
