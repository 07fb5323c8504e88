"""SceneWorld shipped models: loaders, determinism, and quality against the renderer."""
import json
import os
import time

import numpy
import pytest
import torch

from gandissect_widgets.world.gan import (SceneGenerator, WEIGHTS_DIR, load_generator)
from gandissect_widgets.world.render import LABELS, render, to_tensor
from gandissect_widgets.world.segmenter import SceneSegmenter, load_segmenter
from gandissect_widgets.world.train_segmenter import EVAL_SEED, evaluate

L = {name: i for i, name in enumerate(LABELS)}


@pytest.fixture(scope='module')
def G():
    return load_generator()


@pytest.fixture(scope='module')
def S():
    return load_segmenter()


def test_shipped_files_and_records():
    for name in ('generator.pt', 'generator.json', 'generator_samples.png',
                 'segmenter.pt', 'segmenter.json'):
        assert os.path.exists(os.path.join(WEIGHTS_DIR, name)), name
    total = sum(os.path.getsize(os.path.join(WEIGHTS_DIR, f)) for f in os.listdir(WEIGHTS_DIR))
    assert total < 8 * 2 ** 20
    for name in ('generator.json', 'segmenter.json'):
        with open(os.path.join(WEIGHTS_DIR, name)) as f:
            record = json.load(f)
        for key in ('command', 'seed', 'steps', 'batch_size', 'wall_time_s', 'machine',
                    'torch', 'model'):
            assert key in record, (name, key)


def test_load_generator_fast_and_frozen():
    t = time.perf_counter()
    G = load_generator()
    assert time.perf_counter() - t < 2.0
    assert isinstance(G, SceneGenerator) and isinstance(G, torch.nn.Sequential)
    assert not G.training
    assert not any(p.requires_grad for p in G.parameters())
    names = [name for name, _ in G.named_children()]
    assert names == [f'layer{i}' for i in range(1, len(names))] + ['output']


def test_generator_layers_and_output(G):
    z = G.sample_z(3, seed=5)
    assert z.shape == (3, G.zdim) and z.dtype == torch.float32 and z.device.type == 'cpu'
    assert torch.equal(G.sample_z(5, seed=5)[:3], z)
    shapes = {}
    x = z
    with torch.no_grad():
        for name, layer in G.named_children():
            x = layer(x)
            shapes[name] = tuple(x.shape)
    assert shapes['output'] == (3, 3, 64, 64)
    for name, res in G.layer_resolutions().items():
        assert shapes[name][2:] == (res, res), name
    assert shapes['layer1'][2:] == (4, 4) and shapes['layer10'][2:] == (64, 64)
    assert x.min() >= -1 and x.max() <= 1


def test_generator_deterministic_and_batch_independent(G):
    z = G.sample_z(6, seed=1)
    with torch.no_grad():
        batch = G(z)
        again = G(z)
        alone = torch.cat([G(z[i:i + 1]) for i in range(6)])
    assert torch.equal(batch, again)
    assert torch.allclose(batch, alone, atol=1e-4)  # conv algorithms differ by batch size (~2e-5)


def test_load_segmenter_fast_and_frozen():
    t = time.perf_counter()
    S = load_segmenter()
    assert time.perf_counter() - t < 2.0
    assert isinstance(S, SceneSegmenter) and not S.training
    assert S.labels == LABELS
    assert not any(p.requires_grad for p in S.parameters())


def test_segmenter_outputs(S):
    images, _ = render(4, seed=EVAL_SEED)
    x = to_tensor(images)
    logits = S.logits(x)
    assert logits.shape == (4, len(LABELS), 64, 64)
    seg = S(x)
    assert seg.shape == (4, 64, 64) and seg.dtype == torch.int64
    assert torch.equal(seg, logits.argmax(1))
    # batch independence
    assert torch.equal(S(x[1:2]), seg[1:2])
    # probabilities are differentiable with respect to the input
    x = x.clone().requires_grad_(True)
    p = S.probabilities(x)
    assert torch.allclose(p.sum(1), torch.ones(4, 64, 64), atol=1e-5)
    p[:, L['tree']].mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r'\(N,3,H,W\)'):
        S(torch.zeros(2, 64, 64))


def test_segmenter_held_out_iou(S):
    with open(os.path.join(WEIGHTS_DIR, 'segmenter.json')) as f:
        recorded = json.load(f)['evaluation']['mean_iou']
    ious, miou, pixacc = evaluate(S, n=64)
    assert miou > 0.8, ious
    assert abs(miou - recorded) < 0.06
    assert pixacc > 0.95


def test_gan_samples_look_like_renders(G, S):
    """The GAN's samples, segmented, have label frequencies close to the renders'."""
    with torch.no_grad():
        fake = S(G(G.sample_z(96, seed=123)))
    _, real = render(400, seed=EVAL_SEED)
    f = numpy.bincount(fake.numpy().ravel(), minlength=len(LABELS)) / fake.numel()
    r = numpy.bincount(real.ravel(), minlength=len(LABELS)) / real.size
    # Groups (quality.json has every label): the shipped GAN draws too little water and road
    # (they become grass), half the renders' windows and doors, and few mountains.
    groups = {'sky': (['sky', 'cloud', 'sun'], 0.05), 'ground': (['grass', 'water', 'road'], 0.05),
              'building': (['building', 'roof', 'window', 'door'], 0.04), 'tree': (['tree'], 0.025)}
    for group, (names, tol) in groups.items():
        idx = [L[n] for n in names]
        assert abs(f[idx].sum() - r[idx].sum()) < tol, (group, f[idx].sum(), r[idx].sum())
    for name in ('building', 'roof', 'window', 'door', 'cloud'):
        assert (fake == L[name]).flatten(1).any(1).float().mean() > 0.3, name
    # sky above ground, on average over samples
    rows = torch.arange(64).view(1, 64, 1).float()
    sky_row = rows.expand_as(fake)[fake == L['sky']].mean()
    grass_row = rows.expand_as(fake)[fake == L['grass']].mean()
    assert sky_row < grass_row
