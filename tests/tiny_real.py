"""Small random-weight versions of the real architectures, saved in their real on-disk layouts."""
import json
import os

import torch
from torch import nn

from gandissect_widgets.models.progan import ProgressiveGenerator
from gandissect_widgets.models.stylegan2 import StyleGAN2Generator
from gandissect_widgets.segmenters.csail_ade import PPMDeepsup
from gandissect_widgets.segmenters.resnet import DeepStemResNet
from gandissect_widgets.segmenters.upernet import UnifiedParsingSegmenter, UPerNet

PROGAN_SIZES = [16, 16, 16, 8, 8]  # zdim 16; 4x4, 8x8, 16x16, 32x32 -> layer1..layer8, output_32x32

UPP_LABELS = {
    "object": ["-", "sky", "building", "person", "tree", "window", "door", "glass"],
    "material": ["-", "wood", "glass", "brick"],
    "scene": ["street", "bedroom", "forest"],
    "part": ["window", "door", "roof", "cloud", "head", "arm"],
    "object_part": {"building": ["window", "door", "roof"], "person": ["head", "arm"], "sky": ["cloud"],
                    "tree": ["trunk", "crown"]},
}


def randomize(module, seed=0):
    """Random parameters and BatchNorm statistics (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() <= 1 else 1.0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, nn.Conv2d) and m.weight.dim() == 4:
                fan_in = m.weight[0].numel()
                m.weight.mul_((2.0 / fan_in) ** 0.5)
    return module


def tiny_progan(seed=0):
    """Weights ~ N(0,1), as the He-scaled (WScale) layers of a trained ProGAN expect."""
    torch.manual_seed(seed)
    G = ProgressiveGenerator(sizes=PROGAN_SIZES)
    with torch.no_grad():
        for p in G.parameters():
            p.normal_()
    return G.eval()


def tiny_stylegan2(seed=0, truncation=1.0):
    torch.manual_seed(seed)
    G = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8},
                           truncation=truncation)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape))
    return G.eval()


def tiny_upp_parts(width=8, fpn_dim=16, seed=0):
    enc = DeepStemResNet(blocks=(3, 4, 6, 3), width=width)
    nr = {"object": len(UPP_LABELS["object"]), "material": len(UPP_LABELS["material"]),
          "scene": len(UPP_LABELS["scene"]), "part": sum(len(v) for v in UPP_LABELS["object_part"].values())}
    dec = UPerNet(nr, fc_dim=enc.out_channels[-1], fpn_inplanes=tuple(enc.out_channels), fpn_dim=fpn_dim,
                  ppm_dim=fpn_dim)
    randomize(enc, seed)
    randomize(dec, seed + 1)
    return enc.eval(), dec.eval()


def save_upp(folder, enc, dec, labels=UPP_LABELS, epoch=40):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "labels.json"), "w") as f:
        json.dump(labels, f)
    torch.save(enc.state_dict(), os.path.join(folder, f"encoder_epoch_{epoch}.pth"))
    torch.save(dec.state_dict(), os.path.join(folder, f"decoder_epoch_{epoch}.pth"))
    return folder


def tiny_upp(segsizes=None, **options):
    enc, dec = tiny_upp_parts()
    return UnifiedParsingSegmenter(enc, dec, UPP_LABELS, segsizes=segsizes, **options).eval()


def tiny_ade_parts(width=8, ppm_dim=16, num_class=150, seed=0):
    enc = DeepStemResNet(blocks=(3, 4, 6, 3), width=width, dilate_scale=8)
    dec = PPMDeepsup(num_class, fc_dim=enc.out_channels[-1], ppm_dim=ppm_dim)
    randomize(enc, seed)
    randomize(dec, seed + 1)
    return enc.eval(), dec.eval()


NVIDIA_STANDIN = """
import torch
from torch import nn
class Mapping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
    def forward(self, z, c, truncation_psi=1):
        return self.fc(z)[:, None].repeat(1, 2, 1) * truncation_psi
class Synthesis(nn.Module):
    def __init__(self):
        super().__init__()
        self.b4 = nn.Linear(8, 3 * 16)
    def forward(self, ws, noise_mode='random', force_fp32=False):
        assert noise_mode == 'const' and force_fp32
        return torch.tanh(self.b4(ws[:, 0]).view(-1, 3, 4, 4))
class G(nn.Module):
    z_dim, c_dim, img_resolution = 8, 0, 4
    def __init__(self):
        super().__init__()
        self.mapping, self.synthesis = Mapping(), Synthesis()
"""


def write_nvidia_standin(root, module: str):
    """A stand-in for NVIDIA's code under ``root``: ``dnnlib`` exists and ``torch_utils.<module>``
    defines a tiny StyleGAN-like ``G`` (what their pickles need on the path)."""
    for pkg in ("dnnlib", "torch_utils"):
        os.makedirs(os.path.join(root, pkg), exist_ok=True)
        open(os.path.join(root, pkg, "__init__.py"), "w").close()
    with open(os.path.join(root, "torch_utils", f"{module}.py"), "w") as f:
        f.write(NVIDIA_STANDIN)
