"""Score the EMA snapshots a GAN run kept (``train_gan --keep-snapshots``), to choose the one to ship.

    python benchmarks/compare_snapshots.py RUN_DIR [--samples 1000] [--from-step 0]
                                           [--ablate tree --ablate-layers layer3 layer4 --ablate-seed 7]

For each ``RUN_DIR/snapshot_XXXXXX.pt``: the Fréchet distance in the segmenter's feature space to
renders of world seed 777 (as in world_figures.py, with fewer images), the L1 distance between
label frequencies of segmented samples and the renders' true labels, and the share of samples
that hold a building, a window, a door and a tree; first for the weights shipped now, and for
the renders themselves. With ``--ablate CONCEPT``, also the removal ratio of the concept's 20 top
units by IoU (dissection of 500 samples, seed 1) in each of ``--ablate-layers``, measured on 200
samples of ``--ablate-seed`` (use another seed than world_figures.py's 2, so that the figure
recorded for the shipped step is not the one it was chosen on). Ship a step with
``train_gan --out RUN_DIR --resume --ship-step STEP`` (same other arguments as the run).
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gandissect_widgets.engine.ace import measure_ace  # noqa: E402
from gandissect_widgets.engine.dissection import dissect  # noqa: E402
from gandissect_widgets.engine.frechet import feature_stats, frechet_distance, segmenter_features  # noqa: E402
from gandissect_widgets.world.gan import load_generator  # noqa: E402
from gandissect_widgets.world.render import LABELS, render, to_tensor  # noqa: E402
from gandissect_widgets.world.segmenter import load_segmenter  # noqa: E402

PRESENT = ["building", "window", "door", "tree"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--from-step", type=int, default=0)
    p.add_argument("--ablate", default=None, help="a concept: add the removal ratio of its top-20 units")
    p.add_argument("--ablate-layers", nargs="+", default=["layer3", "layer4", "layer5", "layer6"])
    p.add_argument("--ablate-seed", type=int, default=7)
    a = p.parse_args()
    S = load_segmenter()
    feat = segmenter_features(S)
    imgs, labels = render(a.samples, seed=777)
    x = to_tensor(imgs)
    ref = feature_stats(torch.cat([feat(x[i:i + 250]) for i in range(0, a.samples, 250)]).numpy())
    real_freq = np.bincount(labels.ravel(), minlength=len(LABELS)) / labels.size
    real_present = {c: (labels == LABELS.index(c)).reshape(a.samples, -1).any(1).mean() for c in PRESENT}
    extra = [f"{a.ablate}@{layer}" for layer in a.ablate_layers] if a.ablate else []
    print(f"{'step':>6} {'frechet':>8} {'labels L1':>9}  " + "  ".join(f"{c:>8}" for c in PRESENT + extra))
    print(f"{'renders':>6} {'':>8} {'':>9}  " + "  ".join(f"{real_present[c]:8.2f}" for c in PRESENT))
    paths = [p for p in sorted(glob.glob(os.path.join(a.run, "snapshot_*.pt")))
             if int(os.path.basename(p)[9:15]) >= a.from_step]
    for path in [None] + paths:  # None: the weights shipped now
        step = "shipped" if path is None else int(os.path.basename(path)[9:15])
        G = load_generator(checkpoint=path)
        z = G.sample_z(a.samples, seed=0)
        with torch.no_grad():
            out = [G(z[i:i + 250]) for i in range(0, a.samples, 250)]
            fd = frechet_distance(*feature_stats(torch.cat([feat(o) for o in out]).numpy()), *ref)
            seg = torch.cat([S(o) for o in out]).numpy()
        freq = np.bincount(seg.ravel(), minlength=len(LABELS)) / seg.size
        present = {c: (seg == LABELS.index(c)).reshape(a.samples, -1).any(1).mean() for c in PRESENT}
        l1 = np.abs(freq[1:] - real_freq[1:]).sum()
        removal = removal_ratios(G, S, a) if a.ablate else []
        print(f"{step:>6} {fd:8.4f} {l1:9.3f}  " + "  ".join(f"{present[c]:8.2f}" for c in PRESENT)
              + "".join(f"  {r:{len(e)}.2f}" for r, e in zip(removal, extra)), flush=True)


def removal_ratios(G, S, a):
    d = dissect(G, S, a.ablate_layers, n_samples=500, seed=1, progress=False)
    return [measure_ace(G, S, layer, d.ranking(layer, a.ablate)[:20], a.ablate, n_samples=200,
                        seed=a.ablate_seed, bootstrap=10).removal_ratio for layer in a.ablate_layers]


if __name__ == "__main__":
    main()
