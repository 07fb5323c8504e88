"""The SceneWorld segmenter: a small U-Net trained on rendered (image, label) pairs.

    S = load_segmenter()                 # shipped weights, eval mode, no grad
    seg = S(images)                      # (N,3,H,W) in [-1,1] -> (N,H,W) int64 label map
    p = S.probabilities(images)          # (N,C,H,W) softmax, differentiable w.r.t. images
    S.labels                             # = render.LABELS, C = len(S.labels)

GroupNorm only (no batch statistics), so a label map is deterministic and independent of
the rest of the batch. Input sides must be multiples of 8 (64x64 is what it was trained on).
"""
import os

import torch
from torch import nn
import torch.nn.functional as F

from .render import LABELS

__all__ = ['SceneSegmenter', 'load_segmenter', 'DEFAULT_SEG_WIDTHS']

from .shipped import WEIGHTS_DIR  # noqa: E402
DEFAULT_SEG_WIDTHS = (16, 32, 64, 96)


def _block(cin, cout, convs=2):
    """``convs`` times conv3x3 -> GroupNorm -> ReLU."""
    groups = 8 if cout % 8 == 0 else 1
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1),
                   nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SceneSegmenter(nn.Module):
    """U-Net: images (N,3,H,W) in [-1,1] -> logits (N,C,H,W) at full resolution.

    Args:
        widths: channels at full, 1/2, 1/4 and 1/8 resolution.
        num_classes: C, default ``len(LABELS)``.
    """

    def __init__(self, widths=DEFAULT_SEG_WIDTHS, num_classes=len(LABELS)):
        super().__init__()
        w = [int(v) for v in widths]
        if len(w) != 4:
            raise ValueError(f'SceneSegmenter: widths needs 4 values, got {widths}')
        self.widths = tuple(w)
        self.labels = list(LABELS) if num_classes == len(LABELS) else [
            f'class{i}' for i in range(num_classes)]
        # light at full resolution (one conv each way), heavier at lower resolutions
        self.enc1 = _block(3, w[0], 1)
        self.enc2 = _block(w[0], w[1])
        self.enc3 = _block(w[1], w[2])
        self.bottom = _block(w[2], w[3])
        self.dec3 = _block(w[3] + w[2], w[2], 1)
        self.dec2 = _block(w[2] + w[1], w[1], 1)
        self.dec1 = _block(w[1] + w[0], w[0], 1)
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def logits(self, images):
        """(N,3,H,W) in [-1,1] -> (N,C,H,W) unnormalised class scores."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'SceneSegmenter: expected images of shape (N,3,H,W), got '
                             f'{tuple(images.shape)}')
        h, w = images.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f'SceneSegmenter: image height and width must be multiples of '
                             f'8, got {h}x{w}')
        e1 = self.enc1(images)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottom(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(b, scale_factor=2.0), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)

    def probabilities(self, images):
        """(N,3,H,W) -> softmax class probabilities (N,C,H,W); differentiable."""
        return self.logits(images).softmax(dim=1)

    def forward(self, images):
        """(N,3,H,W) -> label map (N,H,W) int64, indices into ``labels``."""
        return self.logits(images).argmax(dim=1)

    def config(self):
        return dict(widths=list(self.widths), num_classes=len(self.labels))


def load_segmenter(device='cpu', checkpoint=None):
    """The shipped SceneWorld segmenter (or the state_dict at ``checkpoint``), in eval mode
    with ``requires_grad`` False on its parameters (gradients still flow to the input)."""
    from .shipped import load_shipped
    return load_shipped('segmenter', lambda c: SceneSegmenter(widths=c.get('widths', DEFAULT_SEG_WIDTHS),
                                                              num_classes=c.get('num_classes', len(LABELS))),
                        device, checkpoint, 'train_segmenter')
