"""Time of one intervention render (partial forward from the edited layer) against a full forward.

    python benchmarks/intervention_speed.py [--generator sceneworld] [--batch 8] [--device cpu]

For each layer: the full forward of a batch, and the re-render after ablating 10 units of that
layer from its cached activation (``render(..., activation=r, layer=L)``), medians over repeats.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gandissect_widgets as gw  # noqa: E402
from gandissect_widgets.engine.interventions import Intervention, layer_activation, render  # noqa: E402


def timed(fn, device, repeats):
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="sceneworld")
    p.add_argument("--layers", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    G = gw.load_generator(a.generator, device=a.device)
    layers = a.layers or [n for n, _ in G.named_children() if n.startswith("layer")]
    z = G.sample_z(a.batch, 0).to(a.device)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"generator {a.generator}, batch {a.batch}")
    with torch.no_grad():
        for _ in range(3):
            G(z)
        full = timed(lambda: G(z), a.device, a.repeats)
        print(f"full forward: {full * 1000:.1f} ms")
        print(f"{'layer':>8} {'shape':>16} {'partial ms':>11} {'full/partial':>13}")
        for L in layers:
            r = layer_activation(G, z, L)
            iv = [Intervention(L, list(range(min(10, r.shape[1]))), "ablate")]
            part = timed(lambda: render(G, z, iv, activation=r, layer=L), a.device, a.repeats)
            print(f"{L:>8} {str(tuple(r.shape[1:])):>16} {part * 1000:>11.1f} {full / part:>13.2f}")


if __name__ == "__main__":
    main()
