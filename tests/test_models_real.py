"""Real generator families: random weights saved in the real layouts, loaded back through the registry."""
import argparse
import json
import pickle
import sys

import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.checkpoint import CheckpointError
from gandissect_widgets.models import adapt_generator
from gandissect_widgets.models.stylegan2 import upfirdn2d

from tiny_real import tiny_progan, tiny_stylegan2, write_nvidia_standin


def _same_prefix(G):
    assert torch.equal(G.sample_z(5, 3)[:2], G.sample_z(2, 3))
    assert not torch.equal(G.sample_z(2, 3), G.sample_z(2, 4))


# -- ProGAN ----------------------------------------------------------------------------------

def test_progan_roundtrip_layers_and_latents(tmp_path):
    G = tiny_progan()
    path = tmp_path / "proggan_tiny.pth"
    torch.save(G.state_dict(), path)
    G2 = gw.load_generator("progan", checkpoint=str(path))
    assert isinstance(G2, nn.Sequential)
    names = [n for n, _ in G2.named_children()]
    assert names == [f"layer{i}" for i in range(1, 9)] + ["output_32x32"]
    z = G.sample_z(3, 0)
    assert z.shape == (3, 16)
    x = G2(z)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x, G(z))
    _same_prefix(G2)
    with gw.TraceDict(G2, ["layer2", "layer4", "layer8"]) as tr:
        G2(z)
    assert [tuple(tr[n].output.shape) for n in ("layer2", "layer4", "layer8")] == \
        [(3, 16, 4, 4), (3, 16, 8, 8), (3, 8, 32, 32)]
    assert float(x.detach().abs().max()) > 0  # unclamped: values are whatever the weights give


def test_progan_old_layout_and_state_dict_wrapper(tmp_path):
    G = tiny_progan()
    old = {}
    for k, v in G.state_dict().items():
        if k.startswith("layer"):
            i, rest = k[len("layer"):].split(".", 1)
            old[f"features.{int(i) - 1}.{rest}"] = v
        else:
            old["output." + k.split(".", 1)[1]] = v
    path = tmp_path / "old.pth"
    torch.save({"state_dict": old}, path)
    G2 = gw.load_generator("progan", checkpoint=path)
    z = G.sample_z(2, 1)
    assert torch.equal(G2(z), G(z))


def test_progan_missing_and_foreign_keys(tmp_path):
    sd = tiny_progan().state_dict()
    del sd["layer3.wscale.b"]
    sd["layer3.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        gw.load_generator("progan", checkpoint=tmp_path / "bad.pth")
    assert "missing keys: layer3.wscale.b" in str(e.value) and "unexpected keys: layer3.extra" in str(e.value)
    torch.save({"g_ema": {"style.1.weight": torch.zeros(2, 2)}}, tmp_path / "sg.pt")
    with pytest.raises(CheckpointError, match="GAN Dissection layout"):
        gw.load_generator("progan", checkpoint=tmp_path / "sg.pt")


def test_progan_names_and_arguments():
    from gandissect_widgets.models.progan import PROGAN_CHECKPOINTS, PROGAN_URL
    assert set(PROGAN_CHECKPOINTS) == {"bedroom", "churchoutdoor", "conferenceroom", "diningroom", "kitchen",
                                       "livingroom", "restaurant", "celebhq"}
    assert PROGAN_URL + PROGAN_CHECKPOINTS["churchoutdoor"] == \
        "https://dissect.csail.mit.edu/models/proggan_churchoutdoor-7e701dd5.pth"
    with pytest.raises(KeyError, match="churchoutdoor"):
        gw.load_generator("progan", name="church")
    with pytest.raises(ValueError, match="checkpoint=PATH or name="):
        gw.load_generator("progan")


# -- StyleGAN2 -------------------------------------------------------------------------------

def test_stylegan2_rosinality_roundtrip(tmp_path):
    G = tiny_stylegan2()
    w_avg = torch.randn(16) * 0.1
    path = tmp_path / "stylegan2-tiny.pt"
    torch.save({"g_ema": G.state_dict(), "latent_avg": w_avg, "args": argparse.Namespace(size=32, latent=16)}, path)
    G2 = gw.load_generator("stylegan2", checkpoint=str(path), truncation=0.7)
    G.truncation, G.w_avg = 0.7, w_avg
    z = G2.sample_z(3, 0)
    x = G2(z)
    assert x.shape == (3, 3, 32, 32) and float(x.detach().abs().max()) <= 1
    assert torch.allclose(x, G(z), atol=1e-6) and torch.equal(G2(z), x)  # constant noise: deterministic
    _same_prefix(G2)
    layers = dict(G2.named_modules())
    names = ["conv1", "to_rgb1"] + [f"convs.{i}" for i in range(6)] + [f"to_rgbs.{i}" for i in range(3)]
    assert all(n in layers for n in names)
    with gw.TraceDict(G2, names) as tr:
        G2(z)
    shapes = {n: tuple(tr[n].output.shape) for n in names}
    assert shapes["conv1"] == (3, 16, 4, 4) and shapes["convs.0"] == (3, 16, 8, 8)
    assert shapes["convs.5"] == (3, 8, 32, 32) and shapes["to_rgbs.2"] == (3, 3, 32, 32)


def test_stylegan2_truncation_without_latent_avg(tmp_path):
    G = tiny_stylegan2()
    torch.save({"g_ema": G.state_dict()}, tmp_path / "g.pt")
    G2 = gw.load_generator("stylegan2", checkpoint=tmp_path / "g.pt", truncation=0.5)
    assert float(G2.w_avg.abs().sum()) > 0
    G1 = gw.load_generator("stylegan2", checkpoint=tmp_path / "g.pt")
    z = G1.sample_z(2, 0)
    assert torch.allclose(G1(z), G(z), atol=1e-6) and not torch.allclose(G2(z), G1(z))
    assert G1.fingerprint != G2.fingerprint


def test_stylegan2_layout_errors(tmp_path):
    torch.save({"generator": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'g_ema'"):
        gw.load_generator("stylegan2", checkpoint=tmp_path / "x.pt")
    sd = tiny_stylegan2().state_dict()
    del sd["convs.3.noise.weight"]
    torch.save({"g_ema": sd}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="missing keys: convs.3.noise.weight"):
        gw.load_generator("stylegan2", checkpoint=tmp_path / "y.pt")


def test_upfirdn2d_upsample_preserves_constants_and_matches_loop():
    from gandissect_widgets.models.stylegan2 import Upsample
    up = Upsample([1, 3, 3, 1])
    x = torch.ones(1, 2, 5, 5)
    y = up(x)
    assert y.shape == (1, 2, 10, 10) and torch.allclose(y[:, :, 2:-2, 2:-2], torch.ones(1, 2, 6, 6))
    # definition: zero-insert, pad, correlate with the flipped kernel
    x = torch.randn(1, 1, 4, 4)
    k = torch.randn(3, 3)
    out = upfirdn2d(x, k, up=2, pad=(1, 1))
    z = torch.zeros(1, 1, 8, 8)
    z[:, :, ::2, ::2] = x
    z = torch.nn.functional.pad(z, [1, 1, 1, 1])
    ref = torch.nn.functional.conv2d(z, torch.flip(k, [0, 1])[None, None])
    assert torch.allclose(out, ref, atol=1e-6)


def test_nvidia_pickle_needs_trust_and_nvidia_code(tmp_path, monkeypatch):
    pkl = tmp_path / "network.pkl"
    pkl.write_bytes(b"not read")
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        gw.load_generator("stylegan2", checkpoint=pkl)
    monkeypatch.setattr(sys, "path", [p for p in sys.path])
    for m in ("dnnlib", "torch_utils"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    import importlib.util
    if importlib.util.find_spec("dnnlib") is None:
        with pytest.raises(ImportError, match="dnnlib"):
            gw.load_generator("stylegan2", checkpoint=pkl, trust_pickle=True)
    # a stand-in for NVIDIA's code: torch_utils defines the pickled class, dnnlib exists
    write_nvidia_standin(tmp_path, "fakenet")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from torch_utils.fakenet import G as FakeG
        g = FakeG()
        with open(pkl, "wb") as f:
            pickle.dump({"G_ema": g}, f)
        G = gw.load_generator("stylegan2", checkpoint=pkl, trust_pickle=True)
        z = G.sample_z(2, 0)
        assert torch.allclose(G(z), g.synthesis(g.mapping(z, None), noise_mode="const", force_fp32=True))
        assert "synthesis.b4" in dict(G.named_modules())
    finally:
        for m in ("dnnlib", "torch_utils", "torch_utils.fakenet"):
            sys.modules.pop(m, None)


# -- BigGAN ----------------------------------------------------------------------------------

def test_biggan_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_pretrained_biggan", None)
    with pytest.raises(ImportError, match=r"gandissect-widgets\[biggan\]"):
        gw.load_generator("biggan", checkpoint="anywhere")


def test_biggan_tiny_config_roundtrip(tmp_path):
    import pytorch_pretrained_biggan as pkg  # the test extra installs it (and scipy, which it imports): no skip
    config = dict(output_dim=32, z_dim=8, class_embed_dim=8, channel_width=4, num_classes=10,
                  layers=[[False, 16, 16], [True, 16, 8], [True, 8, 4], [True, 4, 2], [False, 2, 1]],
                  attention_layer_position=2, eps=1e-4, n_stats=51)
    torch.manual_seed(0)
    model = pkg.BigGAN(pkg.BigGANConfig.from_dict(config)).eval()
    with torch.no_grad():  # every float tensor set here: the package leaves some uninitialised (NaN at times)
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if not b.is_floating_point():
                continue
            if "running_means" in name:
                b.normal_(0, 0.1)
            elif "running_vars" in name:
                b.uniform_(0.5, 1.5)
            else:
                b.normal_(0, 1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    G = gw.load_generator("biggan", checkpoint=str(tmp_path), classes=[3, 7], truncation=0.5)
    z = G.sample_z(4, 0)
    assert z.shape == (4, 18) and set(z[:, 8:].argmax(1).tolist()) <= {3, 7}
    _same_prefix(G)
    assert float(z[:, :8].abs().max()) <= 2 * 0.5
    with torch.no_grad():
        x = G(z)
        ref = model(z[:, :8], z[:, 8:], 0.5)
    assert torch.isfinite(ref).all()
    assert x.shape == (4, 3, 32, 32) and torch.allclose(x, ref, atol=1e-6)
    assert "generator.layers.3" in dict(G.named_modules())
    with pytest.raises(ValueError, match="classes"):
        gw.load_generator("biggan", checkpoint=str(tmp_path), classes=[10])


# -- adapter ---------------------------------------------------------------------------------

class _OwnGAN(nn.Module):
    """A user's module: images in [0,1], a forward with an extra argument."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4 * 4 * 4)
        self.block = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, z, gain=1.0):
        return torch.sigmoid(self.block(self.fc(z).view(-1, 4, 4, 4)) * gain * self.scale)


def test_adapter_keeps_layer_names_and_maps_range():
    m = _OwnGAN()
    G = adapt_generator(m, zdim=6, forward=lambda mod, z: mod(z, gain=2.0), output_range=(0, 1))
    assert [n for n, _ in G.named_modules() if n] == [n for n, _ in m.named_modules() if n]
    assert dict(G.named_parameters()).keys() == dict(m.named_parameters()).keys()
    z = G.sample_z(3, 0)
    x = G(z)
    assert torch.allclose(x, m(z, gain=2.0) * 2 - 1) and float(x.detach().min()) >= -1
    _same_prefix(G)
    d = gw.dissect(G, _TwoClass(), ["block.1"], n_samples=8, batch_size=4, progress=False)
    assert d.iou("block.1").shape == (3, 2)
    G.eval()
    assert not m.training


class _TwoClass:
    labels = ["-", "bright"]

    def __call__(self, x):
        return (x.mean(1) > 0).long()


def test_adapter_rejects_bad_sample_z():
    m = _OwnGAN()
    with pytest.raises(ValueError, match="first k latents"):
        adapt_generator(m, sample_z=lambda n, seed: torch.randn(n, 6))
    with pytest.raises(ValueError, match="exactly one"):
        adapt_generator(m)
