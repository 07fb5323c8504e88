"""Run by tests/test_distributed_causal.py, under torchrun or as one plain process: the causal tools
on the tiny models, inside ``engine.distributed.job``.

argv: OUT_DIR MODE, MODE in {tools, die}.
- tools: every rank runs measure_ace, unit_ace, removal_curve, contextual_insertion and
  artifact_scores and writes what it got to OUT_DIR/rank-R.json.
- die: the last rank exits without a word at its third segmenter call (GD_DIE_AFTER); the others
  write OUT_DIR/rank-R.json with the error they stopped with; nobody writes a result.

Also the segmenter factory ``dying_segmenter`` (for ``gandissect --segmenter
dist_causal_worker:dying_segmenter``): the planted segmenter, whose last rank exits at its
GD_DIE_AFTER-th call."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import TinyGenerator, TinySegmenter  # noqa: E402

from gandissect_widgets.engine.distributed import RankFailed, job  # noqa: E402


def _last_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1 > 0


def _die_after(S, calls):
    """``S``, which kills this process (as a crash does) at its ``calls``-th call on the last rank."""
    if not _last_rank():
        return S
    seen = [0]

    def hook(*_):
        seen[0] += 1
        if seen[0] >= calls:
            os._exit(3)
    S.register_forward_hook(hook)
    return S


def dying_segmenter(device="cpu"):
    import gandissect_widgets as gw
    return _die_after(gw.load_segmenter("planted", device=device), int(os.environ.get("GD_DIE_AFTER", "3")))


def _features(x):
    """A small feature space for the Fréchet distance (2x2 mean colours: 12 numbers)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).cpu()


def _plain(v):
    """JSON-able copy of a result (arrays as lists; NaN kept as NaN)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return _plain(np.asarray(v).tolist())
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def tools(ranks):
    from gandissect_widgets.engine.ace import measure_ace, removal_curve, unit_ace
    from gandissect_widgets.engine.artifacts import artifact_scores
    from gandissect_widgets.engine.context import contextual_insertion
    G, S = TinyGenerator().eval(), TinySegmenter()
    values = torch.linspace(0.5, 3, 5)
    got = {}
    a = measure_ace(G, S, "layer2", [0, 3], "c1", n_samples=21, batch_size=4, values=values, bootstrap=100)
    got["ace"] = dict(a.to_json(), original=a.original, ablated=a.ablated, inserted=a.inserted)
    got["unit_ace"] = unit_ace(G, S, "layer2", "c1", n_samples=13, batch_size=4, values=values, progress=False,
                               images_per_pass=8)
    got["removal"] = removal_curve(G, S, "layer2", "c1", {"mine": [4, 2, 0, 1, 3]}, ks=(1, 2, 4), n_samples=15,
                                   batch_size=4, random_draws=3, progress=False, images_per_pass=8)
    ctx = contextual_insertion(G, S, "layer2", "c1", [3, 4], n_samples=11, batch_size=3, locations=5,
                               values=values, strength=1, patch=2, progress=False)
    got["context"] = dict(ctx.to_json(), count=ctx.count, added_mean=ctx.added_mean, added_std=ctx.added_std)
    ref = torch.tanh(torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    art = artifact_scores(G, S, "layer2", ref, n_samples=20, top=6, ks=(1, 2), n_eval=10, random_draws=2,
                          batch_size=4, feature_fn=_features, progress=False, baseline=TinyGenerator(seed=3).eval(),
                          bootstrap=30, unit_bootstrap=10)
    got["artifacts"] = art.to_json()
    return got


def die(ranks):
    from gandissect_widgets.engine.ace import measure_ace
    G, S = TinyGenerator().eval(), _die_after(TinySegmenter(), int(os.environ.get("GD_DIE_AFTER", "3")))
    return {"ace": measure_ace(G, S, "layer2", [0, 3], "c1", n_samples=64, batch_size=4,
                               values=torch.ones(5), bootstrap=10).to_json()}


def main(out, mode):
    with job(timeout=float(os.environ.get("GD_TEST_TIMEOUT", "60"))) as ranks:
        report = {"rank": ranks.rank, "size": ranks.size}
        try:
            report["result"] = _plain({"tools": tools, "die": die}[mode](ranks))
        except RankFailed as e:
            report["error"] = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank-{ranks.rank}.json"), "w") as f:
            json.dump(report, f)
    return 0 if "result" in report else 2


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
