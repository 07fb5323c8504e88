"""Hugging Face semantic segmenters (SegFormer, UperNet, ...) through the optional ``transformers`` extra.

``load_hf_segmenter(checkpoint=DIR_OR_HUB_ID)`` loads ``AutoModelForSemanticSegmentation`` and the
normalisation of its ``preprocessor_config.json`` (mean/std, resize), applied in torch so that
``probabilities`` stays differentiable.  ``labels`` = ["-"] + the model's ``id2label`` in order
(model class i is label i + 1; repeated names get " (i)" appended).

    S = load_hf_segmenter("nvidia/segformer-b0-finetuned-ade-512-512")   # from the hub, when online
    S = load_hf_segmenter("path/to/saved_model")                          # a save_pretrained() folder
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HFSegmenter", "load_hf_segmenter", "require_transformers"]

EXTRA_HINT = "pip install gandissect-widgets[transformers]   (or: pip install transformers)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"Hugging Face segmenters need the optional package transformers, which is not "
                          f"installed: {EXTRA_HINT}") from e
    return transformers


def _preprocessor_config(checkpoint, local_only):
    path = os.path.join(checkpoint, "preprocessor_config.json")
    if not os.path.isdir(checkpoint):
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(checkpoint, "preprocessor_config.json", local_files_only=local_only)
        except Exception:  # no processor config published: ImageNet defaults
            return {}
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _resize_target(cfg):
    size = cfg.get("size") if cfg.get("do_resize", True) else None
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, int):
        return size, size
    return None


class HFSegmenter(nn.Module):
    """A transformers semantic-segmentation model with the segmenter protocol.

    resize: (h, w) the model input is resized to (None: the image's size); output at image size // downsample.
    """

    def __init__(self, model, labels, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=None, downsample=1):
        super().__init__()
        self.model = model
        self.labels = labels
        self.resize = tuple(resize) if resize else None
        self.downsample = int(downsample)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def fingerprint(self) -> str:
        return f"resize={self.resize};downsample={self.downsample};mean={self.mean.flatten().tolist()}"

    def _softmax(self, images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"segmenter expects images (N,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
        H, W = images.shape[2:]
        x = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.resize and tuple(self.resize) != (H, W):
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        logits = self.model(pixel_values=x).logits
        seg = (H // self.downsample, W // self.downsample)
        return F.softmax(F.interpolate(logits, size=seg, mode="bilinear", align_corners=False), dim=1)

    def forward(self, images):
        return self._softmax(images).argmax(1) + 1

    def probabilities(self, images):
        p = self._softmax(images)
        return torch.cat([p.new_zeros(p.shape[0], 1, *p.shape[2:]), p], 1)


def load_hf_segmenter(checkpoint, device="cpu", resize="auto", downsample=1, local_files_only=None):
    """A segmenter from a ``save_pretrained`` folder or a hub id (``local_files_only`` defaults to True for folders)."""
    transformers = require_transformers()
    checkpoint = os.fspath(checkpoint)
    local = os.path.isdir(checkpoint) if local_files_only is None else bool(local_files_only)
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(checkpoint, local_files_only=local)
    cfg = _preprocessor_config(checkpoint, local)
    id2label = getattr(model.config, "id2label", None) or {}
    n = int(model.config.num_labels)
    labels, seen = ["-"], {"-"}
    for i in range(n):
        name = str(id2label.get(i, id2label.get(str(i), f"class{i}"))).strip()
        name = name if name not in seen else f"{name} ({i})"
        seen.add(name)
        labels.append(name)
    mean = cfg.get("image_mean", IMAGENET_MEAN) if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = cfg.get("image_std", IMAGENET_STD) if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0)
    size = _resize_target(cfg) if resize == "auto" else resize
    return HFSegmenter(model, labels, mean, std, size, downsample).to(device).eval()
