"""Dissection across processes: 1 vs K ranks of a ``torchrun`` job, one thread each.

    python benchmarks/distributed_speed.py [--ranks 2] [--samples 1000] [--layers layer4 layer6]
                                           [--batch-size 32] [--device cpu] [--rounds 3]

Each configuration runs ``dissect()`` (the default world unless --generator/--segmenter) inside
``engine.distributed.job()`` under ``torchrun --standalone --nproc-per-node K`` with
OMP_NUM_THREADS=1 and one lane, so that K processes use K cores and 1 process one.  Every rank
reports the seconds of its dissect() call (the job's time is the slowest rank's: the merges wait
for it) and its peak resident memory; the script prints, per configuration, the median over
``--rounds`` alternating rounds, the speed-up over one process, and the largest peak per process.
The results of the K-rank job are checked equal to one process's (counts and thresholds bit for
bit) before any figure is printed.  On a GPU machine, ``--device cuda`` gives each rank its own GPU
(cuda:LOCAL_RANK; K <= the number of GPUs): the same figures per device.
Keep the machine otherwise idle; the load (os.getloadavg) is printed beside the figures.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(args):
    """One rank (run by torchrun): dissect, then report seconds, peak memory and the result's digest."""
    import hashlib
    import resource
    import time

    import numpy as np

    from gandissect_widgets.engine.dissection import dissect
    from gandissect_widgets.engine.distributed import job
    from gandissect_widgets.registry import load_generator, load_segmenter
    G, S = load_generator(args.generator), load_segmenter(args.segmenter)
    with job(args.device) as ranks:
        device = ranks.device(args.device)
        t0 = time.perf_counter()
        d = dissect(G, S, args.layers, n_samples=args.samples, batch_size=args.batch_size, device=device, lanes=1,
                    progress=False)
        took = time.perf_counter() - t0
        h = hashlib.sha256()
        for layer in d.layers:
            for name in ("thresholds", "iou", "topk_indices"):
                h.update(np.ascontiguousarray(d.array(layer, name)).tobytes())
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(os.path.join(args.report, f"rank-{ranks.rank}.json"), "w") as f:
            json.dump({"seconds": took, "peak_mib": peak_kib / 1024, "digest": h.hexdigest()}, f)


def run(args, ranks):
    with tempfile.TemporaryDirectory() as report:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "--max-restarts=0", os.path.abspath(__file__), "--worker", "--report", report,
               "--generator", args.generator, "--segmenter", args.segmenter, "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--device", args.device, "--layers", *args.layers]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"{ranks} rank(s) failed:\n{p.stderr[-3000:]}")
        return [json.load(open(os.path.join(report, f"rank-{r}.json"))) for r in range(ranks)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--layers", nargs="+", default=["layer4", "layer6"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--generator", default="sceneworld")
    ap.add_argument("--segmenter", default="sceneworld")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"dissect of {' '.join(args.layers)}, {args.samples} samples, batch {args.batch_size}, device "
          f"{args.device}, one thread and one lane per rank; load before: {os.getloadavg()[0]:.2f}")
    times, peaks, digests = {1: [], args.ranks: []}, {1: 0.0, args.ranks: 0.0}, {}
    for _ in range(args.rounds):
        for k in (1, args.ranks):
            reports = run(args, k)
            times[k].append(max(r["seconds"] for r in reports))
            peaks[k] = max(peaks[k], max(r["peak_mib"] for r in reports))
            digests.setdefault(k, set()).update(r["digest"] for r in reports)
    if len(digests[1] | digests[args.ranks]) != 1:
        sys.exit(f"the results differ between 1 and {args.ranks} ranks: {digests}")
    one = statistics.median(times[1])
    for k in (1, args.ranks):
        t = statistics.median(times[k])
        print(f"{k} rank(s): {t:7.2f} s (median of {args.rounds}: {', '.join(f'{v:.2f}' for v in times[k])}); "
              f"speed-up {one / t:4.2f}x; peak resident memory per process {peaks[k]:6.0f} MiB")
    print(f"results identical (thresholds, IoU, top-k); load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
