"""What the traps of a researcher's own models cost to avoid, and what batching the causal tools saves.

    python benchmarks/own_model_costs.py [--samples 16] [--units 32] [--repeats 5]

1. Traced outputs that later in-place writes cannot corrupt (``ThreadTraces``): a forward with
   four layers traced, plain (no copies), in its first run (every retained output copied and its
   version counter checked) and in steady state, on SceneWorld (nothing written in place: no
   copies after the first run) and on a 64x64 PyTorch-tutorial DCGAN (in-place ReLUs after its
   BatchNorms: those layers are copied every run).  Medians of ``--repeats``.
2. Single-unit ACE of ``--units`` units over ``--samples`` samples: ``unit_ace`` (many units a
   pass, from the layer) against ``unit_ace_reference`` (one unit at a time, the definition), with
   the planned passes and segmenter calls, and that the two agree.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gandissect_widgets as gw  # noqa: E402
from gandissect_widgets.engine.ace import unit_ace, unit_ace_cost, unit_ace_reference  # noqa: E402
from gandissect_widgets.engine.hooks import ThreadTraces  # noqa: E402
from gandissect_widgets.models import adapt_generator  # noqa: E402


class TutorialDCGAN(nn.Module):
    def __init__(self, main):
        super().__init__()
        self.main = main

    def forward(self, z):
        return self.main(z)


def dcgan64(nz=100, ngf=64):
    """The PyTorch DCGAN tutorial's generator (random weights), adapted."""
    torch.manual_seed(0)
    main = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())
    return adapt_generator(TutorialDCGAN(main).eval(), zdim=(nz, 1, 1))


def median_time(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def trace_costs(name, G, layers, batch, repeats):
    z = G.sample_z(batch, 0)
    with torch.no_grad():
        plain = median_time(lambda: G(z), repeats)
        firsts = []
        for _ in range(repeats):
            with ThreadTraces(G, layers) as traces:
                t = time.perf_counter()
                traces.run(lambda: G(z), layers)
                firsts.append(time.perf_counter() - t)
                steady = median_time(lambda: traces.run(lambda: G(z), layers), repeats)
                copied = sorted(traces._written)
    first = statistics.median(firsts)
    print(f"{name}: forward {plain * 1e3:.1f} ms; traced {', '.join(layers)}: first run {first * 1e3:.1f} ms "
          f"({first / plain:.3f}x), steady {steady * 1e3:.1f} ms ({steady / plain:.3f}x); copied every run: "
          f"{', '.join(copied) or 'none'}")


def ace_costs(name, G, S, layer, concept, n_samples, n_units):
    units = list(range(n_units))
    with torch.no_grad(), gw.Trace(G, layer, stop=True) as tr:
        G(G.sample_z(1, 0))
    values = torch.linspace(0.5, 2.0, tr.output.shape[1])
    plan = unit_ace_cost(G, layer, n_samples=n_samples, units=units)
    t = time.perf_counter()
    fast = unit_ace(G, S, layer, concept, n_samples=n_samples, values=values, units=units, progress=False)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = unit_ace_reference(G, S, layer, concept, n_samples=n_samples, values=values, units=units)
    t_ref = time.perf_counter() - t
    ref_passes = -(-n_samples // 16) * n_units * 2
    diff = float(np.nanmax(np.abs(fast - ref)))
    print(f"{name} {layer}, {n_units} units x {n_samples} samples: batched {t_fast:.2f} s ({plan}), "
          f"one unit at a time {t_ref:.2f} s ({ref_passes} full forwards, as many segmenter calls); "
          f"ratio {t_ref / t_fast:.1f}x; max |difference| {diff:.2g}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--units", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}")
    world, seg = gw.load_generator("sceneworld"), gw.load_segmenter("sceneworld")
    trace_costs("sceneworld", world, ["layer4", "layer6", "layer8", "layer10"], a.batch, a.repeats)
    dcgan = dcgan64()
    trace_costs("dcgan64", dcgan, ["main.1", "main.4", "main.7", "main.10"], a.batch, a.repeats)
    ace_costs("sceneworld", world, seg, "layer4", "tree", a.samples, a.units)
    ace_costs("dcgan64", dcgan, seg, "main.7", "tree", a.samples, a.units)


if __name__ == "__main__":
    main()
