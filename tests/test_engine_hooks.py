"""Hooks: retain, edit, stop, partial forward; hooks always removed."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.engine.hooks import StopForward, ThreadTraces, compose_edits, run_from
from gandissect_widgets.engine.upsample import pool_mask
from tiny import TinyGenerator


def n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_trace_retains_and_stops():
    G = TinyGenerator()
    z = G.sample_z(3, 0)
    with gw.Trace(G, "layer2") as tr:
        full = G(z)
    assert tr.output.shape == (3, 5, 8, 8)
    with gw.Trace(G, "layer2", stop=True) as tr2:
        out = G(z)
        pytest.fail("forward should have stopped")  # pragma: no cover
    assert torch.equal(tr2.output, tr.output)
    assert n_hooks(G) == 0
    assert full.shape == (3, 3, 16, 16)


def test_thread_traces_keep_each_threads_outputs_apart():
    G = TinyGenerator()
    za, zb = G.sample_z(3, 0), G.sample_z(2, 1)
    with torch.no_grad():
        with gw.TraceDict(G, ["layer1", "layer2"]) as ta:
            full_a = G(za)
        with gw.TraceDict(G, ["layer1", "layer2"]) as tb:
            G(zb)
        meet = threading.Barrier(2, timeout=30)
        # both forward passes wait for each other inside layer1: they are in the model at once
        gate = G.layer1.register_forward_hook(lambda mod, inputs, out: (meet.wait(), None)[1])
        try:
            with ThreadTraces(G, ["layer1", "layer2"]) as traces:
                hooks = n_hooks(G)
                with ThreadPoolExecutor(2) as pool:
                    fa = pool.submit(traces.run, lambda: G(za), ["layer1", "layer2"], "layer2")  # stops after layer2
                    fb = pool.submit(traces.run, lambda: G(zb), ["layer2"])
                    (xa, outs_a), (xb, outs_b) = fa.result(), fb.result()
                assert n_hooks(G) == hooks  # nothing added or removed while they ran
                meet = threading.Barrier(1)
                assert torch.equal(G(za), full_a)  # a forward outside run() is not traced or cut short
        finally:
            gate.remove()
    assert xa is None and xb.shape == (2, 3, 16, 16)
    assert torch.equal(outs_a["layer1"], ta["layer1"].output) and torch.equal(outs_a["layer2"], ta["layer2"].output)
    assert list(outs_b) == ["layer2"] and torch.equal(outs_b["layer2"], tb["layer2"].output)
    assert n_hooks(G) == 0


def test_hooks_removed_after_exception():
    G = TinyGenerator()
    with pytest.raises(RuntimeError):
        with gw.TraceDict(G, ["layer1", "layer3"]):
            raise RuntimeError("boom")
    assert n_hooks(G) == 0


def test_unknown_layer_lists_known_ones():
    G = TinyGenerator()
    with pytest.raises(gw.UnknownLayerError) as e:
        gw.Trace(G, "layer9")
    msg = str(e.value)
    assert "layer9" in msg and "layer1" in msg and "layer3" in msg and "output" in msg


@pytest.mark.parametrize("layer", ["layer1", "layer2", "layer3"])
def test_run_from_equals_full_forward(layer):
    G = TinyGenerator()
    z = G.sample_z(4, 1)
    with gw.Trace(G, layer) as tr:
        full = G(z)
    torch.testing.assert_close(run_from(G, layer, tr.output), full)


def test_run_from_nested_sequential_and_fallback():
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = nn.Sequential(nn.Linear(3, 4), inner, nn.Tanh())
    x = torch.randn(5, 3)
    with gw.Trace(model, "1.1") as tr:
        y = model(x)
    torch.testing.assert_close(run_from(model, "1.1", tr.output), y)

    class NotSeq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x) * 2)

    m = NotSeq()
    with gw.Trace(m, "a") as tr:
        y = m(x)
    with pytest.raises(ValueError, match="pass z="):
        run_from(m, "a", tr.output)
    torch.testing.assert_close(run_from(m, "a", tr.output, z=x), y)


def test_edit_formula_and_composition():
    r = torch.randn(2, 4, 3, 3)
    e1 = gw.Edit("l", units=[1, 2], value=5.0)
    out = e1.apply(r)
    assert torch.equal(out[:, [0, 3]], r[:, [0, 3]])
    assert torch.all(out[:, [1, 2]] == 5.0)
    abl = gw.Edit("l", units=[0]).apply(r)
    assert torch.all(abl[:, 0] == 0) and torch.equal(abl[:, 1:], r[:, 1:])
    mask = torch.zeros(3, 3)
    mask[0, 0] = 1
    part = gw.Edit("l", units=[3], value=torch.tensor([7.0]), mask=mask).apply(r)
    assert part[0, 3, 0, 0] == 7.0 and torch.equal(part[:, 3, 1:], r[:, 3, 1:])
    # sequential composition equals GANPaint's alpha compositing
    a1 = torch.full((4,), 0.3); a2 = torch.full((4,), 0.6)
    k1 = torch.arange(4.0); k2 = -torch.arange(4.0)
    ea, eb = gw.Edit("l", a1, k1), gw.Edit("l", a2, k2)
    got = compose_edits([ea, eb], r)
    a = 1 - (1 - a1) * (1 - a2)
    k = (k1 * a1 * (1 - a2) + k2 * a2) / a
    want = r * (1 - a.view(1, 4, 1, 1)) + (k * a).view(1, 4, 1, 1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(units=[]), "empty unit set"),
    (dict(units=[4]), "out of range"),
    (dict(units=[-1]), "out of range"),
    (dict(units=[0], mask=torch.ones(2, 2)), "spatial size"),
    (dict(units=[0, 1], value=[1.0, 2.0, 3.0]), "insertion value"),
])
def test_edit_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gw.Edit("l", **kwargs).apply(torch.randn(1, 4, 3, 3))


def test_edit_layers_context_and_mask_locality():
    G = TinyGenerator()
    z = G.sample_z(2, 0)
    with torch.no_grad():
        base = G(z)
        m = torch.zeros(8, 8)
        m[0:2, 0:2] = 1
        with gw.edit_layers(G, [gw.Edit("layer2", units=[0, 1, 2, 3, 4], mask=m)]):
            edited = G(z)
        assert n_hooks(G) == 0
        again = G(z)
    assert torch.equal(base, again)
    # layer2 cell (0..1, 0..1) -> image 0..3; layer3 and output add 3x3 convs at 16x16: +2 pixels
    diff = (edited - base).abs().sum(1)[0]
    assert diff[:4, :4].sum() > 0
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:6, :6] = False
    assert diff[outside].max() == 0


def test_pool_mask():
    m = torch.zeros(16, 16)
    m[0, 0] = 1
    assert pool_mask(m, (4, 4))[0, 0] == 1 and pool_mask(m, (4, 4)).sum() == 1
    assert pool_mask(m, (4, 4), "mean")[0, 0] == pytest.approx(1 / 16)
    with pytest.raises(ValueError):
        pool_mask(m, (4, 4), "median")


def test_edit_with_per_sample_unit_weights_equals_one_edit_per_sample():
    r = torch.randn(6, 4, 3, 3)
    values = torch.tensor([1.5, -2.0, 3.0, 0.5])
    units = [2, 0, 3, 1, 2, 0]
    onehot = torch.nn.functional.one_hot(torch.tensor(units), 4).float()
    mask = torch.zeros(6, 1, 3, 3)
    mask[:, :, 1:, :2] = 1
    for m in (None, mask):
        got = gw.Edit("l", onehot, values, m).apply(r)
        for i, u in enumerate(units):
            one = gw.Edit("l", [u], values[u:u + 1], None if m is None else m[i, 0]).apply(r[i:i + 1])
            assert torch.equal(got[i:i + 1], one)  # bit for bit: r*(1-1) + k*1 == k, r*1 + k*0 == r
    with pytest.raises(ValueError, match="5 rows for 6 samples"):
        gw.Edit("l", onehot[:5], values).apply(r)
    with pytest.raises(ValueError, match="needs 4 entries"):
        gw.Edit("l", torch.ones(6, 3)).apply(r)
