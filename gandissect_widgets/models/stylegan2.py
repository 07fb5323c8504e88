"""StyleGAN2 in the layout of rosinality's stylegan2-pytorch (``g_ema`` in a ``.pt``), in pure torch.

Layer names (stable, the same as the checkpoint's keys), for a model of resolution 2**L:

    style            the mapping network (PixelNorm + n_mlp EqualLinear), z -> w
    conv1            4x4 synthesis conv                      (N, C4, 4, 4)
    to_rgb1          4x4 RGB                                 (N, 3, 4, 4)
    convs.{2k}       upsampling conv to 2**(k+3)             (N, C, 2**(k+3), 2**(k+3))
    convs.{2k+1}     conv at the same resolution             (N, C, 2**(k+3), 2**(k+3))
    to_rgbs.{k}      RGB skip output at 2**(k+3)             (N, 3, ...)

k = 0 .. L-3.  Noise is the fixed ``noises.noise_i`` buffers (deterministic output), the output is
clamped to [-1,1], and ``truncation < 1`` pulls w towards ``w_avg`` (the checkpoint's ``latent_avg``,
else the mean of 4096 mapped latents of seed 0).  The CUDA ops of the original (upfirdn2d, fused
leaky ReLU) are written here in plain torch, so CPU and GPU give the same result.

NVIDIA stylegan2-ada / stylegan3 pickles (``.pkl``) load only with NVIDIA's code importable
(``dnnlib``, ``torch_utils``) and ``trust_pickle=True``: unpickling runs code from the file.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gandissect_widgets.checkpoint import (TRUST_ADVICE, CheckpointError, UntrustedPickleError, load_strict,
                                          torch_load)

__all__ = ["StyleGAN2Generator", "NvidiaStyleGAN", "load_stylegan2", "stylegan2_from_state_dict", "upfirdn2d"]

LAYOUT = "rosinality stylegan2-pytorch g_ema"


# -- pure-torch replacements of the CUDA ops ----------------------------------------------------

def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Upsample by zero insertion, pad (negative = crop), FIR-filter with ``kernel``, downsample."""
    N, C, H, W = x.shape
    if up > 1:
        x = F.pad(x.reshape(N, C, H, 1, W, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(N, C, H * up, W * up)
    p0, p1 = pad
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    x = x[:, :, max(-p0, 0):x.shape[2] - max(-p1, 0), max(-p0, 0):x.shape[3] - max(-p1, 0)]
    kh, kw = kernel.shape
    w = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(C, 1, kh, kw)
    x = F.conv2d(x, w, groups=C)
    return x[:, :, ::down, ::down]


def fused_leaky_relu(x, bias, negative_slope=0.2, scale=2 ** 0.5):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


def make_kernel(k):
    k = torch.tensor(k, dtype=torch.float32)
    if k.dim() == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


# -- modules (names and parameters as in rosinality's model.py) ------------------------------------

class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    def __init__(self, kernel, factor=2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = len(kernel) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    def __init__(self, kernel, pad, upsample_factor=1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor ** 2)
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualLinear(nn.Module):
    def __init__(self, in_dim, out_dim, bias=True, bias_init=0, lr_mul=1, activation=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x):
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul if self.bias is not None else None)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True, upsample=False,
                 blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.kernel_size, self.in_channel, self.out_channel = kernel_size, in_channel, out_channel
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(list(blur_kernel), pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def forward(self, x, style):
        batch, cin, h, w = x.shape
        k = self.kernel_size
        style = self.modulation(style).view(batch, 1, cin, 1, 1)
        weight = self.scale * self.weight * style
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)
        x = x.reshape(1, batch * cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(batch * cin, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = self.blur(out.view(batch, self.out_channel, out.shape[2], out.shape[3]))
        else:
            weight = weight.view(batch * self.out_channel, cin, k, k)
            out = F.conv2d(x, weight, padding=self.padding, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image, noise):
        return image + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channel, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int):
        return self.input.repeat(batch, 1, 1, 1)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise):
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(list(blur_kernel))
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def default_channels(channel_multiplier=2):
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


class StyleGAN2Generator(nn.Module):
    """rosinality's StyleGAN2 generator with the protocol: ``G(z)`` -> images, ``G.sample_z(n, seed)``.

    channels: {resolution: width} for 4 .. size (default: rosinality's, with ``channel_multiplier``).
    truncation: psi in (0, 1]; 1 = none.  clamp: clamp the output to [-1, 1].
    """

    def __init__(self, size, style_dim=512, n_mlp=8, channel_multiplier=2, channels=None, blur_kernel=(1, 3, 3, 1),
                 lr_mlp=0.01, truncation=1.0, clamp=True):
        super().__init__()
        log_size = int(round(math.log2(size)))
        if size < 4 or 2 ** log_size != size:
            raise ValueError(f"StyleGAN2 size must be a power of 2 >= 4, got {size}")
        ch = dict(default_channels(channel_multiplier))
        ch.update(channels or {})
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp,
                                                              activation="fused_lrelu") for _ in range(n_mlp)])
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.num_layers = (log_size - 2) * 2 + 1
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i in range(self.num_layers):
            res = (i + 5) // 2
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, 2 ** res, 2 ** res))
        cin = ch[4]
        for i in range(3, log_size + 1):
            cout = ch[2 ** i]
            self.convs.append(StyledConv(cin, cout, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(cout, cout, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(cout, style_dim, blur_kernel=blur_kernel))
            cin = cout
        self.n_latent = log_size * 2 - 2
        self.register_buffer("w_avg", torch.zeros(style_dim), persistent=False)
        self.truncation, self.clamp = float(truncation), clamp
        self.zdim = style_dim

    @property
    def fingerprint(self) -> str:
        """What the weights do not say: truncation, its w_avg, and clamping (for dissection caches)."""
        h = hashlib.sha256(self.w_avg.detach().cpu().float().numpy().tobytes()).hexdigest()[:12]
        return f"truncation={self.truncation};w_avg={h};clamp={self.clamp}"

    def mapping(self, z):
        """w for latents z, truncated towards ``w_avg`` when ``truncation < 1``."""
        w = self.style(z)
        if self.truncation < 1:
            w = self.w_avg + self.truncation * (w - self.w_avg)
        return w

    def synthesis(self, w):
        """Images from w (N, style_dim) or per-layer ws (N, n_latent, style_dim)."""
        latent = w if w.dim() == 3 else w[:, None].expand(-1, self.n_latent, -1)
        noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        out = self.conv1(self.input(latent.shape[0]), latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, n1, n2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                self.to_rgbs):
            out = conv1(out, latent[:, i], n1)
            out = conv2(out, latent[:, i + 1], n2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip.clamp(-1, 1) if self.clamp else skip

    def forward(self, z):
        return self.synthesis(self.mapping(z))

    @torch.no_grad()
    def compute_w_avg(self, n=4096, seed=0):
        """Set ``w_avg`` to the mean w of ``n`` latents of ``seed`` (when the checkpoint has none)."""
        z = torch.from_numpy(np.random.RandomState(seed).standard_normal((n, self.style_dim)).astype(np.float32))
        self.w_avg.copy_(self.style(z.to(self.w_avg.device)).mean(0))
        return self.w_avg

    def sample_z(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` latents from ``numpy.random.RandomState(seed)``: the first k are the same for any n >= k."""
        z = np.random.RandomState(seed).standard_normal((n, self.style_dim)).astype(np.float32)
        return torch.from_numpy(z).to(self.w_avg.device)


def _arch_from_state_dict(sd):
    need = ["style.1.weight", "input.input", "conv1.conv.weight", "to_rgb1.conv.weight"]
    if any(k not in sd for k in need):
        raise CheckpointError(f"not a {LAYOUT} state dict: it lacks {[k for k in need if k not in sd]} "
                              f"(first keys: {', '.join(list(sd)[:8])})")
    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    n_rgb = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
    size = 2 ** (n_rgb + 2)
    channels = {4: int(sd["input.input"].shape[1])}
    for k in range(n_rgb):
        w = sd.get(f"convs.{2 * k}.conv.weight")
        if w is None:
            raise CheckpointError(f"{LAYOUT}: to_rgbs.{k} has no matching convs.{2 * k}.conv.weight")
        channels[2 ** (k + 3)] = int(w.shape[1])
    kern = sd.get("convs.0.conv.blur.kernel")
    blur = tuple([1] * kern.shape[0]) if kern is not None else (1, 3, 3, 1)  # values come from the buffer
    return dict(size=size, style_dim=int(sd["style.1.weight"].shape[1]), n_mlp=n_mlp, channels=channels,
                blur_kernel=blur)


def stylegan2_from_state_dict(sd, latent_avg=None, truncation=1.0, lr_mlp=0.01, clamp=True,
                              source="checkpoint") -> StyleGAN2Generator:
    """A ``StyleGAN2Generator`` built from (and strictly loaded with) a ``g_ema`` state dict."""
    G = StyleGAN2Generator(**_arch_from_state_dict(sd), lr_mlp=lr_mlp, truncation=truncation, clamp=clamp)
    load_strict(G, sd, LAYOUT, source)
    if latent_avg is not None:
        G.w_avg.copy_(torch.as_tensor(latent_avg).reshape(-1).float())
    elif truncation < 1:
        G.compute_w_avg()
    return G.eval()


def load_stylegan2(checkpoint=None, device="cpu", truncation=1.0, lr_mlp=0.01, clamp=True, trust_pickle=False,
                   class_index=None):
    """StyleGAN2 from rosinality's ``.pt`` (key ``g_ema``), or an NVIDIA ``.pkl`` with ``trust_pickle=True``."""
    if checkpoint is None:
        raise ValueError("StyleGAN2 needs checkpoint=PATH: a rosinality .pt (with 'g_ema') or an NVIDIA .pkl "
                         "(with trust_pickle=True); no StyleGAN2 file is registered by name")
    if not 0 < truncation <= 1:
        raise ValueError(f"truncation must be in (0, 1], got {truncation}")
    path = os.fspath(checkpoint)
    if path.endswith(".pkl"):
        return load_nvidia_pickle(path, trust_pickle, truncation, class_index).to(device)
    ckpt = torch_load(path, trust=trust_pickle, safe_globals=[argparse.Namespace])
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        found = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a rosinality StyleGAN2 checkpoint: expected a dict with a 'g_ema' "
                              f"state dict (and optionally 'latent_avg'); found {found}")
    G = stylegan2_from_state_dict(ckpt["g_ema"], ckpt.get("latent_avg"), truncation, lr_mlp, clamp, source=path)
    return G.to(device)


# -- NVIDIA pickles ----------------------------------------------------------------------------------

class NvidiaStyleGAN(nn.Module):
    """An NVIDIA stylegan2-ada / stylegan3 ``G_ema`` with the protocol.

    Layers are NVIDIA's own: ``synthesis.b8.conv0`` ... (stylegan2-ada), ``synthesis.L3_52_512`` ...
    (stylegan3), and ``mapping``.  Noise is constant (``noise_mode='const'``), computed in fp32.
    """

    def __init__(self, G, truncation=1.0, class_index=None):
        super().__init__()
        self.mapping, self.synthesis = G.mapping, G.synthesis
        self.z_dim, self.c_dim = int(G.z_dim), int(getattr(G, "c_dim", 0))
        self.truncation = float(truncation)
        if self.c_dim and class_index is None:
            raise ValueError(f"this generator is class-conditional ({self.c_dim} classes): pass class_index=")
        self.class_index = class_index

    @property
    def fingerprint(self) -> str:
        return f"truncation={self.truncation};class={self.class_index}"

    def forward(self, z):
        c = torch.zeros(z.shape[0], self.c_dim, device=z.device)
        if self.c_dim:
            c[:, self.class_index] = 1
        ws = self.mapping(z, c, truncation_psi=self.truncation)
        return self.synthesis(ws, noise_mode="const", force_fp32=True).clamp(-1, 1)

    def sample_z(self, n: int, seed: int = 0) -> torch.Tensor:
        z = np.random.RandomState(seed).standard_normal((n, self.z_dim)).astype(np.float32)
        return torch.from_numpy(z).to(next(self.parameters()).device)


def load_nvidia_pickle(path, trust_pickle=False, truncation=1.0, class_index=None) -> NvidiaStyleGAN:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{path} is a pickle (an NVIDIA stylegan2-ada/stylegan3 .pkl): it loads only with trust; {TRUST_ADVICE}")
    missing = [m for m in ("dnnlib", "torch_utils") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"loading NVIDIA pickle {path} needs NVIDIA's code importable; missing module(s) {missing}. Clone "
            "NVlabs/stylegan3 (or stylegan2-ada-pytorch) and add its folder to PYTHONPATH / sys.path.")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the user said they trust this file
    except ImportError as e:
        raise ImportError(f"NVIDIA pickle {path} needs module {getattr(e, 'name', None) or str(e)!r}, which is not "
                          "importable; add NVIDIA's code (stylegan3 or stylegan2-ada-pytorch) to PYTHONPATH") from e
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, IndexError, TypeError) as e:
        size = os.path.getsize(path)
        detail = "the file is empty" if size == 0 else f"{type(e).__name__}: {str(e).strip() or 'no detail'}"
        raise CheckpointError(f"cannot read NVIDIA pickle {path}: not a pickle (or truncated, or corrupted): "
                              f"{detail}; expected a network-snapshot .pkl written by NVIDIA's training code") from e
    G = data.get("G_ema") if isinstance(data, dict) else None
    if G is None:
        raise CheckpointError(f"{path} holds no 'G_ema' generator (keys: {list(data)[:10] if isinstance(data, dict) else type(data).__name__})")
    return NvidiaStyleGAN(G, truncation, class_index).eval()
