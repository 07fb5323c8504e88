"""Tiny random generators and segmenters for tests (no weights, no network)."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ToMap(nn.Module):
    def __init__(self, zdim, ch, hw):
        super().__init__()
        self.lin = nn.Linear(zdim, ch * hw * hw)
        self.ch, self.hw = ch, hw

    def forward(self, z):
        return F.leaky_relu(self.lin(z).view(-1, self.ch, self.hw, self.hw), 0.2)


class UpConv(nn.Module):
    def __init__(self, cin, cout, up=2, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.up, self.act = up, act

    def forward(self, x):
        if self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode="nearest")
        x = self.conv(x)
        return F.leaky_relu(x, 0.2) if self.act else torch.tanh(x)


class TinyGenerator(nn.Sequential):
    """layer1 (6,4,4) -> layer2 (5,8,8) -> layer3 (4,16,16) -> output (3,16,16)."""

    def __init__(self, zdim=8, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.add_module("layer1", ToMap(zdim, 6, 4))
        self.add_module("layer2", UpConv(6, 5))
        self.add_module("layer3", UpConv(5, 4))
        self.add_module("output", UpConv(4, 3, up=1, act=False))
        self.zdim = zdim

    def sample_z(self, n, seed=0):
        return torch.from_numpy(np.random.RandomState(seed).standard_normal((n, self.zdim)).astype("float32"))


class TinySegmenter(nn.Module):
    """Argmax of a fixed random 1x1 conv of the image; optionally at half resolution and/or
    with a second label channel (a coarser grouping)."""

    def __init__(self, classes=5, half=False, channels=1, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(classes - 1, 3, generator=g))
        self.register_buffer("b", torch.randn(classes - 1, generator=g) * 0.3)
        self.labels = ["-"] + [f"c{i}" for i in range(1, classes)]
        self.half, self.channels = half, channels

    def forward(self, x):
        if self.half:
            x = F.avg_pool2d(x, 2)
        s = torch.einsum("nchw,kc->nkhw", x, self.w) + self.b.view(1, -1, 1, 1)
        lab = s.argmax(1) + 1
        if self.channels == 1:
            return lab
        # a coarser grouping in channel 2; where lab == 3 both channels say 3 (must count once)
        other = torch.where(lab <= 2, torch.full_like(lab, len(self.labels) - 1),
                            torch.where(lab == 3, lab, torch.zeros_like(lab)))
        return torch.stack([lab, other], 1)


def run_dissect(G=None, S=None, **kw):
    """A small dissection of the tiny models (layer2, 40 samples, batches of 8), quietly."""
    import gandissect_widgets as gw
    kw.setdefault("n_samples", 40)
    kw.setdefault("batch_size", 8)
    kw.setdefault("progress", False)
    return gw.dissect(G or TinyGenerator(), S or TinySegmenter(), kw.pop("layers", ["layer2"]), **kw)


def files_under(d):
    """Every file below ``d``, relative to it, sorted (what a run left behind)."""
    import os
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
