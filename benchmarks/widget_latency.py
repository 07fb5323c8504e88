"""Latency from a state change to the new image bytes, for the ablation panel and the paint canvas;
and from Run All of the tour notebook to its last view shown, in a real browser.

    python benchmarks/widget_latency.py [--generator sceneworld] [--layer layer4] [--samples 8] [--device cpu]
                                        [--fresh 5] [--repeats 30] [--tour-runs 3 | --no-browser | --tour-only]

First insertion: in a fresh Session (insertion values not computed yet), switching the ablation
panel to "insert", and a first paint stroke with a concept never used before, until the edited
pictures are set; the progress line must show meanwhile (targets: median <= 2 s on an idle 2-core
CPU).  Steady state: a unit toggled in the ablation panel (target median <= 60 ms) and a stroke's
mouse-up (<= 30 ms), until the new PNG bytes are set.  Prints medians and 90th percentiles.

Run All: notebooks/tour.ipynb in JupyterLab 4 and Chromium (tests/lab.py, the launcher of the
browser tests), with a warm cache (the tour's dissection on disk, one Run All before the timed
ones): each timed run opens the notebook on a fresh kernel, clicks Run > Run All Cells, and stops
the clock when the last of its five views is shown (every picture not hidden has its bytes, no
view busy or showing progress, the kernel idle).
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gandissect_widgets as gw  # noqa: E402
import lab as jl  # noqa: E402  (tests/lab.py: the JupyterLab launcher of the browser tests)
from gandissect_widgets.widgets import AblationPanel, PaintWidget  # noqa: E402

TOUR = os.path.join(jl.ROOT, "notebooks", "tour.ipynb")
TOUR_VIEWS = 5  # UnitBrowser, IouRanking, AblationPanel, PaintWidget, LayerSummary


def stamp_when_shown(view, name="_show"):
    """Record when the view's new image bytes have been set (its ``name`` callback returned)."""
    stamps = []
    show = getattr(view, name)

    def timed(parts):
        show(parts)
        stamps.append(time.perf_counter())
    setattr(view, name, timed)
    return stamps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--generator", default="sceneworld")
    p.add_argument("--segmenter", default=None)
    p.add_argument("--layer", default=None)
    p.add_argument("--concept", default="building")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--fresh", type=int, default=5, help="fresh sessions for the first-insertion figures")
    p.add_argument("--dissect-samples", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tour-runs", type=int, default=3, help="timed Run All of the tour in a real browser")
    p.add_argument("--no-browser", action="store_true", help="leave out the Run All figure")
    p.add_argument("--tour-only", action="store_true", help="only the Run All figure")
    a = p.parse_args()
    if a.tour_only:
        print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
        return tour_run_all(a)
    G = gw.load_generator(a.generator, device=a.device)
    S = gw.load_segmenter(a.segmenter or a.generator, device=a.device)
    names = [n for n, _ in G.named_children() if n.startswith("layer")]
    layer = a.layer or names[3]
    s = gw.Session(G, S, device=a.device, samples=range(a.samples))
    s.dissect(list(dict.fromkeys([layer, names[5]])), n_samples=a.dissect_samples, progress=False,
              cache_dir=os.path.expanduser("~/.cache/gandissect-widgets/bench"))
    concept = a.concept if a.concept in s.labels else s.concepts()[0]
    s.update(concept=concept, layer=layer)
    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({dev}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"generator {a.generator} {tuple(s.render([0]).shape[1:])}, layer {layer}, {a.samples} samples")

    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min)")
    first_insertions(a, G, S, s.dissection, layer, concept)
    steady(a, s, layer, concept)
    if not a.no_browser:
        tour_run_all(a)


def progress_seen(view):
    """Count the progress reports the view shows."""
    seen = []
    show = view._progress
    view._progress = lambda *args: (seen.append(args[1:]), show(*args))
    return seen


def fresh_session(a, G, S, dissection, concept):
    s = gw.Session(G, S, device=a.device, samples=range(a.samples))
    s.set_dissection(dissection)
    s.update(concept=concept)
    return s


def first_insertions(a, G, S, dissection, layer, concept):
    toggles, strokes, shown = [], [], []
    paint_layer = dissection.layers[-1]
    other = next((c for c in ("tree", "window", "door") if c in S.labels and c != concept),
                 [c for c in S.labels[1:] if c != concept][0])
    for _ in range(a.fresh):
        s = fresh_session(a, G, S, dissection, concept)
        s.update(layer=layer, selection=s.top_units(layer, concept, 10))
        panel = AblationPanel(s)
        panel.wait()
        stamps, seen = stamp_when_shown(panel), progress_seen(panel)
        t0 = time.perf_counter()
        s.update(mode="insert")
        panel.wait(300)
        toggles.append(stamps[-1] - t0)
        shown.append(bool(seen))
        s = fresh_session(a, G, S, dissection, concept)
        paint = PaintWidget(s, sample=3, layer=paint_layer)
        paint.wait()
        paint.concept.value = other  # a concept never used before in this session
        stamps, seen = stamp_when_shown(paint), progress_seen(paint)
        H, W = paint.size
        paint.mouse_down(W * paint.scale * 0.3, H * paint.scale * 0.7)
        paint.mouse_move(W * paint.scale * 0.6, H * paint.scale * 0.7)
        t0 = time.perf_counter()
        paint.mouse_up(W * paint.scale * 0.6, H * paint.scale * 0.7)
        paint.wait(300)
        strokes.append(stamps[-1] - t0)
        shown.append(bool(seen))
    print(f"first insert toggle (fresh session, {layer}, {concept}) -> edited pictures: "
          f"median {np.median(toggles):.2f} s, max {max(toggles):.2f} s (n={len(toggles)})")
    print(f"first paint stroke with a new concept (fresh session, {paint_layer}, {other}) -> result: "
          f"median {np.median(strokes):.2f} s, max {max(strokes):.2f} s (n={len(strokes)})")
    print(f"progress line shown during {sum(shown)} of {len(shown)} first insertions")


def steady(a, s, layer, concept):
    panel = AblationPanel(s)
    panel.wait()
    top = s.top_units(layer, concept, 20)
    stamps, counted = stamp_when_shown(panel), stamp_when_shown(panel, "_show_stats")
    times, stats = [], []
    for i in range(a.repeats + 3):
        t0 = time.perf_counter()
        panel.toggle(top[i % len(top)])
        panel.wait()
        if i >= 3:
            times.append(stamps[-1] - t0)
            stats.append(counted[-1] - t0)
    ms, sms = np.array(times) * 1000, np.array(stats) * 1000
    print(f"toggle ablation -> edited pictures: median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms "
          f"(n={len(ms)}); -> the pixel count line after them: median {np.median(sms):.1f} ms")

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


def tour_run_all(a):
    """Run All of the tour to its last view shown, in JupyterLab and Chromium, warm cache."""
    why = jl.missing()
    if why:
        print(f"Run All of notebooks/tour.ipynb: skipped ({why})")
        return
    import tempfile
    import pathlib
    import jupyterlab
    with tempfile.TemporaryDirectory(prefix="gd-tour-") as work, \
            jl.jupyterlab(pathlib.Path(work), [TOUR]) as server, jl.chromium(1500, 1100) as page:
        version = page.context.browser.version
        times = []
        for run in range(a.tour_runs + 1):  # the first warms the cache and the kernel's imports up
            server.shut_down_kernels()
            if run:
                browser = page.context.browser
                page.close()
                page = browser.new_page(viewport={"width": 1500, "height": 1100})  # the notebook as on disk:
                page.set_default_timeout(60_000)                                   # no outputs, a fresh kernel
            jl.open_notebook(page, server, "tour.ipynb")
            load = os.getloadavg()[0]
            t0 = jl.run_all(page)
            shown = jl.wait_views_shown(page, TOUR_VIEWS)
            if run:
                times.append(shown - t0)
                print(f"  Run All {run}: {shown - t0:.1f} s (load {load:.2f} when it started)")
        server.shut_down_kernels()
    print(f"Run All of notebooks/tour.ipynb -> last widget visible (warm cache; JupyterLab {jupyterlab.__version__}, "
          f"Chromium {version}, 1500x1100): median {statistics.median(times):.1f} s, max {max(times):.1f} s "
          f"(n={len(times)}); load {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")


if __name__ == "__main__":
    main()
