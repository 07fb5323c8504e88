"""BigGAN (DeepMind, via the optional ``pytorch-pretrained-biggan`` package) with the protocol.

BigGAN is class-conditional, so the class is part of the latent: ``z`` is (N, z_dim + num_classes),
the truncated noise followed by a one-hot class vector.  ``sample_z(n, seed)`` draws the noise from a
truncated normal in [-2, 2] scaled by ``truncation`` and a class from ``classes`` for each sample,
each from its own ``numpy.random.RandomState`` stream (the first k the same for any n >= k).
``G.make_z(noise, class_index)`` builds latents for chosen classes.

Layer names: ``generator.gen_z`` (linear), ``generator.layers.{i}`` (GenBlocks and the SelfAttn
layer, each (N,C,h,w)), ``generator.conv_to_rgb``.

    G = load_biggan("biggan-deep-256", classes=[980, 970], truncation=0.4)   # downloaded to the cache
    G = load_biggan(checkpoint="path/to/dir")   # a folder with config.json and pytorch_model.bin
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from gandissect_widgets.checkpoint import load_strict, torch_load
from gandissect_widgets.download import cached_file

__all__ = ["BigGANGenerator", "load_biggan", "require_biggan"]

EXTRA_HINT = "pip install gandissect-widgets[biggan]   (or: pip install pytorch-pretrained-biggan)"


def require_biggan():
    """The ``pytorch_pretrained_biggan`` module, or an ImportError that names the extra to install."""
    try:
        import pytorch_pretrained_biggan
    except ImportError as e:
        raise ImportError(f"BigGAN needs the optional package pytorch-pretrained-biggan, which is not "
                          f"installed: {EXTRA_HINT}") from e
    return pytorch_pretrained_biggan


def _truncated_normal(rs, shape, bound=2.0):
    """Standard normal truncated to [-bound, bound] by inverting the CDF of uniforms (row-major draws)."""
    u = torch.from_numpy(rs.random_sample(shape))
    lo = torch.special.ndtr(torch.tensor(-bound, dtype=torch.float64))
    return torch.special.ndtri(lo + u * (1 - 2 * lo)).float()


class BigGANGenerator(nn.Module):
    """A ``pytorch_pretrained_biggan.BigGAN`` whose latent carries the class (see module docstring)."""

    def __init__(self, biggan, classes=None, truncation=0.4):
        super().__init__()
        if not 0 < truncation <= 1:
            raise ValueError(f"truncation must be in (0, 1], got {truncation}")
        self.config = biggan.config
        self.embeddings, self.generator = biggan.embeddings, biggan.generator
        self.z_dim, self.num_classes = int(self.config.z_dim), int(self.config.num_classes)
        classes = list(range(self.num_classes)) if classes is None else [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if not classes or bad:
            raise ValueError(f"classes must be a non-empty list of class indices in 0..{self.num_classes - 1}; "
                             f"bad: {bad or classes}")
        self.classes, self.truncation = classes, float(truncation)
        self.zdim = self.z_dim + self.num_classes

    @property
    def fingerprint(self) -> str:
        return f"truncation={self.truncation};classes={self.classes}"

    def forward(self, z):
        if z.dim() != 2 or z.shape[1] != self.zdim:
            raise ValueError(f"BigGAN latents are (N, {self.zdim}) = noise ({self.z_dim}) + one-hot class "
                             f"({self.num_classes}); got {tuple(z.shape)}. Use G.sample_z or G.make_z.")
        noise, onehot = z[:, :self.z_dim], z[:, self.z_dim:]
        cond = torch.cat((noise, self.embeddings(onehot)), dim=1)
        return self.generator(cond, self.truncation)

    def make_z(self, noise, class_index) -> torch.Tensor:
        """Latents from noise (N, z_dim) and a class index (int or N ints)."""
        noise = torch.as_tensor(noise, dtype=torch.float32)
        idx = torch.as_tensor(class_index).reshape(-1).expand(noise.shape[0])
        onehot = torch.zeros(noise.shape[0], self.num_classes)
        onehot[torch.arange(noise.shape[0]), idx] = 1
        return torch.cat([noise, onehot], 1).to(self.embeddings.weight.device)

    def sample_z(self, n: int, seed: int = 0) -> torch.Tensor:
        noise = self.truncation * _truncated_normal(np.random.RandomState(seed), (n, self.z_dim))
        picks = np.random.RandomState([seed, 1]).randint(len(self.classes), size=n)
        return self.make_z(noise, [self.classes[i] for i in picks])


def _load_dir(path, strict=True):
    pkg = require_biggan()
    cfg_file, w_file = os.path.join(path, "config.json"), os.path.join(path, "pytorch_model.bin")
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"a BigGAN checkpoint folder holds config.json and pytorch_model.bin; "
                                    f"missing {f}")
    with open(cfg_file) as f:
        config = pkg.BigGANConfig.from_dict(json.load(f))
    model = pkg.BigGAN(config)
    load_strict(model, torch_load(w_file), "pytorch-pretrained-biggan BigGAN", w_file)
    return model


def load_biggan(name="biggan-deep-256", checkpoint=None, classes=None, truncation=0.4, device="cpu",
                progress=True):
    """BigGAN by published ``name`` (biggan-deep-128/256/512, cached) or from a local folder ``checkpoint``."""
    require_biggan()
    if checkpoint is None:
        from pytorch_pretrained_biggan.model import PRETRAINED_CONFIG_ARCHIVE_MAP, PRETRAINED_MODEL_ARCHIVE_MAP
        if name not in PRETRAINED_MODEL_ARCHIVE_MAP:
            raise KeyError(f"unknown BigGAN {name!r}; published: {', '.join(sorted(PRETRAINED_MODEL_ARCHIVE_MAP))}")
        for url, fname in ((PRETRAINED_MODEL_ARCHIVE_MAP[name], "pytorch_model.bin"),
                           (PRETRAINED_CONFIG_ARCHIVE_MAP[name], "config.json")):
            checkpoint = os.path.dirname(cached_file(url, filename=fname, subdir=os.path.join("biggan", name),
                                                     progress=progress))
    return BigGANGenerator(_load_dir(os.fspath(checkpoint)), classes, truncation).to(device).eval()
