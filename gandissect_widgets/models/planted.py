"""A synthetic generator whose units are known: the ground truth for tests and demos.

Every image is a grid of ``grid x grid`` cells.  Concept j (j < concepts) sits in exactly one
cell per image, chosen from the latent, so it covers exactly 1/grid^2 of all pixels.  At
``layer1`` (grid x grid), unit j is that concept's cell (1, plus a small smooth ramp so values do
not tie) and the remaining units are smooth random fields of the latent, unrelated to the
concepts.  ``layer2`` upsamples, ``output`` paints each concept's colour where its unit exceeds 1/2.
So: unit j *is* concept j (IoU ~ 1 at the top-1% threshold with grid=10), ablating unit j at layer1
removes concept j, and inserting it paints concept j.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PALETTE = torch.tensor([
    [0.55, 0.55, 0.55],  # background
    [0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.85, 0.1],
    [0.8, 0.2, 0.8], [0.1, 0.8, 0.8], [1.0, 0.5, 0.0], [0.3, 0.15, 0.0],
]) * 2 - 1
CONCEPT_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "brown"]


class PlantedCode(nn.Module):
    def __init__(self, concepts, units, grid, seed=0):
        super().__init__()
        self.concepts, self.units, self.grid = concepts, units, grid
        g = torch.Generator().manual_seed(seed)
        nrand = units - concepts
        # Random units: a fixed random projection of the noise part of z, smoothed.
        self.register_buffer("proj", torch.randn(nrand, 16, grid, grid, generator=g) / 4.0)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
        self.register_buffer("ramp", 0.02 * (yy + 2 * xx))

    def forward(self, z):
        n, G2 = z.shape[0], self.grid * self.grid
        cells = torch.argsort(z[:, :G2], dim=1)[:, :self.concepts]  # distinct cells per image
        maps = torch.zeros(n, self.concepts, G2, device=z.device, dtype=z.dtype)
        maps.scatter_(2, cells[:, :, None], 1.0)
        maps = maps.view(n, self.concepts, self.grid, self.grid) * (1 + self.ramp)
        noise = z[:, G2:G2 + 16]
        rnd = torch.einsum("nk,ukhw->nuhw", noise, self.proj)
        rnd = F.avg_pool2d(F.pad(rnd, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return torch.cat([maps, rnd], 1)


class Upsample(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode="nearest")


class Colorize(nn.Module):
    """Each concept's colour where its unit exceeds 1/2 (a steep sigmoid, so gradients flow)."""

    def __init__(self, concepts):
        super().__init__()
        self.concepts = concepts
        self.register_buffer("palette", PALETTE[:concepts + 1].clone())

    def forward(self, x):
        w = torch.sigmoid((x[:, :self.concepts] - 0.5) * 40)
        bg = torch.prod(1 - w, dim=1, keepdim=True)
        weights = torch.cat([bg, w], 1)
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-6)
        return torch.einsum("nchw,cd->ndhw", weights, self.palette)


class PlantedGenerator(nn.Sequential):
    def __init__(self, concepts=4, units=16, grid=10, scale=4, seed=0):
        if not 1 <= concepts <= len(CONCEPT_NAMES):
            raise ValueError(f"concepts must be in 1..{len(CONCEPT_NAMES)}, got {concepts}")
        if units < concepts:
            raise ValueError(f"units ({units}) must be at least concepts ({concepts})")
        if grid * grid < concepts:
            raise ValueError(f"a {grid}x{grid} grid cannot hold {concepts} distinct cells")
        super().__init__()
        self.add_module("layer1", PlantedCode(concepts, units, grid, seed))
        self.add_module("layer2", Upsample(scale))
        self.add_module("output", Colorize(concepts))
        self.zdim = grid * grid + 16
        self.concepts = concepts

    def sample_z(self, n, seed=0):
        rng = np.random.RandomState(seed)
        return torch.from_numpy(rng.standard_normal((n, self.zdim)).astype("float32"))


def load_planted_generator(concepts=4, units=16, grid=10, scale=4, seed=0, device="cpu"):
    return PlantedGenerator(concepts, units, grid, scale, seed).to(device).eval()
