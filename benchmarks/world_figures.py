"""The SceneWorld figures the README and the weights' records quote, measured with the engine.

    python benchmarks/world_figures.py [--samples 2000] [--dissect-samples 1000] [--record | --checkpoint PT]

1. A Fréchet distance in the segmenter's feature space (not FID) between GAN samples and renders,
   beside the same distance between two independent render sets (the floor) and between an
   untrained generator of the same architecture and the renders (the ceiling).
2. Label frequencies (fraction of pixels) of GAN samples, segmented, against renders' true labels.
3. A dissection of the shipped GAN (layers 3-8): interpretable units per concept per layer and the
   concepts with at least one interpretable unit in any layer.
4. Ablating the 20 top units (by IoU) of a concept (tree, building, window, door) in middle layers:
   removal ratio and ACE, with CIs.
``--record`` writes the figures to gandissect_widgets/world/weights/quality.json.
"""
import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gandissect_widgets as gw  # noqa: E402
from gandissect_widgets.engine.ace import measure_ace  # noqa: E402
from gandissect_widgets.engine.frechet import feature_stats, frechet_distance, segmenter_features  # noqa: E402
from gandissect_widgets.engine.io import atomic_write_json  # noqa: E402
from gandissect_widgets.world.gan import SceneGenerator  # noqa: E402
from gandissect_widgets.world.render import LABELS, render, to_tensor  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(gw.__file__), "world", "weights")


def features_of_generator(G, feat, n, seed, bs=100):
    z = G.sample_z(n, seed)
    with torch.no_grad():
        return torch.cat([feat(G(z[i:i + bs])) for i in range(0, n, bs)]).numpy()


def features_of_renders(feat, n, seed, bs=250):
    out = []
    for i in range(0, n, bs):
        imgs, _ = render(min(bs, n - i), seed=seed, start=i)
        out.append(feat(to_tensor(imgs)))
    return torch.cat(out).numpy()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--dissect-samples", type=int, default=1000)
    p.add_argument("--ablate-layers", nargs="+", default=["layer4", "layer5", "layer6"])
    p.add_argument("--ablate-concepts", nargs="+", default=["tree", "building", "window", "door"])
    p.add_argument("--record", action="store_true")
    p.add_argument("--checkpoint", default=None, help="generator weights other than the shipped ones (not with --record)")
    a = p.parse_args()
    t0 = time.time()
    if a.record and a.checkpoint:
        p.error("--record writes the figures of the shipped weights: leave out --checkpoint")
    G, S = gw.load_generator("sceneworld", checkpoint=a.checkpoint), gw.load_segmenter("sceneworld")
    feat = segmenter_features(S)
    ref = feature_stats(features_of_renders(feat, a.samples, seed=777))
    fd_gan = frechet_distance(*feature_stats(features_of_generator(G, feat, a.samples, seed=0)), *ref)
    fd_floor = frechet_distance(*feature_stats(features_of_renders(feat, a.samples, seed=778)), *ref)
    torch.manual_seed(0)
    untrained = SceneGenerator().eval()
    fd_ceiling = frechet_distance(*feature_stats(features_of_generator(untrained, feat, a.samples, seed=0)), *ref)
    print(f"Fréchet distance in the segmenter's feature space ({a.samples} images each):")
    print(f"  GAN samples vs renders:          {fd_gan:.4f}")
    print(f"  renders vs renders (floor):      {fd_floor:.4f}")
    print(f"  untrained generator (ceiling):   {fd_ceiling:.4f}")

    with torch.no_grad():
        z = G.sample_z(500, 0)
        seg = torch.cat([S(G(z[i:i + 100])) for i in range(0, 500, 100)]).numpy()
    _, real = render(500, seed=777)
    gan_freq = np.bincount(seg.ravel(), minlength=len(LABELS)) / seg.size
    real_freq = np.bincount(real.ravel(), minlength=len(LABELS)) / real.size
    print("label frequencies (fraction of pixels): concept, GAN (segmented), renders (true)")
    for i, name in enumerate(LABELS[1:], 1):
        print(f"  {name:10s} {gan_freq[i]:.4f} {real_freq[i]:.4f}")

    layers = [f"layer{i}" for i in range(3, 9)]
    d = gw.dissect(G, S, layers, n_samples=a.dissect_samples, seed=1, progress=False)
    per_layer = {l: d.concept_counts(l) for l in layers}
    concepts = sorted({c for cc in per_layer.values() for c in cc})
    print(f"dissection ({a.dissect_samples} samples): interpretable units (IoU > 0.04) per layer")
    for l in layers:
        print(f"  {l}: {int(d.interpretable(l).sum())}/{len(d.thresholds(l))}  {per_layer[l]}")
    print(f"concepts with an interpretable unit in some layer: {len(concepts)}: {', '.join(concepts)}")

    ablation = {}
    for c in a.ablate_concepts:
        for L in a.ablate_layers:
            top = d.ranking(L, c)[:20]
            res = measure_ace(G, S, L, top, c, n_samples=200, seed=2)
            ablation.setdefault(c, {})[L] = {"units": [int(u) for u in top], **res.to_json()}
            print(f"ablating the 20 top {c} units of {L}: removal ratio {res.removal_ratio:.3f} "
                  f"[{res.removal_ci[0]:.3f}, {res.removal_ci[1]:.3f}], ACE {res.ace:.4f} "
                  f"[{res.ace_ci[0]:.4f}, {res.ace_ci[1]:.4f}] (200 samples, seed 2)")
    wall = time.time() - t0
    print(f"({wall:.0f} s on {platform.machine()} {platform.processor() or ''}, torch {torch.__version__})")
    if a.record:
        atomic_write_json(os.path.join(WEIGHTS, "quality.json"), {
            "command": "python benchmarks/world_figures.py " + " ".join(sys.argv[1:]),
            "frechet_segmenter_features": {"gan_vs_renders": fd_gan, "floor_renders_vs_renders": fd_floor,
                                           "ceiling_untrained_vs_renders": fd_ceiling, "images": a.samples},
            "label_frequencies": {name: {"gan": float(gan_freq[i]), "renders": float(real_freq[i])}
                                  for i, name in enumerate(LABELS[1:], 1)},
            "dissection": {"samples": a.dissect_samples, "per_layer": per_layer, "concepts": concepts},
            "ablation_top20_by_iou": ablation,
            "wall_time_s": wall, "machine": platform.platform()})


if __name__ == "__main__":
    main()
