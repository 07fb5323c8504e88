"""Train the SceneWorld segmenter on freshly rendered (image, label) pairs.

    python -m gandissect_widgets.world.train_segmenter --out /tmp/seg --steps 3000 --seed 0

Every step renders a new batch (scenes ``step*B ...`` of world seed ``2000 + seed``) and
augments it (blur, noise, colour jitter, coarse blotches) so that the segmenter also works on
GAN samples, which are blurrier and noisier than renders. Evaluates per-class IoU on held-out
renders of world seed ``EVAL_SEED`` (used by no training run). Writes into ``--out``:
    checkpoint.pt      everything needed to resume (atomic)
    log.txt            step, time, loss
    segmenter.pt       final state_dict (float16)
    segmenter.json     the record: command, seed, steps, wall time, machine, per-class IoU
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from .render import LABELS, TREE_SCALE, render, to_tensor
from ._training import (atomic_torch_save, command_line, machine_info, write_record,
                        Timer, StopSignal, args_command)
from .segmenter import SceneSegmenter, DEFAULT_SEG_WIDTHS

EVAL_SEED = 999


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='run directory')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', action='store_true', help='continue from OUT/checkpoint.pt')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--widths', default=','.join(map(str, DEFAULT_SEG_WIDTHS)))
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
    p.add_argument('--eval-images', type=int, default=500)
    p.add_argument('--checkpoint-minutes', type=float, default=4.0)
    p.add_argument('--log-every', type=int, default=50)
    p.add_argument('--tree-scale', type=float, default=TREE_SCALE,
                   help='world parameter: size of trees (render(tree_scale=...)); evaluation too')
    return p.parse_args(argv)


def augment(x, gen):
    """Random blur, noise, colour jitter and blotches on a batch (N,3,H,W) in [-1,1]."""
    n = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    # blur: a per-image mix of the image and its 3x3 binomial blur
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'),
                       k.expand(3, 1, 3, 3).contiguous(), groups=3)
    a = rand(n, 1, 1, 1) * (rand(n, 1, 1, 1) < 0.7)
    x = x + a * (blurred - x)
    # colour jitter: brightness, contrast, per-channel gain, saturation
    x = x * (0.8 + 0.4 * rand(n, 1, 1, 1)) + 0.2 * (rand(n, 1, 1, 1) - 0.5)
    x = x * (0.9 + 0.2 * rand(n, 3, 1, 1))
    grey = x.mean(1, keepdim=True)
    x = grey + (0.7 + 0.6 * rand(n, 1, 1, 1)) * (x - grey)
    # low-frequency blotches (GAN-like colour wash) and pixel noise
    low = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen).to(dev), size=x.shape[-2:],
                        mode='bilinear', align_corners=False)
    x = x + 0.08 * rand(n, 1, 1, 1) * low
    x = x + 0.1 * rand(n, 1, 1, 1) * torch.randn(x.shape, generator=gen).to(dev)
    return x.clamp(-1, 1)


def batch(step, batch_size, seed, device, tree_scale=TREE_SCALE):
    images, labels = render(batch_size, seed=2000 + seed, start=step * batch_size, tree_scale=tree_scale)
    return to_tensor(images).to(device), torch.from_numpy(labels).long().to(device)


@torch.no_grad()
def evaluate(model, n=500, seed=EVAL_SEED, device='cpu', batch_size=100, tree_scale=TREE_SCALE):
    """Per-class IoU (dataset-level ratio of sums) of ``model`` on ``n`` renders of world
    ``seed``. Returns (per-class dict name -> IoU or None when absent, mean IoU over present
    classes, pixel accuracy)."""
    C = len(LABELS)
    inter = torch.zeros(C, dtype=torch.float64)
    union = torch.zeros(C, dtype=torch.float64)
    correct = total = 0
    for s in range(0, n, batch_size):
        m = min(batch_size, n - s)
        images, labels = render(m, seed=seed, start=s, tree_scale=tree_scale)
        pred = model(to_tensor(images).to(device)).cpu()
        truth = torch.from_numpy(labels).long()
        correct += (pred == truth).sum().item()
        total += truth.numel()
        for c in range(C):
            p, t = pred == c, truth == c
            inter[c] += (p & t).sum().item()
            union[c] += (p | t).sum().item()
    ious = {}
    for c in range(C):
        ious[LABELS[c]] = round(float(inter[c] / union[c]), 4) if union[c] > 0 else None
    present = [v for k, v in ious.items() if v is not None and k != 'unlabeled']
    return ious, sum(present) / len(present), correct / total


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = SceneSegmenter(widths=[int(w) for w in args.widths.split(',')]).to(device)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    step = 0
    timer = Timer()
    commands = []
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['opt'])
        gen.set_state(ck['gen'])
        step = int(ck['step'])
        timer = Timer(float(ck['wall_time']))
        commands = list(ck.get('commands') or [args_command(ck['args'])])
        print(f'resumed from {ckpt_path} at step {step}', flush=True)
    nparams = sum(p.numel() for p in model.parameters())
    print(f'segmenter {nparams} params, {torch.get_num_threads()} threads', flush=True)

    def checkpoint():
        atomic_torch_save(dict(model=model.state_dict(), opt=opt.state_dict(),
                               gen=gen.get_state(), step=step, wall_time=timer.elapsed,
                               commands=commands + [command_line()],
                               args=vars(args)), ckpt_path)

    log = open(os.path.join(args.out, 'log.txt'), 'a')
    last_ckpt = time.time()
    acc, nacc = 0.0, 0
    model.train()
    stopper = StopSignal()
    while step < args.steps and not stopper.stop:
        # cosine learning-rate decay with a short warm-up
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group['lr'] = lr
        x, y = batch(step, args.batch_size, args.seed, device, args.tree_scale)
        x = augment(x, gen)
        loss = F.cross_entropy(model.logits(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        acc += loss.item()
        nacc += 1
        if step % args.log_every == 0 or step == args.steps:
            line = f'step {step} time {timer.elapsed:.0f}s lr {lr:.2e} loss {acc / nacc:.4f}'
            print(line, flush=True)
            log.write(line + '\n')
            log.flush()
            acc, nacc = 0.0, 0
        if time.time() - last_ckpt > 60 * args.checkpoint_minutes:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    if stopper.stop:
        print(f'stopped at step {step}; resume with --resume', flush=True)
        return
    model.eval()
    train_time = timer.elapsed
    ious, miou, pixacc = evaluate(model, n=args.eval_images, device=device, tree_scale=args.tree_scale)
    table = '\n'.join(f'  {k:10s} {v}' for k, v in ious.items())
    print(f'held-out IoU (world seed {EVAL_SEED}, {args.eval_images} renders):\n{table}\n'
          f'  mean IoU {miou:.4f}, pixel accuracy {pixacc:.4f}', flush=True)
    state = {k: v.detach().cpu().half() for k, v in model.state_dict().items()}
    atomic_torch_save(state, os.path.join(args.out, 'segmenter.pt'))
    write_record(os.path.join(args.out, 'segmenter.json'), dict(
        what='SceneWorld segmenter: float16 state_dict of SceneSegmenter',
        command=command_line(), commands=commands + [command_line()],
        seed=args.seed, steps=step, batch_size=args.batch_size,
        data=f'render(B, seed={2000 + args.seed}, start=step*B, tree_scale={args.tree_scale}) + augment(), '
             'fresh every step',
        wall_time_s=round(train_time, 1), device=str(device), machine=machine_info(),
        torch=torch.__version__, model=model.config(), parameters=nparams,
        optimizer=dict(lr=args.lr, schedule='cosine, 100 warm-up steps', loss='cross entropy'),
        evaluation=dict(world_seed=EVAL_SEED, images=args.eval_images, tree_scale=args.tree_scale,
                        iou_definition='per class, sum of intersections / sum of unions',
                        per_class_iou=ious, mean_iou=round(miou, 4),
                        pixel_accuracy=round(pixacc, 4))))
    log.close()
    print(f'done: {step} steps in {train_time:.0f}s, wrote {args.out}/segmenter.pt', flush=True)


if __name__ == '__main__':
    main()
