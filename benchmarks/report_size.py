"""Size and time of `gandissect report` by default (interpretable units + top 20 per layer) and with every unit.

    python benchmarks/report_size.py [--layers layer4 layer5 layer6 layer7] [--samples 300] [--device cpu]

Dissects the layers of SceneWorld (cached under --cache), then writes the report twice and prints,
for each, the page's size, the units drawn and the wall time, and the ratios (all / default).
"""
import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gandissect_widgets.report.html import build_report  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["layer4", "layer5", "layer6", "layer7"])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gandissect-report-size"))
    a = ap.parse_args()
    from gandissect_widgets.cli import main as cli
    res = os.path.join(a.cache, "result")
    assert cli(["dissect", "--layers", *a.layers, "--samples", str(a.samples), "--out", res, "--device", a.device,
                "--quiet", "--cache-dir", os.path.join(a.cache, "cache")]) == 0
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {a.device}; "
          f"load {os.getloadavg()[0]:.1f}")
    rows = {}
    for name, all_units in (("default", False), ("all units", True)):
        t = time.perf_counter()
        path = build_report(res, os.path.join(a.cache, f"{name.replace(' ', '_')}.html"), device=a.device,
                            all_units=all_units)
        page = open(path, encoding="utf-8").read()
        rows[name] = (os.path.getsize(path), page.count("class='strip'"), page.count("data-unit="),
                      time.perf_counter() - t)
        print(f"{name:>9}: {rows[name][0] / 1e6:6.2f} MB, pictures of {rows[name][1]:4d} of {rows[name][2]} units, "
              f"{rows[name][3]:6.1f} s")
    (b0, d0, _, t0), (b1, d1, _, t1) = rows["default"], rows["all units"]
    print(f"all / default: size x{b1 / b0:.2f}, units drawn x{d1 / d0:.2f}, time x{t1 / t0:.2f}")


if __name__ == "__main__":
    main()
