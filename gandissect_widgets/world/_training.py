"""Helpers shared by the SceneWorld training scripts: atomic saves, records, image grids."""
import json
import os
import platform
import sys
import time

import numpy
import torch


def atomic_torch_save(obj, path):
    """torch.save to ``path`` via a temporary file and ``os.replace``."""
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), python=sys.version.split()[0],
                torch=torch.__version__, numpy=numpy.__version__)


def command_line():
    return ' '.join(['python', '-m', __package__ + '.' +
                     os.path.splitext(os.path.basename(sys.argv[0]))[0]] + sys.argv[1:])


def args_command(args):
    """Rebuild a command line from a checkpoint's saved ``vars(args)`` (for checkpoints
    written before commands were recorded)."""
    parts = []
    for k, v in args.items():
        if isinstance(v, bool):
            if v:
                parts.append(f'--{k.replace("_", "-")}')
        else:
            parts.append(f'--{k.replace("_", "-")} {v}')
    return ' '.join(['python', '-m', __package__ + '.train_...'] + parts)


def write_record(path, record):
    atomic_write_text(json.dumps(record, indent=2, sort_keys=False) + '\n', path)


def save_grid(images, path, ncols=8, scale=1):
    """uint8 (N,H,W,3) numpy or float (N,3,H,W) tensor in [-1,1] -> PNG grid at ``path``."""
    from PIL import Image
    if isinstance(images, torch.Tensor):
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    n, h, w, _ = images.shape
    nrows = (n + ncols - 1) // ncols
    grid = numpy.full((nrows * h, ncols * w, 3), 255, dtype=numpy.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    img = Image.fromarray(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + '.tmp.png'
    img.save(tmp)
    os.replace(tmp, path)


class StopSignal:
    """Set when SIGTERM or SIGINT arrives, so a training loop can checkpoint and exit."""

    def __init__(self):
        import signal
        self.stop = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        print(f'signal {signum}: stopping after this step (checkpoint, no final weights)',
              flush=True)
        self.stop = True


class Timer:
    """Wall time that survives resumes: ``elapsed`` adds the time of earlier runs."""

    def __init__(self, before=0.0):
        self.before = before
        self.start = time.time()

    @property
    def elapsed(self):
        return self.before + time.time() - self.start
