"""``sceneworld-artifacts``: the shipped SceneWorld GAN with artifact units planted in ``layer4``.

    python -m gandissect_widgets.world.plant_artifacts --seed 0     # writes weights/generator-artifacts.{pt,json}
    G = load_artifact_generator()                                   # shipped weights + the small patch

The shipped GAN draws few artifacts, so nothing showed whether the artifact scoring would find
one.  This makes a GAN whose artifacts have a known cause: it picks a few units of ``layer4``
that matter little to the clean GAN (ablating one alone changes its images least) and that
fire strongly in some samples, and trains only their outgoing weights (their input channels of
``layer5.conv``) so that where they fire they paint a colour patch or stripes.  Nothing before
``layer5`` changes, so the variant with the planted units ablated is exactly the clean GAN with
them ablated.  The patch file holds just those weights (a few KB) and the SHA-256 of the base
weights it applies to; the ``.json`` record beside it says which units, what they draw, how
the patch was made, and the Fréchet distances of the clean GAN, the variant, and the variant
with its planted units ablated, with bootstrap intervals.
"""
import argparse
import hashlib
import json
import os
import time

import numpy
import torch
import torch.nn.functional as F

from ._training import atomic_torch_save, command_line, machine_info, save_grid, write_record
from .shipped import WEIGHTS_DIR

__all__ = ['load_artifact_generator', 'planted_units', 'apply_patch', 'PATCH_PATH', 'RECORD_PATH', 'ARTIFACTS']

PATCH_PATH = os.path.join(WEIGHTS_DIR, 'generator-artifacts.pt')
RECORD_PATH = os.path.join(WEIGHTS_DIR, 'generator-artifacts.json')
BASE_PATH = os.path.join(WEIGHTS_DIR, 'generator.pt')
FORMAT = 'gandissect-widgets parameter patch 1'
LAYER, NEXT = 'layer4', 'layer5'
# what each planted unit draws where it fires: an RGB colour in [-1, 1], or green and yellow stripes.
# Blotches of grass green and of yellow: the segmenter's feature space, where the distance is taken, sees
# them (grass in the sky, objects erased, an odd yellow class); magenta or red patches it reads as
# buildings or roofs, which the GAN draws too few of, so they brought its distance down, not up.
GRASS, YELLOW = (-0.23, 0.18, -0.50), (1.0, 1.0, -1.0)
ARTIFACTS = (('grass-green blotch', GRASS), ('yellow blotch', YELLOW), ('green and yellow stripes', None),
             ('white blotch', (1.0, 1.0, 1.0)))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def apply_patch(model, patch, source='patch'):
    """Write the patch's values into ``model``'s parameters: for each entry, ``parameter``'s
    slices ``index`` along ``dim`` become ``value``.  Shapes are checked; the model is changed in place."""
    from gandissect_widgets.checkpoint import CheckpointError
    params = dict(model.named_parameters())
    if not isinstance(patch, dict) or patch.get('format') != FORMAT or not isinstance(patch.get('patches'), list):
        raise CheckpointError(f'{source} is not a {FORMAT!r} file (a dict with format and patches)')
    for p in patch['patches']:
        name, dim, index, value = p.get('parameter'), p.get('dim'), p.get('index'), p.get('value')
        if name not in params:
            raise CheckpointError(f'{source} patches {name!r}, which the generator does not have')
        target = params[name]
        want = list(target.shape)
        if torch.is_tensor(index) and isinstance(dim, int) and 0 <= dim < len(want):
            want[dim] = len(index)
        if not (torch.is_tensor(index) and torch.is_tensor(value) and list(value.shape) == want
                and int(index.min()) >= 0 and int(index.max()) < target.shape[dim]):
            raise CheckpointError(f'{source}: the patch of {name} does not fit its shape {tuple(target.shape)}')
        with torch.no_grad():
            target.index_copy_(dim, index.long(), value.to(target.dtype))
    return model


def load_artifact_generator(device='cpu', checkpoint=None):
    """The shipped SceneWorld generator with the artifact patch applied (``checkpoint``: another
    patch file made by this script).  Both files are read weights-only; a patch made for other
    base weights is refused, naming both hashes."""
    from gandissect_widgets.checkpoint import CheckpointError, torch_load
    from .gan import load_generator
    path = checkpoint or PATCH_PATH
    if not os.path.exists(path):
        raise FileNotFoundError(f'no artifact patch at {path!r}; make it with '
                                '`python -m gandissect_widgets.world.plant_artifacts`')
    patch = torch_load(path, what='artifact patch')
    base_sha = patch.get('base_sha256') if isinstance(patch, dict) else None
    actual = _sha256(BASE_PATH)
    if base_sha != actual:
        raise CheckpointError(f'artifact patch {path} was made for base weights with SHA-256 {base_sha}, but '
                              f'{BASE_PATH} has {actual}; plant the artifacts again '
                              '(`python -m gandissect_widgets.world.plant_artifacts`)')
    G = apply_patch(load_generator('cpu'), patch, source=path)
    return G.to(device)


def planted_units(record=RECORD_PATH):
    """[(unit, what it draws), ...] of the planted units of ``layer4``, from the record."""
    with open(record) as f:
        return [(int(u['unit']), u['draws']) for u in json.load(f)['units']]


# -- planting ---------------------------------------------------------------------------------
def _activations(G, z, batch=256):
    from gandissect_widgets.engine.interventions import layer_activation
    return torch.cat([layer_activation(G, z[i:i + batch], LAYER) for i in range(0, len(z), batch)])


def choose_units(G, n, seed, samples=512, probe=24):
    """``n`` units of layer4 drawn (seeded) among those whose ablation alone changes the clean
    images least (the quietest quarter) and that reach their top-1% level in 10-45% of samples."""
    from gandissect_widgets.engine.hooks import run_from
    r = _activations(G, G.sample_z(samples, 100 + seed))
    C = r.shape[1]
    q = torch.quantile(r.transpose(0, 1).reshape(C, -1), 0.99, dim=1)
    reach = (r.amax((2, 3)) > q).float().mean(0)
    with torch.no_grad():
        x0 = run_from(G, LAYER, r[:probe])
        effect = numpy.zeros(C)
        for u in range(C):
            ra = r[:probe].clone()
            ra[:, u] = 0
            effect[u] = float((run_from(G, LAYER, ra) - x0).abs().mean())
    quiet = numpy.argsort(effect, kind='stable')[:C // 4]
    pool = [int(u) for u in quiet if 0.10 <= float(reach[u]) <= 0.45]
    if len(pool) < n:
        raise ValueError(f'only {len(pool)} quiet units of {LAYER} fire in 10-45% of samples; ask for fewer')
    units = sorted(numpy.random.RandomState(seed).choice(pool, n, replace=False).tolist())
    return units, q[units], effect, reach


def _forward(G, r, weight):
    """Images from layer4 activations ``r`` with ``weight`` as layer5's convolution (differentiable)."""
    blk = getattr(G, NEXT)
    h = blk.norm(blk.relu(F.conv2d(blk.upsample(r), weight, blk.conv.bias, padding=1)))
    started = False
    for name, child in G.named_children():
        if started:
            h = child(h)
        started = started or name == NEXT
    return h


def _targets(x, r, units, q, kinds):
    """The clean images with each planted unit's artifact painted where it fires (soft mask)."""
    size = x.shape[-1]
    blob = F.max_pool2d(r[:, units], 3, stride=1, padding=1)   # a blotch about 3 layer cells across
    up = F.interpolate(blob, size=size, mode='bilinear', align_corners=False)
    m = ((up - 0.4 * q[None, :, None, None]) / (0.4 * q[None, :, None, None])).clamp(0, 1)
    rows = (torch.arange(size) // 2 % 2).float()[None, None, :, None]
    stripes = (torch.tensor(GRASS)[None, :, None, None] * rows + torch.tensor(YELLOW)[None, :, None, None] * (1 - rows)
               ).expand(1, 3, size, size)
    t = x
    for j, (_, colour) in enumerate(kinds):
        paint = stripes if colour is None else torch.tensor(colour)[None, :, None, None]
        t = t * (1 - m[:, j:j + 1]) + paint * m[:, j:j + 1]
    return t


def plant(G, units, q, seed, steps=200, lr=0.05, batch=24, pool=768, log=print):
    """New values of layer5.conv.weight[:, units], trained so each unit draws its artifact."""
    from gandissect_widgets.engine.hooks import run_from
    torch.manual_seed(seed)
    rng = numpy.random.RandomState(seed)
    kinds = ARTIFACTS[:len(units)]
    r = _activations(G, G.sample_z(pool, 200 + seed))
    with torch.no_grad():
        x0 = torch.cat([run_from(G, LAYER, r[i:i + 128]) for i in range(0, pool, 128)])
        targets = _targets(x0, r, units, q, kinds)
    fires = (r[:, units].amax((2, 3)) > q).any(1).numpy()
    on, off = numpy.flatnonzero(fires), numpy.flatnonzero(~fires)
    W = getattr(G, NEXT).conv.weight.detach()
    index = torch.tensor(units)
    value = W[:, index].clone().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=lr)
    for step in range(steps):
        b = numpy.concatenate([rng.choice(on, batch * 3 // 4), rng.choice(off, batch - batch * 3 // 4)])
        loss = ((_forward(G, r[b], W.index_copy(1, index, value)) - targets[b]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f'step {step} loss {loss.item():.4f}', flush=True)
    return index, value.detach(), kinds, float(fires.mean())


# -- the record's figures ---------------------------------------------------------------------
def quality(G_clean, G_art, units, n, seed, bootstrap=1000, level=0.95, reference=2000):
    """Fréchet distances (segmenter features) to world renders of the clean GAN, the variant and the
    variant with its planted units ablated, on the same ``n`` latents, with paired bootstrap intervals."""
    from gandissect_widgets.engine.artifacts import bootstrap_interval
    from gandissect_widgets.engine.frechet import (bootstrap_indices, feature_stats, frechet_distance,
                                                   frechet_resampled, segmenter_features)
    from gandissect_widgets.engine.interventions import Intervention, render
    from .render import render as render_world, to_tensor
    from .segmenter import load_segmenter
    feat = segmenter_features(load_segmenter())
    ref = to_tensor(render_world(reference, seed=12345)[0])
    mu, s = feature_stats(torch.cat([feat(ref[i:i + 250]) for i in range(0, len(ref), 250)]).numpy())
    z = G_clean.sample_z(n, seed)
    idx = bootstrap_indices(n, bootstrap, seed)

    def fd(G, ivs=()):
        f = torch.cat([feat(render(G, z[i:i + 100], ivs)) for i in range(0, n, 100)]).numpy()
        return frechet_distance(*feature_stats(f), mu, s), frechet_resampled(f, mu, s, idx)
    ablate = [Intervention(LAYER, units, 'ablate')]
    (c, cb), (a, ab), (r, rb) = fd(G_clean), fd(G_art), fd(G_art, ablate)
    ci = (lambda p, v: [round(x, 5) for x in bootstrap_interval(p, v, level)])
    return dict(samples=n, latent_seed=seed, reference=f'render({reference}, seed=12345)', bootstrap=bootstrap,
                level=level, feature_space='sceneworld segmenter probabilities pooled 2x2',
                clean=dict(fd=round(c, 5), ci=ci(c, cb)), variant=dict(fd=round(a, 5), ci=ci(a, ab)),
                variant_planted_ablated=dict(fd=round(r, 5), ci=ci(r, rb)),
                variant_minus_clean_ci=ci(a - c, ab - cb), ablated_minus_clean_ci=ci(r - c, rb - cb))


def scoring_check(G_art, G_clean, units, seed, n_samples, top, n_eval, random_draws):
    """The artifact ranking of every unit of layer4 (engine.artifacts) on a small run: where the planted units come."""
    from gandissect_widgets.engine.artifacts import artifact_scores
    from .render import render as render_world, to_tensor
    from .segmenter import load_segmenter
    ref = to_tensor(render_world(1000, seed=12345)[0])
    res = artifact_scores(G_art, load_segmenter(), LAYER, ref, n_samples=n_samples, seed=seed, top=top,
                          ks=(len(units),), n_eval=n_eval, random_draws=random_draws, baseline=G_clean,
                          progress=False)
    rank = {int(u): int(numpy.flatnonzero(res.ranking == u)[0]) + 1 for u in units}
    return dict(settings=res.settings, reference='render(1000, seed=12345)', planted_rank=rank,
                top10=[int(u) for u in res.ranking[:10]],
                top10_score=[round(float(res.score[u]), 5) for u in res.ranking[:10]],
                top10_score_ci=[[round(float(x), 5) for x in res.score_ci[u]] for u in res.ranking[:10]],
                removal=res.removal, summary=res.summary())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out-dir', default=WEIGHTS_DIR, help='where generator-artifacts.{pt,json} go')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--units', type=int, default=3, help=f'how many units to plant (at most {len(ARTIFACTS)})')
    p.add_argument('--steps', type=int, default=200)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--batch-size', type=int, default=24)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--eval-samples', type=int, default=1000, help='samples for the quality figures (0: skip)')
    p.add_argument('--score-samples', type=int, default=300, help='samples for the scoring check (0: skip)')
    p.add_argument('--score-top', type=int, default=30)
    p.add_argument('--score-eval', type=int, default=500)
    a = p.parse_args(argv)
    if not 1 <= a.units <= len(ARTIFACTS):
        p.error(f'--units must be 1 to {len(ARTIFACTS)}')
    return a


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    from .gan import load_generator
    t0 = time.time()
    G = load_generator()
    units, q, effect, reach = choose_units(G, a.units, a.seed)
    print(f'planting in {LAYER} units {units}')
    index, value, kinds, fire_rate = plant(G, units, q, a.seed, steps=a.steps, lr=a.lr, batch=a.batch_size)
    patch = dict(format=FORMAT, base='generator.pt', base_sha256=_sha256(BASE_PATH),
                 patches=[dict(parameter=f'{NEXT}.conv.weight', dim=1, index=index, value=value.float())])
    os.makedirs(a.out_dir, exist_ok=True)
    path = os.path.join(a.out_dir, 'generator-artifacts.pt')
    atomic_torch_save(patch, path)
    G_art = load_artifact_generator(checkpoint=path)
    record = dict(
        what='sceneworld-artifacts: the shipped SceneWorld generator (generator.pt) with artifact units planted in '
             f'{LAYER}; generator-artifacts.pt holds only the patched weights ({NEXT}.conv.weight[:, units], float32) '
             'and the SHA-256 of the base weights',
        command=command_line(), seed=a.seed, base='generator.pt', base_sha256=patch['base_sha256'],
        layer=LAYER, patched=f'{NEXT}.conv.weight[:, units]: the planted units\' outgoing weights',
        units=[dict(unit=u, draws=k, colour=c, top1pct_level=round(float(qq), 4),
                    clean_ablation_effect=round(float(effect[u]), 5), reach_top1pct=round(float(reach[u]), 3))
               for u, (k, c), qq in zip(units, kinds, q)],
        how=(f'Units chosen (seed {a.seed}) among the quarter of {LAYER} units whose ablation alone changes the clean '
             'images least (mean |difference| over 24 samples; median over all units '
             f'{float(numpy.median(effect)):.4f}) that reach their top-1% level in 10-45% of 512 samples. Their '
             f'outgoing weights were trained for {a.steps} Adam steps (lr {a.lr}, batches of {a.batch_size}, 3/4 of them samples '
             'where a planted unit fires) to make the images equal the clean ones with each unit\'s artifact painted '
             'where its activation, max-pooled over 3x3 layer cells and upsampled, passes 0.4 of its top-1% level (fully at 0.8); '
             f'{fire_rate:.0%} of samples have a planted unit at its top-1% level. Everything else is the shipped GAN.'),
        samples='generator-artifacts_samples.png: rows of 8 samples (seed 7, those where the planted units fire '
                'most): clean GAN, variant, variant with the planted units ablated',
        machine=machine_info(),
    )
    _samples(G, G_art, units, os.path.join(a.out_dir, 'generator-artifacts_samples.png'))
    if a.eval_samples:
        record['quality'] = quality(G, G_art, units, a.eval_samples, seed=11)
        print('quality', json.dumps(record['quality']))
    if a.score_samples:
        record['scoring_check'] = scoring_check(G_art, G, units, 6, a.score_samples, a.score_top, a.score_eval, 3)
        print('\n'.join(record['scoring_check']['summary']))
    record['wall_time_s'] = round(time.time() - t0, 1)
    write_record(os.path.join(a.out_dir, 'generator-artifacts.json'), record)
    print(f'wrote {path} and its record')


def _samples(G, G_art, units, path, n=8):
    from gandissect_widgets.engine.interventions import Intervention, render
    z = G.sample_z(256, 7)
    peak = _activations(G, z)[:, units].amax((2, 3)).amax(1)
    zs = z[torch.argsort(peak, descending=True, stable=True)[:n]]
    with torch.no_grad():
        rows = [G(zs), G_art(zs), render(G_art, zs, [Intervention(LAYER, units, 'ablate')])]
    save_grid(torch.cat(rows), path, ncols=n, scale=2)


if __name__ == '__main__':
    main()
