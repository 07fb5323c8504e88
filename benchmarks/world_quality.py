"""SceneWorld quality figures: segmenter IoU on held-out renders, and the label frequencies
of the shipped GAN's samples (as the shipped segmenter sees them) against the renders'.

    python benchmarks/world_quality.py [--n 500] [--samples 500] [--grid out.png]
"""
import argparse

import numpy
import torch

from gandissect_widgets.world import load_generator, load_segmenter
from gandissect_widgets.world.render import LABELS, colorize, render
from gandissect_widgets.world.train_segmenter import EVAL_SEED, evaluate


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=500, help='held-out renders for the IoU')
    p.add_argument('--samples', type=int, default=500, help='GAN samples')
    p.add_argument('--grid', default=None, help='write samples and their segmentation here')
    args = p.parse_args()
    G, S = load_generator(), load_segmenter()
    ious, miou, acc = evaluate(S, n=args.n)
    print(f'segmenter on {args.n} held-out renders (world seed {EVAL_SEED}): '
          f'mean IoU {miou:.4f}, pixel accuracy {acc:.4f}')
    for name, v in ious.items():
        print(f'  {name:10s} {v}')
    segs, imgs = [], []
    with torch.no_grad():
        for s in range(0, args.samples, 100):
            z = G.sample_z(args.samples, seed=0)[s:s + 100]
            x = G(z)
            imgs.append(x)
            segs.append(S(x))
    seg = torch.cat(segs).numpy()
    _, real = render(args.n, seed=EVAL_SEED)
    f = numpy.bincount(seg.ravel(), minlength=len(LABELS)) / seg.size
    r = numpy.bincount(real.ravel(), minlength=len(LABELS)) / real.size
    fs = numpy.stack([(seg == i).any((1, 2)) for i in range(len(LABELS))], 1).mean(0)
    rs = numpy.stack([(real == i).any((1, 2)) for i in range(len(LABELS))], 1).mean(0)
    print(f'label frequencies: {args.samples} GAN samples (segmented) vs {args.n} renders')
    print(f'  {"label":10s} {"pixels GAN":>10s} {"renders":>8s} {"scenes GAN":>10s} {"renders":>8s}')
    for i, name in enumerate(LABELS):
        print(f'  {name:10s} {f[i]:10.4f} {r[i]:8.4f} {fs[i]:10.2f} {rs[i]:8.2f}')
    if args.grid:
        from gandissect_widgets.world._training import save_grid
        x = torch.cat(imgs)[:32]
        rgb = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        both = numpy.concatenate([rgb, colorize(seg[:32])], 2)
        save_grid(both, args.grid, ncols=4, scale=2)
        print(f'wrote {args.grid}')


if __name__ == '__main__':
    main()
