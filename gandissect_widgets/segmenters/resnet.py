"""The CSAIL ResNet encoder of the MIT segmentation models: a deep stem and feature maps C2..C5.

Deep stem: conv3x3(3, w, stride 2) -> conv3x3(w, w) -> conv3x3(w, 2w), each with BN and ReLU, then
max-pool; then ``layer1..layer4`` of Bottleneck blocks (widths w, 2w, 4w, 8w, times 4 out).  With
w = 64 and blocks (3, 4, 6, 3) this is the ResNet-50 of ``upp-resnet50-upernet`` and of
``ade20k-resnet50dilated-ppm_deepsup``; the parameter names are theirs (``conv1``, ``bn1``, ...,
``layer3.5.conv2``), so the released encoder files load as they are.  ``dilate_scale=8`` removes
the strides of layer3 and layer4 and dilates them instead (the "resnet50dilated" encoder).
"""
from __future__ import annotations

from torch import nn

__all__ = ["Bottleneck", "DeepStemResNet"]


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class DeepStemResNet(nn.Module):
    """``forward(x)`` -> [C2, C3, C4, C5] at strides 4, 8, 16, 32 (8, 8 for C4, C5 with dilate_scale=8)."""

    def __init__(self, blocks=(3, 4, 6, 3), width=64, dilate_scale=None):
        super().__init__()
        w = int(width)
        self.conv1, self.bn1, self.relu1 = conv3x3(3, w, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.relu2 = conv3x3(w, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True)
        self.conv3, self.bn3, self.relu3 = conv3x3(w, 2 * w), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = 2 * w
        self.layer1 = self._make_layer(w, blocks[0])
        self.layer2 = self._make_layer(2 * w, blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * w, blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * w, blocks[3], stride=2)
        self.out_channels = [4 * w, 8 * w, 16 * w, 32 * w]
        if dilate_scale == 8:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)
        elif dilate_scale == 16:
            _dilate(self.layer4, 2)
        elif dilate_scale is not None:
            raise ValueError(f"dilate_scale must be None, 8 or 16, got {dilate_scale}")

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


def _dilate(layer, dilate):
    """mit_semseg's ``_nostride_dilate``: strided convs lose their stride, 3x3 convs are dilated."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation, m.padding = (dilate // 2, dilate // 2), (dilate // 2, dilate // 2)
            elif m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilate, dilate), (dilate, dilate)


def resnet_arch_from_state_dict(sd) -> dict:
    """``blocks`` and ``width`` of a DeepStemResNet state dict (encoder files of the MIT models)."""
    blocks = []
    for i in range(1, 5):
        n = 0
        while f"layer{i}.{n}.conv1.weight" in sd:
            n += 1
        blocks.append(n)
    return dict(blocks=tuple(blocks), width=int(sd["conv1.weight"].shape[0])) if "conv1.weight" in sd and all(blocks) \
        else None
