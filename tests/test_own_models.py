"""A researcher's own models: a PyTorch-tutorial DCGAN (in-place ReLUs after BatchNorms, a
Sequential inside a module), adapted with ``adapt_generator``, through traces, ``run_from`` and
dissection."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.engine.hooks import ThreadTraces, can_run_from, edit_layers, run_from
from gandissect_widgets.models import adapt_generator
from tiny import TinySegmenter


class TutorialGenerator(nn.Module):
    """The PyTorch DCGAN tutorial's generator, small: z (N,nz,1,1) -> (N,3,16,16)."""

    def __init__(self, nz=8, ngf=4, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, 3, 4, 2, 1, bias=False), nn.Tanh())
        self.main[6].weight.data *= 30  # images that use the range, as a trained model's do
        for m in self.modules():  # trained-looking BatchNorms: shifted, scaled, with running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, z):
        return self.main(z)


def tutorial(seed=0, **kw):
    return adapt_generator(TutorialGenerator(seed=seed).eval(), zdim=(8, 1, 1), **kw)


def out_of_place(G):
    """The same model with ReLU(inplace=False): what the layers really output."""
    H = copy.deepcopy(G)
    for m in H.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return H


def nested():
    torch.manual_seed(3)
    block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
    body = nn.Sequential(nn.Upsample(scale_factor=2), block, nn.Sequential(nn.Conv2d(6, 4, 3, padding=1),
                                                                         nn.LeakyReLU(0.2, inplace=True)))
    seq = nn.Sequential(nn.ConvTranspose2d(5, 6, 4), body, nn.Conv2d(4, 3, 1), nn.Sigmoid()).eval()
    return adapt_generator(seq, zdim=(5, 1, 1), output_range=(0, 1))


def test_traced_batchnorm_shows_its_own_values_before_the_inplace_relu():
    G = tutorial()
    H = out_of_place(G)
    z = G.sample_z(6, 0)
    with torch.no_grad(), gw.TraceDict(G, ["main.1", "main.2", "main.4"]) as tr, gw.TraceDict(H, ["main.1"]) as ref:
        x = G(z)
        H(z)
    bn = tr["main.1"].output
    assert bn.min() < -0.5  # a BatchNorm's output has negative values; the ReLU after it had zeroed them
    torch.testing.assert_close(bn, ref["main.1"].output, rtol=0, atol=0)
    torch.testing.assert_close(tr["main.2"].output, bn.clamp(min=0), rtol=0, atol=0)
    assert tr["main.4"].output.min() < 0 and x.shape == (6, 3, 16, 16)
    with torch.no_grad(), ThreadTraces(G, ["main.1", "main.4"]) as traces:
        for _ in range(3):  # the first forward copies, the later ones know they must
            _, outs = traces.run(lambda: G(z), ["main.1", "main.4"])
            torch.testing.assert_close(outs["main.1"], bn, rtol=0, atol=0)


def test_thread_traces_notice_a_write_that_starts_later():
    """A layer seen clean is kept uncopied; should a later module start writing into it, the
    forward is run again with a copy and the values are still the layer's own."""
    class Switch(nn.Module):
        inplace = False

        def forward(self, x):
            return x.mul_(0) if self.inplace else x * 0

    G = nn.Sequential(nn.Conv2d(2, 3, 1), Switch(), nn.Conv2d(3, 3, 1))
    z = torch.randn(2, 2, 4, 4)
    want = G[0](z).detach()
    with torch.no_grad(), ThreadTraces(G, ["0"]) as traces:
        assert torch.equal(traces.run(lambda: G(z), ["0"])[1]["0"], want)
        assert torch.equal(traces.run(lambda: G(z), ["0"])[1]["0"], want)  # kept uncopied now
        G[1].inplace = True
        assert torch.equal(traces.run(lambda: G(z), ["0"])[1]["0"], want)
        assert torch.equal(traces.run(lambda: G(z), ["0"])[1]["0"], want)


def test_dissection_of_inplace_model_equals_the_out_of_place_one():
    G = tutorial()
    H = out_of_place(G)
    S = TinySegmenter()
    kw = dict(n_samples=48, batch_size=8, progress=False, pilot_samples=16)
    d = gw.dissect(G, S, ["main.1", "main.2"], **kw)
    ref = gw.dissect(H, S, ["main.1", "main.2"], **kw)
    for layer in ("main.1", "main.2"):
        np.testing.assert_array_equal(d.thresholds(layer), ref.thresholds(layer))
        np.testing.assert_array_equal(d.iou(layer), ref.iou(layer))
    assert (d.thresholds("main.1") != d.thresholds("main.2")).any()
    assert (d.thresholds("main.1") < 0).any()  # units whose top 1% lies below 0: only the BatchNorm has them


@pytest.mark.parametrize("make,layers", [
    (tutorial, ["main.0", "main.1", "main.2", "main.4", "main.5", "main.6"]),
    (nested, ["0", "1", "1.0", "1.1", "1.1.0", "1.1.1", "1.2.0", "2"]),
])
def test_run_from_adapted_sequentials_equals_full_forward_with_the_same_edit(make, layers):
    G = make()
    z = G.sample_z(3, 1)
    for layer in layers:
        assert can_run_from(G, layer), layer
        with torch.no_grad(), gw.Trace(G, layer) as tr:
            G(z)
        r = tr.output
        kept = r.clone()
        edit = gw.Edit(layer, units=[0, 1], value=torch.tensor([2.0, -1.0]))
        with torch.no_grad():
            fast = run_from(G, layer, edit.apply(r))
            with edit_layers(G, [edit]):
                full = G(z)
            plain = run_from(G, layer, r)
        torch.testing.assert_close(fast, full, rtol=0, atol=0)
        torch.testing.assert_close(plain, G(z).detach(), rtol=0, atol=0)
        assert torch.equal(r, kept), f"run_from wrote into the activation of {layer}"  # in-place layers follow


def test_adapter_with_a_custom_forward_resumes_only_when_it_returns_the_module_output():
    inner = TutorialGenerator().eval()
    plain = adapt_generator(inner, zdim=8, forward=lambda m, z: m(z[:, :, None, None]))
    assert can_run_from(plain, "main.3")
    z = plain.sample_z(2, 0)
    with torch.no_grad(), gw.Trace(plain, "main.3") as tr:
        x = plain(z)
    torch.testing.assert_close(run_from(plain, "main.3", tr.output), x, rtol=0, atol=0)
    post = adapt_generator(inner, zdim=8, forward=lambda m, z: m(z[:, :, None, None]).flip(-1))
    assert not can_run_from(post, "main.3")  # what follows the module is unknown: full forwards
    with pytest.raises(ValueError, match="pass z="):
        run_from(post, "main.3", tr.output)


def test_causal_tools_run_from_the_layer_of_an_adapted_model():
    """render() re-runs only what follows the edited layer: after the one forward of one latent
    that shows the module returns its Sequential's output, the first layers never run."""
    from gandissect_widgets.engine.interventions import Intervention, layer_activation, render
    G = tutorial()
    z = G.sample_z(2, 0)
    act = layer_activation(G, z, "main.3")
    calls = []
    handle = G.main[0].register_forward_hook(lambda mod, i, o: calls.append(o.shape[0]))
    try:
        outs = [render(G, z, [Intervention("main.3", [u], "ablate")], activation=act, layer="main.3")
                for u in range(3)]
    finally:
        handle.remove()
    assert calls == [1] and all(o.shape == (2, 3, 16, 16) for o in outs)


def test_adapter_mirrors_the_module_mode():
    inner = TutorialGenerator().eval()
    G = adapt_generator(inner, zdim=(8, 1, 1))
    assert G.training is False and not any(m.training for m in G.modules())
    G.train()
    assert G.training and inner.training and inner.main[1].training
    G.eval()
    assert not G.training and not inner.training and not inner.main[1].training
    inner.train()
    assert G.training
