"""The segmenter of the planted world: the nearest palette colour of every pixel."""
from __future__ import annotations

import torch
from torch import nn

from gandissect_widgets.models.planted import CONCEPT_NAMES, PALETTE


class PlantedSegmenter(nn.Module):
    def __init__(self, concepts=4, temperature=20.0):
        super().__init__()
        self.labels = ["-", "background"] + CONCEPT_NAMES[:concepts]
        self.register_buffer("palette", PALETTE[:concepts + 1].clone())
        self.temperature = temperature

    def logits(self, images):
        d = ((images[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # (N,C',H,W)
        lg = -self.temperature * d
        unl = torch.full_like(lg[:, :1], -1e4)
        return torch.cat([unl, lg], 1)

    def probabilities(self, images):
        return torch.softmax(self.logits(images), 1)

    def forward(self, images):
        return self.logits(images).argmax(1)


def load_planted_segmenter(concepts=4, device="cpu"):
    return PlantedSegmenter(concepts).to(device).eval()
