"""Dissection overhead and memory: dissect() of 4 layers by each counting backend (``tail``, the
CPU path; ``dense``, the GPU path) vs (a) generator + segmenter alone, side by side in one run.

    python benchmarks/dissect_speed.py [--generator sceneworld] [--segmenter sceneworld]
                                       [--layers layer3 layer4 layer5 layer6] [--samples 512] [--device cpu]
                                       [--threads T] [--rounds 7] [--lanes 2] [--tuned-malloc]
                                       [--methods tail dense]
    python benchmarks/dissect_speed.py --world progan-upernet --device cuda [--batch-size 16]

Prints the device, (a) and each method's time in seconds over the same N samples, each ratio
over (a) (targets: tail <= 1.3 on a CPU; on a GPU, dense <= 1.1 at batch >= 16), and the peak
memory of dissect() at N and 4N samples, each measured in a fresh subprocess (it should not
grow with N).  ``--world progan-upernet``: the ProGAN-256 generator and the UPerNet-ResNet50
segmenter of ``model_speed.py`` (random weights, full size; layers layer4 layer6 layer8 layer10
unless given), the GPU case.  On Linux the peak of anonymous memory is printed too:
the peak resident size also counts the pages of the segmentation cache, a file on disk that
the kernel may drop, which holds N x H x W bytes by design.  The timings alternate (a) and (b) for ``--rounds``
rounds in one process and report medians, with the median and spread of the per-round ratios:
a shared machine's speed drifts by tens of percent between seconds.

On a CPU dissect() runs ``--lanes`` batches through the models at once, one per thread, which
uses the cores better than one forward pass on all of them: (a) is a plain loop, as a user would
write it; for reference, the same forward in lanes is timed too, and (b) over it is the share of
the statistics alone.

``--tuned-malloc`` runs the measurements with glibc's heap thresholds fixed
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so that freed memory is kept for reuse: with
the default, dynamic thresholds, a CPU forward pass can spend a tenth of its time in page faults
on memory the heap gave back, by amounts that depend on what the process did before (for (a)
and (b) alike).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gandissect_widgets as gw  # noqa: E402
from gandissect_widgets.engine.sidebyside import SideBySide  # noqa: E402

PROGAN_LAYERS = ["layer4", "layer6", "layer8", "layer10"]


def load(a):
    if a.world == "progan-upernet":
        from model_speed import full_upp
        from gandissect_widgets.models.progan import ProgressiveGenerator
        torch.manual_seed(0)
        return ProgressiveGenerator(resolution=256).to(a.device).eval(), full_upp(a.device)
    G = gw.load_generator(a.generator, device=a.device)
    S = gw.load_segmenter(a.segmenter, device=a.device)
    return G, S


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def forward_only(G, S, n, bs, device):
    z = G.sample_z(n, 1)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, bs):
            S(G(z[i:i + bs].to(device)))
    sync(device)
    return time.perf_counter() - t


def forward_lanes(G, S, n, bs, device, lanes):
    """(a) as dissect() schedules it: ``lanes`` batches at once, one per thread (engine.sidebyside)."""
    z = G.sample_z(n, 1)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad(), SideBySide(device, lanes) as side:
        for _ in side.ahead(lambda i: S(G(z[i:i + bs].to(device))), range(0, n, bs)):
            pass
    sync(device)
    return time.perf_counter() - t


def run_dissect(G, S, a, n, method):
    sync(a.device)
    t = time.perf_counter()
    gw.dissect(G, S, a.layers, n_samples=n, batch_size=a.batch_size, device=a.device, progress=False, lanes=a.lanes,
               method=method)
    sync(a.device)
    return time.perf_counter() - t


class AnonPeak:
    """Peak anonymous resident memory (MB) of this process, sampled every 20 ms (Linux only)."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def now():
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return None

    def _watch(self):
        while not self._stop.wait(0.02):
            mb = self.now()
            if mb is not None:
                self.peak = max(self.peak or 0, mb)

    def __enter__(self):
        self.peak = self.now()
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        mb = self.now()
        if mb is not None:
            self.peak = max(self.peak, mb)


def child(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    G, S = load(a)
    if str(a.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    forward_only(G, S, min(a.samples, 2 * a.batch_size), a.batch_size, a.device)  # warm-up
    out, anon = {}, None
    if a.child == "forward":
        with AnonPeak() as anon:
            out["seconds"] = forward_only(G, S, a.samples, a.batch_size, a.device)
    elif a.child == "timing":  # (a), (a) in lanes and each method in turn
        cpu = not str(a.device).startswith("cuda")
        out["forward"], out["lanes"] = [], []
        for m in a.methods:
            out[m] = []
        for _ in range(a.rounds):
            out["forward"].append(forward_only(G, S, a.samples, a.batch_size, a.device))
            if cpu:
                out["lanes"].append(forward_lanes(G, S, a.samples, a.batch_size, a.device, a.lanes))
            for m in a.methods:
                out[m].append(run_dissect(G, S, a, a.samples, m))
        out["lanes_used"] = SideBySide(a.device, a.lanes).lanes
    else:
        with AnonPeak() as anon:
            out["seconds"] = run_dissect(G, S, a, a.samples, a.child.split(":")[1])
    if anon is not None and anon.peak is not None:
        out["anon_peak_mb"] = anon.peak
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if str(a.device).startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print(json.dumps(out))


TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 25), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}  # 32 MB is the most glibc takes


def spawn(a, what, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--samples", str(n),
           "--generator", a.generator, "--segmenter", a.segmenter, "--device", a.device,
           "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--rounds", str(a.rounds),
           "--lanes", str(a.lanes), "--world", a.world, "--methods", *a.methods,
           "--layers", *a.layers]
    env = dict(os.environ, **TUNED_MALLOC) if a.tuned_malloc else None
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="sceneworld")
    p.add_argument("--segmenter", default="sceneworld")
    p.add_argument("--world", choices=("sceneworld", "progan-upernet"), default="sceneworld",
                   help="the models: --generator/--segmenter, or ProGAN-256 with UPerNet-ResNet50 (random weights)")
    p.add_argument("--methods", nargs="+", choices=("tail", "dense"), default=["tail", "dense"])
    p.add_argument("--layers", nargs="+", default=None, help="(default: layer3 layer4 layer5 layer6; ProGAN: "
                   + " ".join(PROGAN_LAYERS) + ")")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds of (a) then (b)")
    p.add_argument("--lanes", type=int, default=2, help="dissect()'s lanes (batches through the models at once on a CPU)")
    p.add_argument("--tuned-malloc", action="store_true", help="glibc heap thresholds fixed (see the docstring)")
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.layers is None:
        a.layers = PROGAN_LAYERS if a.world == "progan-upernet" else ["layer3", "layer4", "layer5", "layer6"]
    if a.child:
        return child(a)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; threads {a.threads or torch.get_num_threads()}")
    models = "ProGAN-256 + UPerNet-ResNet50 (random weights)" if a.world == "progan-upernet" else \
        f"generator {a.generator}, segmenter {a.segmenter}"
    print(f"{models}, layers {' '.join(a.layers)}, N={a.samples}, batch {a.batch_size}, lanes {a.lanes}, "
          f"malloc {'tuned' if a.tuned_malloc else 'default'}; uptime: {uptime()}")
    t = spawn(a, "timing", a.samples)
    ta = statistics.median(t["forward"])
    print(f"(a) generator + segmenter forward: {ta:7.2f} s  ({a.samples / ta:.0f} samples/s; median of {a.rounds})")
    for m in a.methods:
        tb = statistics.median(t[m])
        ratios = sorted(b / f for f, b in zip(t["forward"], t[m]))
        target = {"tail": " (target <= 1.3 on a CPU)", "dense": " (target <= 1.1 on a GPU)"}[m]
        print(f"dissect(method={m!r}) of {len(a.layers)} layers: {tb:7.2f} s  ({a.samples / tb:.0f} samples/s); "
              f"/(a): {tb / ta:.2f}{target}; per round: median {statistics.median(ratios):.2f}, "
              f"{ratios[0]:.2f} to {ratios[-1]:.2f}")
    if t["lanes"]:
        tl = statistics.median(t["lanes"])
        print(f"for reference, (a) in {t['lanes_used']} lane(s) as dissect() runs it: {tl:.2f} s; each method over it: "
              + ", ".join(f"{m} {statistics.median(t[m]) / tl:.2f}" for m in a.methods) + " (the statistics' own share)")
    fa = spawn(a, "forward", a.samples)
    for m in a.methods:
        fb = spawn(a, f"dissect:{m}", a.samples)
        f4 = spawn(a, f"dissect:{m}", 4 * a.samples)
        key = "cuda_peak_mb" if "cuda_peak_mb" in fb else "max_rss_mb"
        print(f"{m}: peak memory ({key}): N={a.samples}: {fb[key]:.0f} MB; 4N={4 * a.samples}: {f4[key]:.0f} MB; "
              f"growth {f4[key] - fb[key]:+.0f} MB (forward alone: {fa[key]:.0f} MB)")
        if key == "max_rss_mb" and "anon_peak_mb" in fb:
            key = "anon_peak_mb"
            print(f"{m}: peak anonymous memory: N={a.samples}: {fb[key]:.0f} MB; 4N={4 * a.samples}: {f4[key]:.0f} MB; "
                  f"growth {f4[key] - fb[key]:+.0f} MB (forward alone: {fa[key]:.0f} MB)")
    print(f"uptime after: {uptime()}")


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
