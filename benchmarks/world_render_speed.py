"""SceneWorld renderer speed: images per second on one core.

    python benchmarks/world_render_speed.py [--n 2000] [--size 64]
"""
import argparse
import time

from gandissect_widgets.world.render import render


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=2000)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args()
    render(50, size=args.size)  # warm up
    best = float('inf')
    for r in range(args.repeats):
        t = time.perf_counter()
        render(args.n, seed=r, size=args.size)
        best = min(best, time.perf_counter() - t)
    print(f'render: {args.n / best:.0f} images/s at {args.size}x{args.size} '
          f'(best of {args.repeats} runs of {args.n} images)')


if __name__ == '__main__':
    main()
