"""The layers a user can dissect: feature maps, nested ones included, in forward order (issue 19 item 7).

The DCGAN-style generator below is the case the issue met: an ``nn.Sequential`` ``main`` (with a
nested Sequential and in-place ReLUs) whose own output is the image, so listing the top-level
modules showed only ``main (3, 16, 16)``."""
import numpy as np
import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.cli import main
from gandissect_widgets.engine.interventions import Intervention, render
from gandissect_widgets.engine.layer_listing import describe_output, feature_maps, module_outputs, probe_layers
from gandissect_widgets.engine.protocols import ProtocolError
from gandissect_widgets.models import adapt_generator
from gandissect_widgets.registry import GENERATORS
from tiny import TinyGenerator, TinySegmenter


class DCGAN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.main = nn.Sequential(
            nn.ConvTranspose2d(8, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(True),      # 4x4
            nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True)),  # 8x8
            nn.ConvTranspose2d(8, 3, 4, 2, 1, bias=False), nn.Tanh())                                # 16x16 image

    def forward(self, z):
        return self.main(z)


def dcgan():
    return adapt_generator(DCGAN().eval(), zdim=(8, 1, 1))


EXPECTED = [("main.0", (16, 4, 4)), ("main.1", (16, 4, 4)), ("main.2", (16, 4, 4)), ("main.3", (8, 8, 8)),
            ("main.4", (3, 16, 16)), ("main.5", (3, 16, 16))]


def test_feature_maps_of_a_nested_sequential():
    G = dcgan()
    assert feature_maps(G) == EXPECTED
    # every module that runs, for --all: the wrapper and the nested block's parts too, in module order
    names = [n for n, _ in module_outputs(G)]
    assert names[:2] == ["main", "main.0"] and "main.3.1" in names
    assert dict(module_outputs(G))["main"] == (3, 16, 16)


def test_blocks_that_are_feature_maps_are_listed_whole():
    assert feature_maps(TinyGenerator()) == [("layer1", (6, 4, 4)), ("layer2", (5, 8, 8)), ("layer3", (4, 16, 16)),
                                              ("output", (3, 16, 16))]


class Branchy(nn.Module):
    """Modules declared out of forward order, a ModuleList that never runs itself, a tuple output."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 3, 1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.early = nn.Linear(2, 4 * 4 * 4)

    def forward(self, z):
        x = self.early(z).view(-1, 4, 4, 4)
        for b in self.blocks:
            x = b(x)
        return torch.tanh(self.late(x))

    def sample_z(self, n, seed=0):
        return torch.from_numpy(np.random.RandomState(seed).standard_normal((n, 2)).astype("float32"))


def test_forward_order_and_containers_that_do_not_run():
    assert feature_maps(Branchy()) == [("blocks.0", (4, 4, 4)), ("blocks.1", (4, 4, 4)), ("late", (3, 4, 4))]


def test_session_layers_lists_the_feature_maps():
    s = gw.Session(dcgan(), TinySegmenter(), device="cpu")
    assert s.layers() == [n for n, _ in EXPECTED]


def test_cli_layers_shows_the_feature_maps(capsys):
    GENERATORS.register("listing-dcgan", lambda device="cpu": dcgan().to(device), overwrite=True)
    try:
        assert main(["layers", "--generator", "listing-dcgan", "--device", "cpu"]) == 0
        rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
        assert [r[0] for r in rows] == [n for n, _ in EXPECTED]
        assert rows[3][1] == "(8, 8, 8)"
        assert main(["layers", "--generator", "listing-dcgan", "--device", "cpu", "--all"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["main", "(3,", "16,", "16)"] and len(out) == 10
    finally:
        GENERATORS.unregister("listing-dcgan")


class TupleLayer(nn.Module):
    def forward(self, x):
        return x, x.mean()


def test_api_names_what_a_layer_outputs():
    """dissect() says what the layer gave ("a tuple of 2 tensors"), as the command line's probe does."""
    G = TinyGenerator()
    G.layer2 = nn.Sequential(G.layer2, TupleLayer())
    G.layer3.forward = lambda x, f=G.layer3.forward: f(x[0])
    with pytest.raises(ProtocolError, match=r"layer 'layer2' outputs a tuple of 2 tensors; dissection needs"):
        gw.dissect(G, TinySegmenter(), ["layer2"], n_samples=8, batch_size=4, progress=False)
    assert describe_output(torch.zeros(1, 8)) == "a tensor of shape (1, 8)"
    assert describe_output([torch.zeros(1), 3]) == "a list of 2 items"
    assert describe_output(None) == "None" and describe_output({"a": 1}) == "a dict"


class Reused(nn.Module):
    """One module run twice on inputs of different shapes (so its last output is not its first),
    declared after the layer that runs first, and a layer that never runs."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 1)
        self.first = nn.Linear(2, 4 * 2 * 2)
        self.idle = nn.Conv2d(4, 4, 1)

    def forward(self, z):
        x = self.shared(self.first(z).view(-1, 4, 2, 2))
        x = self.shared(torch.nn.functional.interpolate(x, scale_factor=2.0))
        return torch.tanh(x[:, :3])

    def sample_z(self, n, seed=0):
        return torch.from_numpy(np.random.RandomState(seed).standard_normal((n, 2)).astype("float32"))


def test_probe_layers_gives_order_shapes_kinds_and_bytes():
    """The one probe of a forward (dissection, interventions, CLI): execution order by first finish,
    the last output (the one a trace retains), what it is in words, bytes per sample."""
    torch.manual_seed(0)
    G = Reused()
    p = probe_layers(G, ["idle", "shared", "first"], G.sample_z(3, 0))
    assert p.order == ["first", "shared"] and "idle" not in p.layers  # z[:1]: one sample; idle never ran
    assert p.layers["first"].order == 0 and p.layers["shared"].order == 1
    assert p.layers["shared"].shape == (1, 4, 4, 4) and p.layers["first"].shape == (1, 16)
    assert p.layers["shared"].sample_bytes == 4 * 4 * 4 * 4 and p.layers["first"].sample_bytes == 16 * 4
    assert p.layers["shared"].kind == "a tensor of shape (1, 4, 4, 4)"
    assert tuple(p.output.shape) == (1, 3, 4, 4) and p.model == "Reused"
    assert p.map_shapes(["shared"]) == {"shared": (4, 4, 4)}
    with pytest.raises(ProtocolError, match="layer 'idle' did not run in a forward pass of Reused"):
        p.map_shapes(["shared", "idle"])
    with pytest.raises(ProtocolError, match=r"layer 'first' outputs a tensor of shape \(1, 16\); dissection needs a "
                                            r"convolutional feature map \(N,C,h,w\)"):
        p.map_shapes(["first"])
    # default: every module, one sample of G.sample_z(1, 0); the listing reads the last output too
    assert probe_layers(G).order == ["first", "shared"]
    assert dict(module_outputs(G)) == {"shared": (4, 4, 4), "first": (16,)}


def test_probe_names_outputs_that_are_not_tensors():
    G = TinyGenerator()
    G.layer2 = nn.Sequential(G.layer2, TupleLayer())
    G.layer3.forward = lambda x, f=G.layer3.forward: f(x[0])
    p = probe_layers(G, ["layer2", "layer3", "layer2.1"])
    out = p.layers["layer2"]
    assert out.shape is None and out.kind == "a tuple of 2 tensors" and out.type_name == "tuple"
    assert out.sample_bytes == 0 and p.order == ["layer2.1", "layer2", "layer3"]
    assert dict(module_outputs(G))["layer2"] == "tuple"


def test_region_interventions_at_two_layers_get_their_grids_from_one_probe():
    """render() pools a region to each edited layer's grid, with shapes from the probe; a layer
    whose output is no feature map is one clear error."""
    G = TinyGenerator()
    z = G.sample_z(2, 0)
    region = torch.zeros(16, 16)
    region[:8, :8] = 1
    ivs = [Intervention("layer2", [0], "ablate", region=region), Intervention("layer3", [1], "ablate", region=region)]
    out = render(G, z, ivs)
    edits = [iv.to_edit(shape, (16, 16)) for iv, shape in zip(ivs, [(5, 8, 8), (4, 16, 16)])]
    assert torch.equal(out, render(G, z, edits))
    assert not torch.equal(out, render(G, z))
    G.layer2 = nn.Sequential(G.layer2, TupleLayer())
    G.layer3.forward = lambda x, f=G.layer3.forward: f(x[0])
    with pytest.raises(ProtocolError, match="layer 'layer2' outputs a tuple of 2 tensors; an intervention in a "
                                            "region needs"):
        render(G, z, ivs)
