"""Progressive GAN generators in the layout of the original GAN Dissection release.

An ``nn.Sequential`` with children ``layer1 .. layerN`` and ``output_RxR`` (stable layer names):
``layer1`` maps z, seen as (N, zdim, 1, 1), to 4x4 with a 4x4 conv (padding 3); ``layer2`` is a
3x3 conv; then pairs of (nearest x2 upsample + 3x3 conv, 3x3 conv).  Each block is PixelNorm ->
conv (no bias) -> WScale (x * gain/sqrt(fan_in) + b) -> LeakyReLU(0.2); the output block is
PixelNorm -> 1x1 conv to RGB -> WScale(gain 1), not clamped (``output_tanh=True`` clamps it).
For a 256x256 model: layer1-2 at 4x4, layer3-4 8x8, ..., layer13-14 256x256.

    G = load_progan(checkpoint="churchoutdoor_lsun.pth")      # a local file
    G = load_progan(name="churchoutdoor")                      # the published file, cached
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gandissect_widgets.checkpoint import CheckpointError, load_strict, torch_load, unwrap_state_dict
from gandissect_widgets.download import cached_file, hash_prefix_from_name

__all__ = ["ProgressiveGenerator", "progan_from_state_dict", "sizes_from_state_dict", "convert_old_layout",
           "load_progan", "PROGAN_CHECKPOINTS", "PROGAN_URL"]

PROGAN_URL = "https://dissect.csail.mit.edu/models/"
# name -> published file (its name carries the first 8 hex digits of the file's SHA-256)
PROGAN_CHECKPOINTS = {name: f"proggan_{name}-{h}.pth" for name, h in [
    ("bedroom", "d8a89ff1"), ("churchoutdoor", "7e701dd5"), ("conferenceroom", "21e85882"),
    ("diningroom", "3aa0ab80"), ("kitchen", "67f1e16c"), ("livingroom", "5ef336dd"),
    ("restaurant", "b8578299"), ("celebhq", "620d161c")]}

# Channel widths [zdim, 4x4, 8x8, ...] of the published architectures, by output resolution.
DEFAULT_SIZES = {
    8: [512, 512, 512], 16: [512, 512, 512, 512], 32: [512, 512, 512, 512, 256],
    64: [512, 512, 512, 512, 256, 128], 128: [512, 512, 512, 512, 256, 128, 64],
    256: [512, 512, 512, 512, 256, 128, 64, 32], 1024: [512, 512, 512, 512, 512, 256, 128, 64, 32, 16]}


class PixelNorm(nn.Module):
    def forward(self, x):
        return x / torch.sqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class WScale(nn.Module):
    """He-scaled output plus bias: ``x * gain / sqrt(fan_in) + b`` (the scale is not a parameter)."""

    def __init__(self, size, fan_in, gain=math.sqrt(2)):
        super().__init__()
        self.scale = gain / math.sqrt(fan_in)
        self.b = nn.Parameter(torch.randn(size))

    def forward(self, x):
        return x * self.scale + self.b.view(1, -1, 1, 1)


class NormConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel_size, padding, upsample=False):
        super().__init__()
        self.norm = PixelNorm()
        self.upsample = upsample
        self.conv = nn.Conv2d(cin, cout, kernel_size, 1, padding, bias=False)
        self.wscale = WScale(cout, cin, gain=math.sqrt(2) / kernel_size)
        self.relu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x):
        x = self.norm(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.relu(self.wscale(self.conv(x)))


class OutputBlock(nn.Module):
    def __init__(self, cin, tanh=False):
        super().__init__()
        self.norm = PixelNorm()
        self.conv = nn.Conv2d(cin, 3, kernel_size=1, padding=0, bias=False)
        self.wscale = WScale(3, cin, gain=1)
        self.tanh = tanh

    def forward(self, x):
        x = self.wscale(self.conv(self.norm(x)))
        return F.hardtanh(x) if self.tanh else x


class ProgressiveGenerator(nn.Sequential):
    """ProGAN generator; ``sizes`` = channel widths [zdim, 4x4, 8x8, ...] (or give ``resolution``)."""

    def __init__(self, resolution=None, sizes=None, output_tanh=False):
        if (resolution is None) == (sizes is None):
            raise ValueError("give exactly one of resolution= or sizes=")
        if sizes is None:
            if resolution not in DEFAULT_SIZES:
                raise ValueError(f"no default widths for resolution {resolution}; known: {sorted(DEFAULT_SIZES)}")
            sizes = DEFAULT_SIZES[resolution]
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be [zdim, width4x4, width8x8, ...] with at least 2 positive entries, "
                             f"got {sizes}")
        seq = [NormConvBlock(sizes[0], sizes[1], 4, 3), NormConvBlock(sizes[1], sizes[1], 3, 1)]
        for si, so in zip(sizes[1:-1], sizes[2:]):
            seq += [NormConvBlock(si, so, 3, 1, upsample=True), NormConvBlock(so, so, 3, 1)]
        res = 4 * 2 ** (len(seq) // 2 - 1)
        named = [(f"layer{i + 1}", m) for i, m in enumerate(seq)]
        named.append((f"output_{res}x{res}", OutputBlock(sizes[-1], tanh=output_tanh)))
        super().__init__(OrderedDict(named))
        self.sizes, self.resolution, self.zdim = sizes, res, sizes[0]

    def forward(self, z):
        return super().forward(z.view(z.shape[0], z.shape[1], 1, 1))

    def sample_z(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` latents from ``numpy.random.RandomState(seed)``: the first k are the same for any n >= k."""
        z = np.random.RandomState(seed).standard_normal((n, self.zdim)).astype(np.float32)
        return torch.from_numpy(z).to(next(self.parameters()).device)


def convert_old_layout(sd: dict) -> dict:
    """``features.{i}.*`` -> ``layer{i+1}.*`` and ``output.*`` -> ``output_{R}x{R}.*`` (older release)."""
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"features\.(\d+)\.", k))})
    if not idx:
        return sd
    if idx != list(range(len(idx))):
        raise CheckpointError(f"old ProGAN layout with non-contiguous features indices {idx}")
    res = 4 * 2 ** ((len(idx) - 1) // 2)
    out = {}
    for k, v in sd.items():
        m = re.match(r"features\.(\d+)\.(.*)", k)
        if m:
            out[f"layer{int(m.group(1)) + 1}.{m.group(2)}"] = v
        elif k.startswith("output."):
            out[f"output_{res}x{res}." + k[len("output."):]] = v
        else:
            out[k] = v
    return out


def sizes_from_state_dict(sd: dict) -> list[int]:
    """Channel widths [zdim, 4x4, 8x8, ...] read from ``layer{i}.conv.weight`` shapes."""
    n = 0
    while f"layer{n + 1}.conv.weight" in sd:
        n += 1
    if n < 2 or n % 2:
        keys = ", ".join(list(sd)[:8])
        raise CheckpointError(f"not a ProGAN state dict in the GAN Dissection layout (expected keys layer1.conv.weight, "
                              f"layer2.conv.weight, ..., an even number of layers, and output_RxR.*); found {n} "
                              f"layer{{i}}.conv.weight keys; first keys: {keys}")
    w = [sd[f"layer{i + 1}.conv.weight"] for i in range(n)]
    sizes = [int(w[0].shape[1])] + [int(w[i].shape[0]) for i in range(0, n, 2)]
    for i in range(1, n, 2):
        if w[i].shape[0] != w[i - 1].shape[0]:
            raise CheckpointError(f"layer{i} and layer{i + 1} of a ProGAN pair must have the same width, got "
                                  f"{w[i - 1].shape[0]} and {w[i].shape[0]}")
    return sizes


def progan_from_state_dict(obj, output_tanh=False, source="checkpoint") -> ProgressiveGenerator:
    """A ``ProgressiveGenerator`` built and loaded (strict keys) from a state dict in either layout."""
    sd = convert_old_layout(unwrap_state_dict(obj))
    G = ProgressiveGenerator(sizes=sizes_from_state_dict(sd), output_tanh=output_tanh)
    load_strict(G, sd, "ProGAN (layer1..layerN, output_RxR)", source)
    return G.eval()


def load_progan(checkpoint=None, name=None, device="cpu", output_tanh=False, progress=True):
    """A ProGAN from a local file (``checkpoint=PATH``) or a published one by ``name`` (downloaded to the cache)."""
    if (checkpoint is None) == (name is None):
        raise ValueError(f"give checkpoint=PATH or name= one of {sorted(PROGAN_CHECKPOINTS)}")
    if name is not None:
        if name not in PROGAN_CHECKPOINTS:
            raise KeyError(f"unknown ProGAN {name!r}; published: {', '.join(sorted(PROGAN_CHECKPOINTS))}")
        fname = PROGAN_CHECKPOINTS[name]
        checkpoint = cached_file(PROGAN_URL + fname, sha256=hash_prefix_from_name(fname), subdir="progan",
                                 progress=progress)
    G = progan_from_state_dict(torch_load(checkpoint), output_tanh=output_tanh, source=str(checkpoint))
    return G.to(device)
