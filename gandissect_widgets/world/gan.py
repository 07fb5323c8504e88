"""The SceneWorld GAN: a small ProGAN-like generator trained on rendered scenes.

    G = load_generator()                 # shipped EMA weights, eval mode, no grad
    z = G.sample_z(8, seed=0)            # (8, zdim) float32, first k the same for any n
    x = G(z)                             # (8, 3, 64, 64) in [-1, 1]

The generator is a ``torch.nn.Sequential`` whose children are ``layer1 ... layer10`` and
``output``; each layer has one resolution (layer1-2: 4x4, layer3-4: 8x8, layer5-6: 16x16,
layer7-8: 32x32, layer9-10: 64x64), so a dissection can address them by name. It uses pixel
normalisation (no batch statistics): a sample's image does not depend on the rest of its batch.
``SceneDiscriminator`` is used only by the training script.
"""
import os
from collections import OrderedDict

import numpy
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ['SceneGenerator', 'SceneDiscriminator', 'load_generator', 'WEIGHTS_DIR',
           'DEFAULT_WIDTHS', 'ZDIM']

from .shipped import WEIGHTS_DIR  # noqa: E402
ZDIM = 128
DEFAULT_WIDTHS = (128, 128, 128, 128, 64, 64, 32, 32, 16, 16)


class PixelNorm(nn.Module):
    """Normalise each pixel's feature vector to unit root-mean-square (ProGAN)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class LatentBlock(nn.Module):
    """z (N, zdim) -> (N, C, 4, 4): pixel-normalised latent, linear, LeakyReLU, pixel norm."""

    def __init__(self, zdim, channels):
        super().__init__()
        self.channels = channels
        self.norm_z = PixelNorm()
        self.linear = nn.Linear(zdim, channels * 16)
        self.act = nn.LeakyReLU(0.2)
        self.norm = PixelNorm()

    def forward(self, z):
        x = self.linear(self.norm_z(z[:, :, None, None])[:, :, 0, 0])
        return self.norm(self.act(x.view(-1, self.channels, 4, 4)))


class NearestUpsample(nn.Module):
    """Nearest-neighbour x2 upsampling (same as ``nn.Upsample(scale_factor=2)``, but its
    backward pass is several times faster on the CPU)."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class ConvBlock(nn.Sequential):
    """[nearest x2 upsample] -> conv3x3 -> LeakyReLU(0.2) -> pixel norm."""

    def __init__(self, cin, cout, upsample=False):
        layers = OrderedDict()
        if upsample:
            layers['upsample'] = NearestUpsample()
        layers['conv'] = nn.Conv2d(cin, cout, 3, padding=1)
        layers['relu'] = nn.LeakyReLU(0.2)
        layers['norm'] = PixelNorm()
        super().__init__(layers)


class SceneGenerator(nn.Sequential):
    """z (N, zdim) -> images (N, 3, 64, 64) in [-1, 1].

    Args:
        zdim: latent size.
        widths: output channels of layer1 ... layerN; N must be even; layer1 is 4x4, every
            odd layer after it doubles the resolution (so 10 layers give 64x64).
    """

    def __init__(self, zdim=ZDIM, widths=DEFAULT_WIDTHS):
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or len(widths) % 2:
            raise ValueError(f'SceneGenerator: widths needs an even number (>= 2) of layer '
                             f'widths, got {len(widths)}: {widths}')
        layers = OrderedDict()
        layers['layer1'] = LatentBlock(zdim, widths[0])
        for i in range(1, len(widths)):
            layers[f'layer{i + 1}'] = ConvBlock(widths[i - 1], widths[i], upsample=(i % 2 == 0))
        out = OrderedDict(conv=nn.Conv2d(widths[-1], 3, 1), tanh=nn.Tanh())
        layers['output'] = nn.Sequential(out)
        super().__init__(layers)
        self.zdim = zdim
        self.widths = widths
        self.resolution = 4 * 2 ** (len(widths) // 2 - 1)

    def sample_z(self, n, seed=0):
        """Reproducible latents (n, zdim) float32 on the CPU; the first k are the same for
        any n >= k."""
        return torch.from_numpy(numpy.random.RandomState(seed).standard_normal(
            (n, self.zdim)).astype('float32'))

    def layer_resolutions(self):
        """{'layer1': 4, ...}: the spatial size of each layer's output."""
        return {f'layer{i + 1}': 4 * 2 ** (i // 2) for i in range(len(self.widths))}

    def config(self):
        return dict(zdim=self.zdim, widths=list(self.widths))


class SceneDiscriminator(nn.Module):
    """images (N, 3, 64, 64) -> scores (N,). Spectral-normalised strided convolutions and a
    minibatch standard-deviation feature (ProGAN) over groups of ``group`` consecutive
    samples, which keeps the generator from collapsing to a few images. ``spectral_norm=False``
    leaves the convolutions free (for training with an R1 penalty instead)."""

    def __init__(self, widths=(24, 48, 96, 192), resolution=64, group=4, spectral_norm=True):
        super().__init__()
        sn = nn.utils.spectral_norm if spectral_norm else (lambda m: m)
        layers = [sn(nn.Conv2d(3, widths[0], 3, padding=1)), nn.LeakyReLU(0.2)]
        cin = widths[0]
        res = resolution
        for w in widths:
            layers += [sn(nn.Conv2d(cin, w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            cin = w
            res //= 2
        self.features = nn.Sequential(*layers)
        self.group = group
        self.final = sn(nn.Conv2d(cin + 1, cin, 3, padding=1))
        self.head = sn(nn.Linear(cin * res * res, 1))

    def forward(self, x):
        h = self.features(x)
        n, c, hh, ww = h.shape
        g = self.group if n % self.group == 0 else 1
        std = h.view(n // g, g, c, hh, ww).var(1, unbiased=False).add(1e-8).sqrt().mean([1, 2, 3])
        std = std.repeat_interleave(g).view(n, 1, 1, 1).expand(n, 1, hh, ww)
        h = F.leaky_relu(self.final(torch.cat([h, std], 1)), 0.2)
        return self.head(h.flatten(1))[:, 0]


def load_generator(device='cpu', checkpoint=None):
    """The shipped SceneWorld generator (or the state_dict at ``checkpoint``), in eval mode
    with ``requires_grad`` False on its parameters; architecture from the ``.json`` record
    next to the weights (keys ``zdim`` and ``widths``), else the defaults."""
    from .shipped import load_shipped
    return load_shipped('generator', lambda c: SceneGenerator(zdim=c.get('zdim', ZDIM),
                                                              widths=c.get('widths', DEFAULT_WIDTHS)),
                        device, checkpoint, 'train_gan')
