"""Forward time per image of the real architectures (random weights, full size).

    python benchmarks/model_speed.py [--device cpu|cuda] [--batch 4] [--repeats 3] [--size 256]

ProGAN-256 (the LSUN architecture: widths 512 .. 32, 14 layers) and the UPP UPerNet-ResNet50
(fpn_dim 512; label counts of the released model: 336 objects, 26 materials, 365 scenes, parts of
sky/building/person) at size x size.  Prints the device and seconds per image (median of repeats,
after one warm-up batch).  Runs on the GPU too when --device cuda is given and one is at hand.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gandissect_widgets.models.progan import ProgressiveGenerator  # noqa: E402
from gandissect_widgets.segmenters.resnet import DeepStemResNet  # noqa: E402
from gandissect_widgets.segmenters.upernet import UnifiedParsingSegmenter, UPerNet  # noqa: E402


def upp_labels():
    objects = ["-", "sky", "building", "person"] + [f"object{i}" for i in range(4, 336)]
    parts = {"sky": ["cloud"], "building": ["window", "door", "roof", "balcony", "column", "shop"],
             "person": ["head", "arm", "leg", "torso", "hand", "foot"]}
    parts.update({f"object{i}": [f"part{i}_{j}" for j in range(4)] for i in range(4, 28)})
    return {"object": objects, "material": ["-"] + [f"material{i}" for i in range(1, 26)],
            "scene": [f"scene{i}" for i in range(365)], "object_part": parts}


def full_upp(device):
    labels = upp_labels()
    enc = DeepStemResNet(blocks=(3, 4, 6, 3), width=64)
    nr = {"object": len(labels["object"]), "material": len(labels["material"]), "scene": len(labels["scene"]),
          "part": sum(len(v) for v in labels["object_part"].values())}
    dec = UPerNet(nr, fc_dim=2048, fpn_dim=512)
    return UnifiedParsingSegmenter(enc, dec, labels, segsizes=None).to(device).eval()


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def per_image(fn, x, repeats, device):
    with torch.no_grad():
        fn(x)
        sync(device)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            sync(device)
            times.append((time.perf_counter() - t) / x.shape[0])
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="UPerNet input size")
    a = ap.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; batch {a.batch}, median of {a.repeats}")

    torch.manual_seed(0)
    G = ProgressiveGenerator(resolution=256).to(device).eval()
    z = torch.randn(a.batch, 512, device=device)
    print(f"ProGAN-256 generator       {per_image(G, z, a.repeats, device) * 1000:9.1f} ms/image")

    S = full_upp(device)
    x = torch.rand(a.batch, 3, a.size, a.size, device=device) * 2 - 1
    print(f"UPerNet-ResNet50 @ {a.size:<4}   {per_image(S, x, a.repeats, device) * 1000:9.1f} ms/image")


if __name__ == "__main__":
    main()
