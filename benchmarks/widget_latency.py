"""Latency from a state change to the new image bytes, for the ablation panel and the paint canvas.

    python benchmarks/widget_latency.py [--generator sceneworld] [--layer layer4] [--samples 8] [--device cpu]

Toggling: a unit is switched in the ablation panel (session state change) and the clock stops
when the edited strip's PNG bytes are set.  Painting: a stroke's mouse-up until the result bytes
are set.  Prints medians and 90th percentiles over repeated toggles/strokes (target: median <= 100 ms
for 8 default-world samples on a 2-core CPU).
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gandissect_widgets as gw  # noqa: E402
from gandissect_widgets.widgets import AblationPanel, PaintWidget  # noqa: E402


def stamp_when_shown(view):
    """Record when the view's new image bytes have been set (its _show callback returned)."""
    stamps = []
    show = view._show

    def timed(parts):
        show(parts)
        stamps.append(time.perf_counter())
    view._show = timed
    return stamps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="sceneworld")
    p.add_argument("--segmenter", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--concept", default="building")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--dissect-samples", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    G = gw.load_generator(a.generator, device=a.device)
    S = gw.load_segmenter(a.segmenter or a.generator, device=a.device)
    layer = a.layer or [n for n, _ in G.named_children() if n.startswith("layer")][3]
    s = gw.Session(G, S, device=a.device, samples=range(a.samples))
    s.dissect([layer], n_samples=a.dissect_samples, progress=False,
              cache_dir=os.path.expanduser("~/.cache/gandissect-widgets/bench"))
    concept = a.concept if a.concept in s.labels else s.concepts()[0]
    s.update(concept=concept, layer=layer)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"generator {a.generator} {tuple(s.render([0]).shape[1:])}, layer {layer}, {a.samples} samples")

    panel = AblationPanel(s)
    panel.wait()
    top = s.top_units(layer, concept, 20)
    stamps = stamp_when_shown(panel)
    times = []
    for i in range(a.repeats + 3):
        t0 = time.perf_counter()
        panel.toggle(top[i % len(top)])
        panel.wait()
        if i >= 3:
            times.append(stamps[-1] - t0)
    ms = np.array(times) * 1000
    print(f"toggle ablation -> edited strip bytes: median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms "
          f"(n={len(ms)})")

    paint = PaintWidget(s, sample=0)
    paint.wait()
    stamps = stamp_when_shown(paint)
    times = []
    rng = np.random.RandomState(0)
    H, W = paint.size
    for i in range(a.repeats + 3):
        x, y = rng.uniform(0.2, 0.8, 2) * (W * paint.scale, H * paint.scale)
        paint.mode.value = "draw" if i % 2 == 0 else "erase"
        paint.mouse_down(x, y)
        paint.mouse_move(x + 8, y + 4)
        t0 = time.perf_counter()
        paint.mouse_up(x + 8, y + 4)
        paint.wait()
        if i >= 3:
            times.append(stamps[-1] - t0)
        if len(paint.strokes) > 6:
            paint.reset()
            paint.wait()
    ms = np.array(times) * 1000
    print(f"paint stroke (mouse-up) -> result bytes: median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms "
          f"(n={len(ms)})")


if __name__ == "__main__":
    main()
