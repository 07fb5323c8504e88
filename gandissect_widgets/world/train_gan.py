"""Train the SceneWorld GAN on freshly rendered scenes (images only, no labels).

    python -m gandissect_widgets.world.train_gan --out /tmp/run --steps 12000 --seed 0 --amp bf16

The non-saturating logistic loss with a lazy R1 penalty on an unnormalised discriminator
(default; in a 1000-step comparison it reached a Fréchet distance of 0.060 where the hinge loss
with a spectral-normalised discriminator, ``--loss hinge --r1 0 --d-sn 1``, reached 0.128); Adam; an exponential
moving average (EMA) of the generator weights; optional bfloat16 autocast (``--amp bf16``,
about 1.7x faster on CPUs with AMX/AVX512-BF16). Every step renders a new batch (scenes
``step*B ... step*B+B-1`` of world seed ``1000 + seed``), so a resumed run sees exactly the
data it would have seen. Every ``--eval-every`` steps the EMA generator is scored by a Fréchet
distance in the shipped segmenter's feature space against renders of another world seed, and
the best-scoring EMA weights are kept: GAN samples do not improve monotonically.
Writes into ``--out``:
    checkpoint.pt          everything needed to resume (atomic, every --checkpoint-minutes)
    log.txt                step, time, losses, Fréchet distances
    samples_XXXXXX.png     EMA samples of fixed latents while training, samples_latest.png
    best_generator.pt      the best EMA weights so far (float16) and best_samples.png
    generator.pt           the best EMA state_dict by that distance (the final one without
                           evaluation), float16
    generator.json         the record: command, seed, steps, batch size, wall time, machine
    generator_samples.png  a grid of samples of the shipped weights
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

from .render import TREE_SCALE, render, to_tensor
from ._training import (atomic_torch_save, command_line, machine_info, save_grid,
                        write_record, Timer, StopSignal, args_command)
from .gan import SceneGenerator, SceneDiscriminator, DEFAULT_WIDTHS, ZDIM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='run directory')
    p.add_argument('--steps', type=int, default=12000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.pt')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr-g', type=float, default=2e-4)
    p.add_argument('--lr-d', type=float, default=2e-4)
    p.add_argument('--beta1', type=float, default=0.0)
    p.add_argument('--beta2', type=float, default=0.99)
    p.add_argument('--ema', type=float, default=0.999)
    p.add_argument('--widths', default=','.join(map(str, DEFAULT_WIDTHS)))
    p.add_argument('--d-widths', default='24,48,96,192')
    p.add_argument('--threads', type=int, default=0,
                   help='torch threads; 0: adaptive, every 300 steps time 1 and all cores '
                        'and keep the faster (the CPU may be shared)')
    p.add_argument('--loss', choices=('hinge', 'logistic'), default='logistic')
    p.add_argument('--r1', type=float, default=0.2, help='R1 penalty weight gamma (0: none)')
    p.add_argument('--r1-every', type=int, default=4, help='lazy R1: every this many steps')
    p.add_argument('--d-sn', type=int, choices=(0, 1), default=0,
                   help='spectral normalisation in the discriminator')
    p.add_argument('--amp', choices=('none', 'bf16'), default='none',
                   help='bfloat16 autocast for the forward passes (losses stay float32)')
    p.add_argument('--eval-every', type=int, default=500,
                   help='score the EMA generator every this many steps (0: never)')
    p.add_argument('--eval-samples', type=int, default=500)
    p.add_argument('--keep-snapshots', action='store_true',
                   help='also keep the EMA weights of every scored step (snapshot_XXXXXX.pt)')
    p.add_argument('--ship-step', type=int, default=None,
                   help='with --resume on a finished run: ship the kept snapshot of this step '
                        'instead of the best-scored one (the record says so)')
    p.add_argument('--ship-note', default=None, help='why that step was chosen, for the record')
    p.add_argument('--checkpoint-minutes', type=float, default=4.0)
    p.add_argument('--sample-every', type=int, default=500)
    p.add_argument('--log-every', type=int, default=50)
    p.add_argument('--tree-scale', type=float, default=TREE_SCALE,
                   help='world parameter: size of trees (render(tree_scale=...)); resuming with another '
                        'value fine-tunes the run on the changed world and restarts its scoring')
    return p.parse_args(argv)


class ThreadChooser:
    """Adaptive torch thread count on a shared CPU: every ``period`` steps, time ``probe``
    steps with one thread and with all cores, and keep the faster until the next probe."""

    def __init__(self, fixed, period=300, probe=15):
        self.fixed = fixed
        self.period, self.probe = period, probe
        self.options = sorted({1, os.cpu_count() or 1})
        self.times = {}
        self.current = None

    def before(self, step):
        if self.fixed or len(self.options) == 1:
            return
        phase = step % self.period
        k = phase // self.probe
        if k < len(self.options):
            self.current = self.options[k]
            if phase % self.probe == 0:
                self.times[self.current] = []
            torch.set_num_threads(self.current)
        elif k == len(self.options) and phase % self.probe == 0 and self.times:
            best = min(self.times, key=lambda t: sorted(self.times[t])[len(self.times[t]) // 2]
                       if self.times[t] else float('inf'))
            torch.set_num_threads(best)
            self.current = None

    def after(self, seconds):
        if self.current is not None:
            self.times.setdefault(self.current, []).append(seconds)


def real_batch(step, batch_size, seed, device, tree_scale=TREE_SCALE):
    images, _ = render(batch_size, seed=1000 + seed, start=step * batch_size, tree_scale=tree_scale)
    return to_tensor(images).to(device)


EVAL_WORLD_SEED = 555   # renders the training-time score compares against (quality.json uses 777)


class FrechetScore:
    """Fréchet distance in the shipped segmenter's feature space between ``n`` samples of a
    generator (latents ``sample_z(n, seed=1)``) and ``n`` renders of world seed 555."""

    def __init__(self, n, device, tree_scale=TREE_SCALE):
        from ..engine.frechet import feature_stats, frechet_distance, segmenter_features
        from .segmenter import load_segmenter
        self.n, self.device = n, device
        self.feature_stats, self.frechet_distance = feature_stats, frechet_distance
        self.feat = segmenter_features(load_segmenter(device=device))
        self.ref = feature_stats(torch.cat([
            self.feat(to_tensor(render(min(250, n - i), seed=EVAL_WORLD_SEED, start=i,
                                       tree_scale=tree_scale)[0]).to(device))
            for i in range(0, n, 250)]).numpy())

    def __call__(self, G):
        z = G.sample_z(self.n, seed=1).to(self.device)
        with torch.no_grad():
            f = torch.cat([self.feat(G(z[i:i + 250])) for i in range(0, self.n, 250)]).numpy()
        return self.frechet_distance(*self.feature_stats(f), *self.ref)


def logged_scores(path, until):
    """{step: distance} from the log lines ``step N frechet D`` up to step ``until`` (runs
    checkpointed before scores were kept in the checkpoint)."""
    found = {}
    if os.path.exists(path):
        for line in open(path):
            parts = line.split()
            if len(parts) >= 4 and parts[0] == 'step' and parts[2] == 'frechet' and int(parts[1]) <= until:
                found[int(parts[1])] = float(parts[3])
    return found


def half_state(model):
    return {k: v.detach().cpu().half() for k, v in model.state_dict().items()}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = ThreadChooser(args.threads)
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(',')]
    d_widths = [int(w) for w in args.d_widths.split(',')]
    torch.manual_seed(args.seed)
    G = SceneGenerator(ZDIM, widths).to(device)
    D = SceneDiscriminator(d_widths, resolution=G.resolution, spectral_norm=bool(args.d_sn)).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, args.beta2))
    zgen = torch.Generator().manual_seed(args.seed)
    step = 0
    best = dict(step=None, frechet=None)
    scores = {}
    timer = Timer()
    commands = []
    worlds = [dict(from_step=0, tree_scale=args.tree_scale)]
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        G.load_state_dict(ck['G'])
        D.load_state_dict(ck['D'])
        G_ema.load_state_dict(ck['G_ema'])
        opt_g.load_state_dict(ck['opt_g'])
        opt_d.load_state_dict(ck['opt_d'])
        for opt, lr in ((opt_g, args.lr_g), (opt_d, args.lr_d)):  # the command line's rates win
            for group in opt.param_groups:
                group['lr'] = lr
        zgen.set_state(ck['zgen'])
        step = int(ck['step'])
        best = dict(ck.get('best') or best)
        timer = Timer(float(ck['wall_time']))
        commands = list(ck.get('commands') or [args_command(ck['args'])])
        worlds = list(ck.get('worlds') or [dict(from_step=0, tree_scale=ck['args'].get('tree_scale', 1.0))])
        scores = {int(k): v for k, v in (ck.get('scores') or {}).items()}
        logged = logged_scores(os.path.join(args.out, 'log.txt'), step)
        scores = {**{k: v for k, v in logged.items() if k > worlds[-1]['from_step']}, **scores}
        if worlds[-1]['tree_scale'] != args.tree_scale:
            # the data changed: earlier scores measured another world, and the commands that
            # ran before the option existed ran with the default of their time
            old = worlds[-1]['tree_scale']
            commands = [c if '--tree-scale' in c else f'{c} --tree-scale {old}' for c in commands]
            worlds.append(dict(from_step=step, tree_scale=args.tree_scale))
            best, scores = dict(step=None, frechet=None), {}
            print(f'world changed at step {step}: tree scale {old} -> {args.tree_scale}; scoring restarts',
                  flush=True)
        print(f'resumed from {ckpt_path} at step {step}', flush=True)
    elif args.resume:
        print(f'--resume: no checkpoint at {ckpt_path}, starting from scratch', flush=True)
    nparams = sum(p.numel() for p in G.parameters())
    print(f'G {nparams} params, D {sum(p.numel() for p in D.parameters())} params, '
          f'{torch.get_num_threads()} threads', flush=True)

    fixed_z = G.sample_z(64, seed=0).to(device)
    log = open(os.path.join(args.out, 'log.txt'), 'a')

    def checkpoint():
        atomic_torch_save(dict(G=G.state_dict(), D=D.state_dict(), G_ema=G_ema.state_dict(),
                               opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                               zgen=zgen.get_state(), step=step, wall_time=timer.elapsed,
                               best=best, scores=scores, worlds=worlds,
                               commands=commands + [command_line()],
                               args=vars(args)), ckpt_path)

    def samples(name):
        with torch.no_grad():
            x = G_ema(fixed_z)
        save_grid(x, os.path.join(args.out, name), scale=2)

    scorer = []

    def score(model):  # built on first use: a run that only ships a snapshot needs none
        if not scorer:
            scorer.append(FrechetScore(args.eval_samples, device, args.tree_scale))
        return scorer[0](model)

    best_path = os.path.join(args.out, 'best_generator.pt')
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16')

    def d_loss(out_real, out_fake):
        if args.loss == 'hinge':
            return torch.relu(1 - out_real).mean() + torch.relu(1 + out_fake).mean()
        return F.softplus(-out_real).mean() + F.softplus(out_fake).mean()

    def g_loss(out_fake):
        return -out_fake.mean() if args.loss == 'hinge' else F.softplus(-out_fake).mean()

    last_ckpt = time.time()
    B = args.batch_size
    acc = dict(ld=0.0, lg=0.0, real=0.0, fake=0.0, n=0)
    stopper = StopSignal()
    while step < args.steps and not stopper.stop:
        threads.before(step)
        t_step = time.time()
        real = real_batch(step, B, args.seed, device, args.tree_scale)
        z = torch.randn(B, G.zdim, generator=zgen).to(device)
        with amp:
            fake = G(z)
            # discriminator: real and (detached) fake in one pass
            out = D(torch.cat([real, fake.detach()])).float()
        loss_d = d_loss(out[:B], out[B:])
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        if args.r1 and step % args.r1_every == 0:
            # lazy R1: gamma/2 * E|grad_x D(x)|^2 on reals, scaled by the interval (float32)
            x = real.detach().requires_grad_(True)
            grad, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            (args.r1 / 2 * args.r1_every * grad.pow(2).flatten(1).sum(1).mean()).backward()
        opt_d.step()
        # generator: through the updated discriminator
        D.requires_grad_(False)
        with amp:
            loss_g = g_loss(D(fake).float())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)
        # EMA of generator weights (warm-up: shorter memory early on)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        threads.after(time.time() - t_step)
        acc['ld'] += loss_d.item()
        acc['lg'] += loss_g.item()
        acc['real'] += out[:B].mean().item()
        acc['fake'] += out[B:].mean().item()
        acc['n'] += 1
        if step % args.log_every == 0 or step == args.steps:
            n = acc.pop('n')
            line = (f'step {step} time {timer.elapsed:.0f}s threads {torch.get_num_threads()} '
                    f'loss_d {acc["ld"] / n:.3f} '
                    f'loss_g {acc["lg"] / n:.3f} D(real) {acc["real"] / n:.3f} '
                    f'D(fake) {acc["fake"] / n:.3f}')
            print(line, flush=True)
            log.write(line + '\n')
            log.flush()
            acc = dict(ld=0.0, lg=0.0, real=0.0, fake=0.0, n=0)
        if step % args.sample_every == 0:
            samples(f'samples_{step:06d}.png')
            samples('samples_latest.png')
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            fd = score(G_ema)
            scores[step] = fd
            is_best = math.isfinite(fd) and (best['frechet'] is None or fd < best['frechet'])
            line = f'step {step} frechet {fd:.4f}' + (' best' if is_best else '')
            print(line, flush=True)
            log.write(line + '\n')
            log.flush()
            if args.keep_snapshots:
                atomic_torch_save(half_state(G_ema), os.path.join(args.out, f'snapshot_{step:06d}.pt'))
            if is_best:
                best = dict(step=step, frechet=fd)
                atomic_torch_save(half_state(G_ema), best_path)
                samples('best_samples.png')
                checkpoint()  # the checkpoint names the best weights on disk, whatever happens next
                last_ckpt = time.time()
        if time.time() - last_ckpt > 60 * args.checkpoint_minutes:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    if stopper.stop:
        print(f'stopped at step {step}; resume with --resume', flush=True)
        return
    ship_path, selection = None, 'final EMA weights'
    if args.ship_step is not None:
        ship_path = os.path.join(args.out, f'snapshot_{args.ship_step:06d}.pt')
        if not os.path.exists(ship_path):
            raise SystemExit(f'--ship-step {args.ship_step}: no {ship_path} (train with --keep-snapshots)')
        selection = dict(kept=f'EMA weights of step {args.ship_step}, chosen with --ship-step',
                         step=args.ship_step, why=args.ship_note,
                         frechet_segmenter_features=scores.get(args.ship_step),
                         best_scored=dict(step=best['step'], frechet_segmenter_features=best['frechet']))
    elif best['step'] is not None and os.path.exists(best_path):
        ship_path = best_path
        selection = dict(kept='EMA weights with the lowest training-time Frechet distance',
                         step=best['step'], frechet_segmenter_features=best['frechet'],
                         against=f'{args.eval_samples} renders of world seed {EVAL_WORLD_SEED}, '
                                 f'{args.eval_samples} samples of sample_z(n, seed=1)')
    if ship_path is None:
        state = half_state(G_ema)
    else:
        state = torch.load(ship_path, weights_only=True)
        G_ema.load_state_dict({k: v.float() for k, v in state.items()})
    samples('generator_samples.png')
    atomic_torch_save(state, os.path.join(args.out, 'generator.pt'))
    write_record(os.path.join(args.out, 'generator.json'), dict(
        what='SceneWorld generator: EMA weights (float16 state_dict of SceneGenerator)',
        command=command_line(), commands=commands + [command_line()],
        seed=args.seed, steps=step, batch_size=B,
        data=f'render(B, seed={1000 + args.seed}, start=step*B, tree_scale=...), fresh every step',
        worlds=worlds,
        wall_time_s=round(timer.elapsed, 1), device=str(device), machine=machine_info(),
        torch=torch.__version__, model=G.config(), parameters=nparams,
        discriminator=dict(widths=d_widths, spectral_norm=bool(args.d_sn)),
        optimizer=dict(lr_g=args.lr_g, lr_d=args.lr_d, betas=[args.beta1, args.beta2],
                       loss=args.loss, r1=args.r1, r1_every=args.r1_every, ema=args.ema,
                       amp=args.amp),
        selection=selection,
        frechet_during_training={str(k): round(v, 5) for k, v in sorted(scores.items())},
        samples='generator_samples.png: EMA samples of sample_z(64, seed=0)'))
    log.close()
    print(f'done: {step} steps in {timer.elapsed:.0f}s, wrote {args.out}/generator.pt', flush=True)


if __name__ == '__main__':
    main()
