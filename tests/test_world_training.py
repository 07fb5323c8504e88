"""The SceneWorld GAN trainer: a resumed run equals an uninterrupted one; the best-scored
snapshot is what ships."""
import json

import torch

from gandissect_widgets.world import train_gan

TINY = ['--widths', ','.join(['8'] * 10), '--d-widths', '8,8,8,8', '--batch-size', '4', '--seed', '3',
        '--threads', '1', '--sample-every', '1000', '--log-every', '1', '--checkpoint-minutes', '100']


def state(path):
    return torch.load(path, weights_only=True)


def test_resumed_run_equals_uninterrupted(tmp_path):
    whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
    train_gan.main(['--out', whole, '--steps', '6', '--eval-every', '0'] + TINY)
    train_gan.main(['--out', split, '--steps', '3', '--eval-every', '0'] + TINY)
    train_gan.main(['--out', split, '--steps', '6', '--eval-every', '0', '--resume'] + TINY)
    a, b = state(f'{whole}/checkpoint.pt'), state(f'{split}/checkpoint.pt')
    assert a['step'] == b['step'] == 6
    for part in ('G', 'D', 'G_ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    record = json.load(open(f'{split}/generator.json'))
    assert len(record['commands']) == 2 and record['selection'] == 'final EMA weights'
    assert record['optimizer']['loss'] == 'logistic' and record['optimizer']['r1'] > 0


def test_best_scored_snapshot_ships(tmp_path):
    out = str(tmp_path / 'run')
    train_gan.main(['--out', out, '--steps', '4', '--eval-every', '2', '--eval-samples', '16'] + TINY)
    record = json.load(open(f'{out}/generator.json'))
    sel = record['selection']
    assert sel['step'] in (2, 4) and sel['frechet_segmenter_features'] > 0
    scores = [float(line.split()[3]) for line in open(f'{out}/log.txt') if 'frechet' in line]
    assert len(scores) == 2 and abs(sel['frechet_segmenter_features'] - min(scores)) < 1e-4
    shipped, best = state(f'{out}/generator.pt'), state(f'{out}/best_generator.pt')
    assert all(torch.equal(shipped[k], best[k]) for k in best)
    assert all(v.dtype == torch.float16 for v in shipped.values())


def test_ship_a_kept_snapshot(tmp_path):
    out = str(tmp_path / 'run')
    args = ['--out', out, '--steps', '4', '--eval-every', '2', '--eval-samples', '16', '--keep-snapshots'] + TINY
    train_gan.main(args)
    train_gan.main(args + ['--resume', '--ship-step', '2'])
    record = json.load(open(f'{out}/generator.json'))
    assert record['selection']['step'] == 2 and 'ship-step' in record['selection']['kept']
    assert set(record['frechet_during_training']) == {'2', '4'}
    shipped, kept = state(f'{out}/generator.pt'), state(f'{out}/snapshot_000002.pt')
    assert all(torch.equal(shipped[k], kept[k]) for k in kept)


def test_resume_takes_the_command_line_learning_rates(tmp_path):
    out = str(tmp_path / 'run')
    train_gan.main(['--out', out, '--steps', '2', '--eval-every', '0'] + TINY)
    train_gan.main(['--out', out, '--steps', '3', '--eval-every', '0', '--resume', '--lr-g', '5e-5',
                    '--lr-d', '7e-5'] + TINY)
    ck = state(f'{out}/checkpoint.pt')
    assert ck['step'] == 3
    assert ck['opt_g']['param_groups'][0]['lr'] == 5e-5 and ck['opt_d']['param_groups'][0]['lr'] == 7e-5


def test_resume_on_a_changed_world_restarts_scoring(tmp_path):
    out = str(tmp_path / 'run')
    args = ['--out', out, '--eval-every', '2', '--eval-samples', '16'] + TINY
    train_gan.main(args + ['--steps', '4', '--tree-scale', '1.0'])
    assert state(f'{out}/checkpoint.pt')['best']['step'] in (2, 4)
    train_gan.main(args + ['--steps', '6', '--resume', '--tree-scale', '1.6'])
    record = json.load(open(f'{out}/generator.json'))
    assert record['worlds'] == [{'from_step': 0, 'tree_scale': 1.0}, {'from_step': 4, 'tree_scale': 1.6}]
    # only scores of the new world: the best of the old one cannot ship
    assert set(record['frechet_during_training']) == {'6'} and record['selection']['step'] == 6
    assert record['commands'][0].endswith('--tree-scale 1.0')  # ran before the world changed
    train_gan.main(args + ['--steps', '8', '--resume', '--tree-scale', '1.6'])  # the log's old scores stay out
    record = json.load(open(f'{out}/generator.json'))
    assert set(record['frechet_during_training']) == {'6', '8'} and len(record['worlds']) == 2
