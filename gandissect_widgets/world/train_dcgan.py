"""Train the small tutorial-style DCGAN of ``notebooks/your_own_gan.ipynb`` on SceneWorld renders.

    python -m gandissect_widgets.world.train_dcgan --minutes 22 --threads 1 --batch-size 32 --out gandissect_widgets/world/weights

The model is the PyTorch DCGAN tutorial's generator scaled down to 32x32 images: an
``nn.Sequential`` of transposed convolutions, BatchNorm and in-place ReLUs (``build_dcgan``; the
notebook writes the same code itself, as a user would, and loads these weights into it).  Training
is the tutorial's too (BCE loss, Adam 2e-4, beta1 0.5) on ``--data`` renders of world seed 2000 at
32x32, for ``--minutes`` of wall time (the shipped weights: the command above, 6038 steps on a busy
2-core machine; one torch thread trains faster than two there).  It writes ``dcgan32.pt`` (float16 state_dict, weights only)
and ``dcgan32.json`` (command, seed, data size, steps, wall time, machine and quality: a Fréchet
distance in the shipped segmenter's feature space against held-out renders, and the label
frequencies of samples against renders, both with images upsampled to 64x64).
"""
import argparse
import os
import time

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from ._training import atomic_torch_save, command_line, machine_info, write_record
from .render import LABELS, render, to_tensor

NZ, NGF, NDF = 32, 32, 32


def build_dcgan(nz=NZ, ngf=NGF):
    """The tutorial's generator at 32x32: z (N, nz, 1, 1) -> images (N, 3, 32, 32) in [-1, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),     # 4x4
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 8x8
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 16x16
        nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())                                 # 32x32


def build_discriminator(ndf=NDF):
    return nn.Sequential(
        nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False))


def _init(m):  # the tutorial's weight init
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def quality(G, n=1000, seed=777):
    """Fréchet distance (shipped segmenter's features) and label-frequency L1 of ``n`` samples
    against ``n`` renders of world seed ``seed``, all at 64x64."""
    from ..engine.frechet import feature_stats, frechet_distance, segmenter_features
    from .segmenter import load_segmenter
    S = load_segmenter()
    feat = segmenter_features(S)
    real = to_tensor(render(n, seed=seed, size=64)[0])
    z = torch.from_numpy(numpy.random.RandomState(1).standard_normal((n, NZ, 1, 1)).astype(numpy.float32))
    with torch.no_grad():
        fake = F.interpolate(G.eval()(z), size=64, mode="bilinear", align_corners=False).clamp(-1, 1)
        freq = [torch.bincount(S(x).reshape(-1), minlength=len(LABELS)).double() for x in (real, fake)]
    freq = [f / f.sum() for f in freq]
    fd = frechet_distance(*feature_stats(feat(fake).numpy()), *feature_stats(feat(real).numpy()))
    return dict(frechet_segmenter_features=round(fd, 4), label_frequency_l1=round(float((freq[0] - freq[1]).abs().sum()), 4),
                label_frequency_samples={LABELS[i]: round(float(v), 4) for i, v in enumerate(freq[1])},
                label_frequency_renders={LABELS[i]: round(float(v), 4) for i, v in enumerate(freq[0])},
                n=n, world_seed=seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"))
    p.add_argument("--minutes", type=float, default=22.0, help="wall time to train for")
    p.add_argument("--data", type=int, default=20000, help="renders to train on (world seed 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    data = to_tensor(render(a.data, seed=2000, size=32)[0])
    G, D = build_dcgan(), build_discriminator()
    G.apply(_init)
    D.apply(_init)
    opt_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(a.seed)
    bce = nn.BCEWithLogitsLoss()
    step, t_train = 0, time.time()
    while time.time() - t_train < a.minutes * 60:
        real = data[torch.randint(0, a.data, (a.batch_size,), generator=gen)]
        z = torch.randn(a.batch_size, NZ, 1, 1, generator=gen)
        fake = G(z)
        ones, zeros = torch.ones(a.batch_size), torch.zeros(a.batch_size)
        loss_d = bce(D(real).view(-1), ones) + bce(D(fake.detach()).view(-1), zeros)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(D(fake).view(-1), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f} "
                  f"{time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train
    os.makedirs(a.out, exist_ok=True)
    G.eval()
    atomic_torch_save({k: v.detach().half() for k, v in G.state_dict().items()}, os.path.join(a.out, "dcgan32.pt"))
    G.load_state_dict({k: v.float() for k, v in torch.load(os.path.join(a.out, "dcgan32.pt"), weights_only=True).items()})
    record = dict(what="tutorial-style DCGAN generator at 32x32 (float16 state_dict of build_dcgan(): "
                       "nn.Sequential, in-place ReLUs), for notebooks/your_own_gan.ipynb",
                  command=command_line(), seed=a.seed, data=dict(renders=a.data, world_seed=2000, size=32),
                  batch_size=a.batch_size, steps=step, training_seconds=round(train_s, 1),
                  total_seconds=round(time.time() - t0, 1), loss="BCE (DCGAN tutorial), Adam 2e-4 beta1 0.5",
                  nz=NZ, ngf=NGF, ndf=NDF, machine=machine_info(), quality=quality(G))
    write_record(os.path.join(a.out, "dcgan32.json"), record)
    print(record["quality"]["frechet_segmenter_features"], record["quality"]["label_frequency_l1"])


if __name__ == "__main__":
    main()
