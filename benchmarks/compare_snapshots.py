"""Score the EMA snapshots a GAN run kept (``train_gan --keep-snapshots``), to choose the one to ship.

    python benchmarks/compare_snapshots.py RUN_DIR [--samples 1000] [--from-step 0]

For each ``RUN_DIR/snapshot_XXXXXX.pt``: the Fréchet distance in the segmenter's feature space to
renders of world seed 777 (as in world_figures.py, with fewer images), the L1 distance between
label frequencies of segmented samples and the renders' true labels, and the share of samples
that hold a building, a window, a door and a tree; first for the weights shipped now, and for
the renders themselves. Ship a step with
``train_gan --out RUN_DIR --resume --ship-step STEP`` (same other arguments as the run).
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
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
    a = p.parse_args()
    S = load_segmenter()
    feat = segmenter_features(S)
    imgs, labels = render(a.samples, seed=777)
    x = to_tensor(imgs)
    ref = feature_stats(torch.cat([feat(x[i:i + 250]) for i in range(0, a.samples, 250)]).numpy())
    real_freq = np.bincount(labels.ravel(), minlength=len(LABELS)) / labels.size
    real_present = {c: (labels == LABELS.index(c)).reshape(a.samples, -1).any(1).mean() for c in PRESENT}
    print(f"{'step':>6} {'frechet':>8} {'labels L1':>9}  " + "  ".join(f"{c:>8}" for c in PRESENT))
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
        print(f"{step:>6} {fd:8.4f} {l1:9.3f}  " + "  ".join(f"{present[c]:8.2f}" for c in PRESENT), flush=True)


if __name__ == "__main__":
    main()
