"""ADE20K-150 segmenters in the CSAIL semantic-segmentation layout (``mit_semseg``), without the package.

Supported: ``resnet50dilated-ppm_deepsup`` (encoder: the CSAIL ResNet-50 with layer3/layer4 dilated,
``segmenters.resnet``; decoder: PPM with adaptive average pooling in bins 1, 2, 3, 6 and a deep-
supervision branch, ``PPMDeepsup``).  Files: ``encoder_epoch_20.pth`` and ``decoder_epoch_20.pth``
in one folder (widths are read from them, keys strictly checked).

Input convention of mit_semseg: RGB in [0,1], minus ImageNet mean, divided by its std.  Output:
``S(images)`` (N, H/d, W/d) long with ``labels`` = ["-"] + the 150 ADE20K names (every pixel gets
a class, so 0 never appears); ``S.probabilities(images)`` (N, 151, H/d, W/d), channel 0 all zero.
``segsizes``: sizes (s, s) to run the model at, softmax summed (None: the image's own size).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from gandissect_widgets.checkpoint import CheckpointError, load_strict, strip_prefix, torch_load, unwrap_state_dict
from gandissect_widgets.download import cached_file
from gandissect_widgets.segmenters.ade20k_labels import ADE20K_150
from gandissect_widgets.segmenters.resnet import DeepStemResNet, resnet_arch_from_state_dict

__all__ = ["PPMDeepsup", "ADE20KSegmenter", "load_ade20k", "ADE_URL", "ADE_ARCHS"]

ADE_URL = "http://sceneparsing.csail.mit.edu/model/pytorch/"
ADE_ARCHS = {"resnet50dilated-ppm_deepsup": 20}  # arch -> epoch of the released files
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PPMDeepsup(nn.Module):
    """mit_semseg's PPMDeepsup decoder (inference path): ``forward([..., C5])`` -> logits at C5's size."""

    def __init__(self, num_class=150, fc_dim=2048, pool_scales=(1, 2, 3, 6), ppm_dim=512):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(fc_dim, ppm_dim, 1, bias=False),
                                                nn.BatchNorm2d(ppm_dim), nn.ReLU(inplace=True)) for s in pool_scales])
        self.cbr_deepsup = nn.Sequential(nn.Conv2d(fc_dim // 2, fc_dim // 4, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(fc_dim // 4), nn.ReLU(inplace=True))
        self.conv_last = nn.Sequential(
            nn.Conv2d(fc_dim + len(pool_scales) * ppm_dim, ppm_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(ppm_dim), nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(ppm_dim, num_class, 1))
        self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_class, 1, 1, 0)  # training only; kept for the keys
        self.dropout_deepsup = nn.Dropout2d(0.1)

    def forward(self, conv_out):
        conv5 = conv_out[-1]
        size = conv5.shape[2:]
        ppm_out = [conv5] + [F.interpolate(p(conv5), size, mode="bilinear", align_corners=False) for p in self.ppm]
        return self.conv_last(torch.cat(ppm_out, 1))


class ADE20KSegmenter(nn.Module):
    """Encoder + decoder with the segmenter protocol (see the module docstring)."""

    def __init__(self, encoder, decoder, labels=None, segsizes=None, downsample=1):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        names = list(labels or ADE20K_150)
        self.labels = ["-"] + names
        self.segsizes = None if segsizes is None else tuple(int(s) for s in segsizes)
        self.downsample = int(downsample)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fingerprint(self) -> str:
        return f"segsizes={self.segsizes};downsample={self.downsample}"

    def _softmax(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ADE20K segmenter expects images (N,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
        H, W = images.shape[2:]
        seg = (H // self.downsample, W // self.downsample)
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        sizes = [(s, s) for s in self.segsizes] if self.segsizes else [(H, W)]
        total = 0
        for size in sizes:
            xs = x if tuple(size) == (H, W) else F.adaptive_avg_pool2d(x, size)
            logits = self.decoder(self.encoder(xs))
            total = total + F.softmax(F.interpolate(logits, size=seg, mode="bilinear", align_corners=False), dim=1)
        return total / len(sizes)

    def forward(self, images):
        return self._softmax(images).argmax(1) + 1

    def probabilities(self, images):
        p = self._softmax(images)
        return torch.cat([p.new_zeros(p.shape[0], 1, *p.shape[2:]), p], 1)


def ade20k_from_state_dicts(encoder_sd, decoder_sd, source="ADE20K checkpoint", labels=None, **options):
    encoder_sd = strip_prefix(unwrap_state_dict(encoder_sd))
    decoder_sd = strip_prefix(unwrap_state_dict(decoder_sd))
    arch = resnet_arch_from_state_dict(encoder_sd)
    if arch is None:
        raise CheckpointError(f"{source}: the encoder is not a CSAIL ResNet (expected conv1.weight and "
                              f"layer1..layer4.N.conv1.weight keys; first keys {list(encoder_sd)[:6]})")
    need = ["conv_last.0.weight", "conv_last.4.weight", "ppm.0.1.weight", "cbr_deepsup.0.weight"]
    if any(k not in decoder_sd for k in need):
        raise CheckpointError(f"{source}: the decoder is not in the mit_semseg ppm_deepsup layout; missing "
                              f"{[k for k in need if k not in decoder_sd]} (first keys {list(decoder_sd)[:6]})")
    num_class = int(decoder_sd["conv_last.4.weight"].shape[0])
    labels = list(labels) if labels is not None else (ADE20K_150 if num_class == 150 else None)
    if labels is None or len(labels) != num_class:
        raise CheckpointError(f"{source}: the decoder has {num_class} classes; pass labels= with {num_class} names")
    encoder = DeepStemResNet(**arch, dilate_scale=8)
    load_strict(encoder, encoder_sd, "CSAIL ResNet encoder (conv1..bn3, layer1..layer4)", f"{source} encoder")
    n_scales = sum(1 for k in decoder_sd if k.startswith("ppm.") and k.endswith(".1.weight"))
    decoder = PPMDeepsup(num_class, fc_dim=encoder.out_channels[-1], pool_scales=(1, 2, 3, 6)[:n_scales],
                         ppm_dim=int(decoder_sd["ppm.0.1.weight"].shape[0]))
    load_strict(decoder, decoder_sd, "mit_semseg PPMDeepsup decoder", f"{source} decoder")
    return ADE20KSegmenter(encoder, decoder, labels, **options).eval()


def load_ade20k(checkpoint=None, arch="resnet50dilated-ppm_deepsup", device="cpu", segsizes=None, downsample=1,
                labels=None, progress=True):
    """An ADE20K-150 segmenter from a folder (encoder/decoder_epoch_20.pth), or downloaded to the cache."""
    if arch not in ADE_ARCHS:
        raise ValueError(f"unsupported ADE20K architecture {arch!r}; supported: {', '.join(ADE_ARCHS)}")
    epoch = ADE_ARCHS[arch]
    files = [f"encoder_epoch_{epoch}.pth", f"decoder_epoch_{epoch}.pth"]
    if checkpoint is None:
        paths = [cached_file(f"{ADE_URL}ade20k-{arch}/{f}", subdir=f"segmodel/ade20k-{arch}", progress=progress)
                 for f in files]
        checkpoint = os.path.dirname(paths[0])
    folder = os.fspath(checkpoint)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if not os.path.isdir(folder) or missing:
        raise FileNotFoundError(f"ADE20K checkpoint must be a folder holding {', '.join(files)}; "
                                f"{folder} lacks {missing or files}")
    S = ade20k_from_state_dicts(torch_load(os.path.join(folder, files[0])), torch_load(os.path.join(folder, files[1])),
                                source=folder, labels=labels, segsizes=segsizes, downsample=downsample)
    return S.to(device)
