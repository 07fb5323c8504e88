"""The command line: ``gandissect dissect ...``, ``gandissect layers ...``, ``gandissect models``, ...

One error boundary (``main``) serves every subcommand.  Arguments are checked before anything is
computed (``--out`` creatable and writable, counts that fit memory and disk, finite numbers, a
device that exists, layers whose output is a feature map, concepts the segmenter knows).  An
expected failure (bad input, a missing or damaged file, an unreadable checkpoint, no memory) is
printed as one line, ``gandissect: error: <what was wrong, and what would be right>``, with exit
status 2; an interrupt exits with 130; anything else is a bug: its traceback is printed, status 1.
``GANDISSECT_DEBUG=1`` re-raises expected failures too.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings

import torch

from gandissect_widgets.engine.distributed import DEFAULT_TIMEOUT, RankFailed, current, job
from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU

__all__ = ["main", "build_parser", "UserError", "check_result_dir", "fill_models_from"]

PROG = "gandissect"


class UserError(Exception):
    """An expected failure of the user's input that the message explains (printed as one line, status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors raised as one-line ``UserError``s (the boundary prints them)."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


# -- arguments ------------------------------------------------------------------------------------
MODEL_NAME_HELP = ("a registered name, a plug-in's name (`gandissect models` lists both) or an import path "
                   "package.module:factory (from the current directory or the installed packages)")


def _add_model_args(p, with_segmenter=True, default="sceneworld"):
    """--generator/--segmenter and their checkpoints; ``default=None``: the models --dissection was made with."""
    said = "default: sceneworld" if default else "default: the one --dissection was made with, else sceneworld"
    p.add_argument("--generator", default=default, help=f"generator: {MODEL_NAME_HELP} ({said})")
    p.add_argument("--checkpoint", default=None, help="local weights file for the generator family")
    if with_segmenter:
        p.add_argument("--segmenter", default=default, help=f"segmenter: {MODEL_NAME_HELP} ({said})")
        p.add_argument("--segmenter-checkpoint", default=None, help="local weights for the segmenter family")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available; under "
                                                  "torchrun, cuda is each rank's own GPU, cuda:LOCAL_RANK)")
    p.add_argument("--rank-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before the job stops with an error "
                        "naming the rank (default 600)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint that holds pickled Python objects (an NVIDIA StyleGAN2 .pkl, ...) in "
                        "full: this runs code stored in the file, so only for files you know")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="GAN Dissection from the command line.",
                     epilog="exit status: 0 done; 2 an expected failure (bad input, a missing, damaged or untrusted "
                            "file, no memory or disk space, another rank of a torchrun job that stopped), said in "
                            "one line; 130 interrupted; 1 a bug (with its traceback). GANDISSECT_DEBUG=1 shows tracebacks for expected failures too.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dissect", help="dissect layers of a generator against a segmenter")
    _add_model_args(p)
    p.add_argument("--layers", nargs="+", required=True, help="layer paths (see `gandissect layers`)")
    p.add_argument("--samples", type=int, default=1000, help="number of generated samples (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="latent seed (default 1)")
    p.add_argument("--quantile", type=float, default=0.99, help="threshold quantile (default 0.99: top 1%%)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lanes", type=int, default=2,
                   help="on a CPU, batches run through the models at once, one per thread (default 2; 1 uses the least memory)")
    p.add_argument("--topk", type=int, default=20, help="top-activating samples kept per unit")
    p.add_argument("--min-iou", type=float, default=DEFAULT_MIN_IOU, help="IoU above which a unit is interpretable")
    p.add_argument("--out", required=True,
                   help="output directory (dissect.json, the manifest, and arrays-<hash>.npz)")
    p.add_argument("--cache-dir", default=None,
                   help="cache/resume directory (default: OUT/.cache; 'none' to disable)")
    p.add_argument("--nonfinite", choices=("error", "skip"), default="error",
                   help="NaN or infinite images or activations: 'error' (default) stops with a one-line error; "
                        "'skip' leaves them out of the counts and records what was left out")
    p.add_argument("--threshold", choices=("quantile", "iqr"), default="quantile",
                   help="threshold rule: 'quantile' (default: the --quantile of each unit) or 'iqr' (the ICLR paper's "
                        "per-unit IQR rule, chosen on a separate threshold set of seed 2)")
    p.add_argument("--method", choices=("auto", "dense", "tail"), default="auto",
                   help="counting backend: 'tail' (the CPU path), 'dense' (whole maps: the GPU path) or 'auto' "
                        "(default: tail on a CPU, dense on a GPU); the counts are the same")
    p.add_argument("--upsample", choices=("iclr", "pnas"), default="iclr",
                   help="upsampling convention of the published code: 'iclr' (default: half-pixel bilinear, edges "
                        "clamped) or 'pnas' (zeros outside the map)")
    p.add_argument("--lock-wait", type=float, default=None, metavar="SECONDS",
                   help="when another process works on the same dissection in the cache: wait at most SECONDS "
                        "for it (0: not at all) and then give up (default: wait, then load its result)")
    p.add_argument("--pilot-samples", type=int, default=512,
                   help="samples whose pixels place the quantile rule's histogram edges (default 512)")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="how often the work so far is saved in the cache, to resume from (default 60; 0: every batch)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("layers", help="list a generator's feature maps (the layers to dissect) with their shapes")
    _add_model_args(p, with_segmenter=False)
    p.add_argument("--all", action="store_true", help="list every module that runs, with its output")

    sub.add_parser("models", help="list registered generators and segmenters")

    def causal(name, help_):
        p = sub.add_parser(name, help=help_)
        _add_model_args(p, default=None)
        p.add_argument("--layer", required=True, help="the layer to intervene at")
        p.add_argument("--out", required=True, help="output directory (JSON and PNG figures)")
        p.add_argument("--dissection", default=None,
                       help="a directory written by `gandissect dissect` (else the layer is dissected here)")
        p.add_argument("--dissect-samples", type=int, default=500, help="samples if dissecting here (default 500)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--quiet", action="store_true")
        return p

    p = causal("ace", "average causal effect of a unit set, single-unit ACE ranking, removal curve")
    p.add_argument("--concept", required=True)
    p.add_argument("--units", type=int, nargs="+", default=None, help="unit set (default: top --top units by IoU)")
    p.add_argument("--top", type=int, default=None, help="the unit set is the top TOP units by IoU (default 20); "
                                                          "not with --units")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--unit-samples", type=int, default=32, help="samples per unit for the ACE ranking (0: skip)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="unit counts of the removal curve (default 1 2 5 10 20 50, those the layer has)")
    p.add_argument("--random-draws", type=int, default=5)

    p = causal("optimize", "learn a continuous intervention vector for a concept")
    p.add_argument("--concept", required=True)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--l2", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=10)

    p = causal("context", "insert a concept's top units one cell at a time, tabulated by what is there")
    p.add_argument("--concept", required=True)
    p.add_argument("--top", type=int, default=None, help="the top TOP units by IoU (default 20, or all if fewer)")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--locations", type=int, default=8, help="places per sample (0: every place)")
    p.add_argument("--patch", type=int, default=1, help="side of the inserted square, in layer cells")
    p.add_argument("--strength", type=float, default=1.0, help="multiple of the units' insertion values")
    p.add_argument("--seed", type=int, default=5)

    p = causal("artifacts", "rank units by how much ablating them improves sample quality (default generator: "
                            "sceneworld-artifacts, SceneWorld with planted artifact units)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--top-samples", type=int, default=None,
                   help="top-activating samples per unit (default 100, or --samples if fewer)")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--reference", default=None,
                   help="real images: a folder of images or a .pt tensor (N,3,H,W) in [-1,1]; "
                        "default for sceneworld: its renders")
    p.add_argument("--reference-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--features", choices=("segmenter", "inception"), default="segmenter",
                   help="feature space of the Fréchet distance: the segmenter's (default) or Inception-v3's (FID; "
                        "needs --inception-weights)")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception weights: the TorchScript inception-2015-12-05.pt (StyleGAN2-ADA, clean-fid), "
                        "or torch-fidelity's .pth with torch-fidelity installed; nothing is downloaded")
    p.add_argument("--baseline", default=None,
                   help="a generator to compare the distances with (default: sceneworld for sceneworld-artifacts, "
                        "else none; 'none': none)")

    from gandissect_widgets.report.html import add_parser as add_report_parser
    add_report_parser(sub)
    return parser


# -- checks made before any computation ----------------------------------------------------------
def _device(name):
    """The device string to use: ``name`` checked (it must exist here), or cuda if available, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or cuda:N (N: the GPU's index)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch.cuda.is_available() is False: no GPU or no driver")
            raise UserError(f"--device {name}: no CUDA GPU is usable here ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {name}: there are {n} CUDA device(s) here, cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {name}: {dev.type!r} devices are not supported; use cpu or cuda (cuda:N)")
    return name


def _int(flag, value, lo=None, hi=None):
    if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = (f">= {lo}" if hi is None else f"between {lo} and {hi}") if lo is not None else f"<= {hi}"
        raise UserError(f"{flag} must be an integer {bound}, got {value}")
    return value


def _number(flag, value, lo=None, hi=None, lo_open=False, hi_open=False, hint=""):
    """A finite float within bounds (open or closed ends)."""
    ok = value is not None and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if lo is not None and hi is not None:
            want = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        elif lo is not None:
            want = f"{'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            want = f"{'<' if hi_open else '<='} {hi}"
        else:
            want = "a finite number"
        raise UserError(f"{flag} must be a finite number {want}{hint}, got {value}")
    return value


def _seed(value, flag="--seed"):
    return _int(flag, value, 0, 2 ** 32 - 1)


def _nearest_existing(path):
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _check_writable_dir(d, flag, given):
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {given}: cannot write in {d} (permission denied or a read-only file system); "
                        f"choose a folder you can write in")
    try:  # a real write: access() does not see everything (root on a read-only mount, a full disk, ...)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".gandissect-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {given}: cannot write in {d} ({e.strerror or e}); choose a folder you can write in") \
            from None


def _check_out_dir(given, flag="--out"):
    """``given`` is (or can be made) a folder this process can write in; nothing is created."""
    if given is None:
        return None
    if not given.strip():
        raise UserError(f"{flag} is empty; give the folder to write in (a new or an existing one), e.g. {flag} results")
    p = os.path.abspath(given)
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise UserError(f"{flag} {given} is a file, not a folder; give a new or an existing folder")
        _check_writable_dir(p, flag, given)
        return given
    anc = _nearest_existing(p)
    if os.path.islink(anc) and not os.path.exists(anc):
        raise UserError(f"cannot create {flag} {given}: {anc} is a broken symbolic link; give another folder")
    if not os.path.isdir(anc):
        raise UserError(f"cannot create {flag} {given}: {anc} is a file, not a folder; give a folder whose "
                        f"parents are folders")
    _check_writable_dir(anc, flag, given)
    return given


def _check_out_file(given, flag="--out"):
    """``given`` is a file that can be written (its folder exists or can be made)."""
    if not given.strip():
        raise UserError(f"{flag} is empty; give the file to write, e.g. {flag} report.html")
    if os.path.isdir(given):
        raise UserError(f"{flag} {given} is a folder; give the file to write, "
                        f"e.g. {os.path.join(given, 'report.html')}")
    if os.path.lexists(given) and not os.access(given, os.W_OK):
        raise UserError(f"{flag} {given}: the file exists and cannot be overwritten (permission denied)")
    _check_out_dir(os.path.dirname(os.path.abspath(given)), flag)
    return given


def _check_checkpoint_arg(flag, value):
    if value is not None and not value.strip():
        raise UserError(f"{flag} is empty; give the path of the weights file (or leave {flag} out)")


def _fmt_bytes(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def _available_memory():
    """Bytes of memory available to this process now (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk(path):
    try:
        return shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return None


def _check_samples(flag, n, probe, disk_dir=None, lo=1):
    """``n`` samples fit: the latents (held in memory) and, with ``disk_dir``, the segmentation cache."""
    _int(flag, n, lo)
    if n == 0:
        return n
    problems, limits = [], []
    per_mem = probe["latent_bytes"]
    avail = _available_memory()
    if avail is not None and per_mem and n * per_mem > 0.8 * avail:
        problems.append(f"its latents alone need about {_fmt_bytes(n * per_mem)} of memory "
                        f"({_fmt_bytes(avail)} available)")
        limits.append(int(0.8 * avail // per_mem))
    per_disk = probe.get("seg_bytes") if disk_dir else None
    free = _free_disk(disk_dir) if per_disk else None
    if free is not None and n * per_disk > free:
        problems.append(f"its segmentation cache needs about {_fmt_bytes(n * per_disk)} of disk in "
                        f"{os.path.abspath(disk_dir)} ({_fmt_bytes(free)} free)")
        limits.append(int(free // per_disk))
    if problems:
        raise UserError(f"{flag} {n} is too many: " + " and ".join(problems) +
                        f"; use at most about {max(0, min(limits))} samples (or free memory / disk space)")
    return n


# -- models ---------------------------------------------------------------------------------------
def _load(kind, name, checkpoint, device, trust_pickle=False):
    """The registered ``kind`` ("generator"/"segmenter") ``name``, with failures to read the
    checkpoint explained (the file named; how to give trust when a loader can take it)."""
    from gandissect_widgets import registry
    from gandissect_widgets.checkpoint import CheckpointError, UntrustedPickleError, explain_load_error
    flag = "--checkpoint" if kind == "generator" else "--segmenter-checkpoint"
    takes = lambda opt: registry.takes_option(kind, name, opt)  # noqa: E731 (raises for unknown names)
    if checkpoint is not None:
        _check_checkpoint_arg(flag, checkpoint)
        if not takes("checkpoint"):
            reg = registry.GENERATORS if kind == "generator" else registry.SEGMENTERS
            raise UserError(f"{flag}: {kind} {name!r} loads no checkpoint (its options: "
                            f"{', '.join(reg.options(name) or []) or 'none'}); leave {flag} out, or choose a "
                            f"{kind} family that loads weights")
    try:
        return registry.load_model(kind, name, device, checkpoint, trust_pickle)
    except UntrustedPickleError as e:
        if takes("trust_pickle"):
            raise
        raise CheckpointError(f"{e.args[0].split('; if you know')[0]}; the {kind} {name!r} loader reads weights only "
                              f"(it takes no trust_pickle): save the weights alone, torch.save(model.state_dict(), "
                              f"PATH), and give that file") from e
    except FileNotFoundError:
        if checkpoint is not None and not os.path.lexists(checkpoint):
            raise UserError(f"{flag} {checkpoint} does not exist; give the path of the {kind} {name!r} weights "
                            f"(or leave {flag} out for its default)") from None
        raise
    except Exception as e:
        if checkpoint is not None and os.path.isfile(checkpoint):
            err = explain_load_error(checkpoint, e)
            if err is not None:
                if isinstance(err, UntrustedPickleError) and not takes("trust_pickle"):
                    err = CheckpointError(f"{err.args[0].split('; if you know')[0]}; the {kind} {name!r} loader "
                                          "reads weights only: save the weights alone and give that file")
                raise err from e
            if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e):
                raise CheckpointError(f"checkpoint {checkpoint} does not fit the {kind} {name!r}: "
                                      f"{_one_line(str(e), 600)}; give a checkpoint of this family") from e
        raise


def _load_models(a, device, segmenter=True):
    from gandissect_widgets import registry
    if a.trust_pickle:
        names = [("generator", a.generator)] + ([("segmenter", a.segmenter)] if segmenter else [])
        if not any(registry.takes_option(k, n, "trust_pickle") for k, n in names):
            who = " and ".join(f"{k} {n!r}" for k, n in names)
            raise UserError(f"--trust-pickle: {who} {'read' if len(names) > 1 else 'reads'} weights only (no "
                            f"trust_pickle option), so there is nothing to trust; leave --trust-pickle out")
    G = _load("generator", a.generator, a.checkpoint, device, a.trust_pickle)
    if not segmenter:
        return G
    S = _load("segmenter", a.segmenter, a.segmenter_checkpoint, device, a.trust_pickle)
    return G, S


def _probe(G, S, layers, device):
    """One sample through the models: each layer's output must be a (N,C,h,w) tensor.

    Returns {"layers": {name: (C,h,w)}, "latent_bytes": per sample (with the copies made while
    drawing), "seg_bytes": per sample of the segmentation cache, "labels": S.labels}."""
    from gandissect_widgets.engine.hooks import resolve_layers
    from gandissect_widgets.engine.layer_listing import feature_maps, probe_layers
    from gandissect_widgets.engine.protocols import check_generator, check_images, check_segmenter, segment
    check_generator(G)
    resolve_layers(G, layers)
    G.to(device).eval()
    if S is not None:
        check_segmenter(S)
        if isinstance(S, torch.nn.Module):
            S.to(device).eval()
    z = G.sample_z(1, 0)
    if not torch.is_tensor(z) or z.shape[0] != 1:
        raise UserError(f"{type(G).__name__}.sample_z(1, 0) must return a tensor with 1 row, got "
                        f"{type(z).__name__} {tuple(getattr(z, 'shape', ()))}")
    p = probe_layers(G, layers, z.to(device))
    x = p.output
    check_images(x, 1)
    shapes = {}
    for name in layers:
        out = p.layers.get(name)
        if out is None:
            raise UserError(f"layer {name!r} did not run in a forward pass of {type(G).__name__}; "
                            f"choose a layer that runs (see `gandissect layers`)")
        if out.shape is None or len(out.shape) != 4:
            what = out.kind + ("" if out.shape is not None else ", not a tensor")
            good = [n for n, _ in feature_maps(G)]
            shown = ", ".join(good[:20]) + (" ..." if len(good) > 20 else "")
            raise UserError(f"layer {name!r} outputs {what}; dissection and interventions need a layer whose output "
                            f"is a feature map tensor (N,C,h,w): e.g. {shown or '(none found)'}")
        shapes[name] = tuple(out.shape[1:])
    info = {"layers": shapes, "latent_bytes": 3 * z[0].numel() * max(4, z.element_size()), "seg_bytes": None,
            "labels": None}
    if S is not None:
        seg = segment(S, x)
        C = len(S.labels)
        item = 1 if C <= 256 else (2 if C <= 32767 else 4)
        info["seg_bytes"] = seg[0].numel() * item
        info["labels"] = list(S.labels)
    return info


def _check_concept(concept, labels, segmenter_name):
    if concept not in labels[1:]:
        raise UserError(f"unknown concept {concept!r} for segmenter {segmenter_name!r}; its concepts: "
                        f"{', '.join(map(str, labels[1:]))}")


@contextlib.contextmanager
def tidy_on_failure(out, cache=None):
    """On failure, remove what the command left empty: the cache's empty work folders, the cache
    folder and ``out`` if this command created them (work a run can resume from stays)."""
    existed = {d: os.path.isdir(d) for d in (cache, out) if d}
    try:
        yield
    except BaseException:
        if cache and os.path.isdir(cache):
            for entry in os.listdir(cache):
                if entry.startswith("dissect-"):
                    for sub in (os.path.join(cache, entry, "work"), os.path.join(cache, entry)):
                        with contextlib.suppress(OSError):
                            os.rmdir(sub)  # only an empty folder goes
        for d in (cache, out):
            if d and not existed[d]:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        raise


# -- commands -------------------------------------------------------------------------------------
def _cache_dir(a):
    if a.cache_dir is not None and a.cache_dir.lower() == "none":
        return None
    if a.cache_dir is not None:
        return _check_out_dir(a.cache_dir, "--cache-dir")
    return os.path.join(a.out, ".cache")


def cmd_dissect(a):
    from gandissect_widgets.engine.dissection import CacheBusyError, dissect
    from gandissect_widgets.engine.protocols import NonFiniteError
    from gandissect_widgets.registry import recorded_models
    device = _device(a.device)
    _check_out_dir(a.out)
    cache = _cache_dir(a)
    _int("--samples", a.samples, 1)
    _seed(a.seed)
    _number("--quantile", a.quantile, 0.5, 1, hi_open=True, hint=" (0.99: the top 1%)")
    _int("--batch-size", a.batch_size, 1)
    _int("--lanes", a.lanes, 1)
    _int("--topk", a.topk, 1)
    _int("--pilot-samples", a.pilot_samples, 1)
    _number("--checkpoint-every", a.checkpoint_every, 0, hint=" seconds (0: every batch)")
    _number("--min-iou", a.min_iou, 0, 1, hi_open=True, hint=f" ({DEFAULT_MIN_IOU:g}: the papers' cut-off)")
    if a.lock_wait is not None:
        _number("--lock-wait", a.lock_wait, 0, hint=" seconds (0: do not wait)")
    if len(set(a.layers)) != len(a.layers):
        raise UserError(f"--layers repeats a layer: {' '.join(a.layers)}; name each layer once")
    G, S = _load_models(a, device)
    probe = _probe(G, S, a.layers, device)
    _check_samples("--samples", a.samples, probe, disk_dir=cache or tempfile.gettempdir())
    _run_state["cache"] = cache
    with tidy_on_failure(a.out, cache):
        try:
            d = dissect(G, S, a.layers, n_samples=a.samples, seed=a.seed, quantile=a.quantile,
                        batch_size=a.batch_size, device=device, cache_dir=cache, topk=a.topk, progress=not a.quiet,
                        lanes=a.lanes, generator_name=a.generator, segmenter_name=a.segmenter,
                        nonfinite=a.nonfinite, lock_wait=a.lock_wait, threshold=a.threshold, method=a.method,
                        upsample=a.upsample, pilot_samples=a.pilot_samples, checkpoint_every=a.checkpoint_every)
        except NonFiniteError as e:
            raise UserError(f"{e}; on the command line: --nonfinite skip") from e
        except CacheBusyError as e:
            raise UserError(f"{e}; on the command line: leave --lock-wait out to wait for it and load its result, "
                            f"or give another --cache-dir") from e
        models = recorded_models(G, S)  # how this command's models load again (registry recipes)
        if models is not None:
            d.settings["models"] = models
        if not current().writer:  # one rank of a torchrun job: rank 0 writes and tells
            return
        d.save(a.out, min_iou=a.min_iou)
    for layer in d.layers:
        counts = d.concept_counts(layer, a.min_iou)
        print(f"{layer}: {int(d.interpretable(layer, a.min_iou).sum())}/{len(d.thresholds(layer))} "
              f"interpretable units; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    skipped = d.settings.get("nonfinite_skipped")
    if skipped:
        print(f"left out as not finite (--nonfinite skip): {json.dumps(skipped)}")
    ceiling = d.ceiling_warning(a.min_iou)
    if ceiling:
        print(f"warning: {ceiling}", file=sys.stderr)
    with open(os.path.join(a.out, "dissect.json")) as f:
        arrays = json.load(f)["arrays"]["file"]
    print(f"wrote {os.path.join(a.out, 'dissect.json')} and {os.path.join(a.out, arrays)}")


def fill_models_from(a, directory):
    """--generator/--segmenter left out (None): the ones the result in ``directory`` records, with their
    checkpoints unless --checkpoint is given; else sceneworld."""
    from gandissect_widgets.registry import models_to_load
    settings = {}
    if directory:
        try:
            with open(os.path.join(directory, "dissect.json")) as f:
                settings = json.load(f).get("settings")
        except (OSError, ValueError, AttributeError):
            pass  # loading the dissection says what is wrong with it
    chosen = models_to_load(settings, directory, a.generator, a.checkpoint, a.segmenter, a.segmenter_checkpoint,
                            default="sceneworld")
    (a.generator, a.checkpoint), (a.segmenter, a.segmenter_checkpoint) = chosen["generator"], chosen["segmenter"]


def cmd_layers(a):
    from gandissect_widgets.engine.layer_listing import feature_maps, module_outputs
    G = _load_models(a, _device(a.device), segmenter=False)
    rows = module_outputs(G) if a.all else feature_maps(G)
    if not rows:
        raise UserError(f"generator {a.generator!r} has no layers that run in a forward pass" if a.all else
                        f"generator {a.generator!r} has no layer whose output is a feature map (N,C,h,w); "
                        f"`gandissect layers --all` lists every module that runs, with its output")
    width = max(len(n) for n, _ in rows)
    for n, s in rows:
        print(f"{n:<{width}}  {s}")


def cmd_models(a):
    from gandissect_widgets.registry import list_models
    for kind, entries in list_models().items():
        print(f"{kind}:")
        unused = entries.pop("(not used)", [])
        width = max((len(n) for n in entries), default=0)
        for name, e in entries.items():
            print(f"  {name:<{width}}  [{e['from']}]" + (f" {e['description']}" if e["description"] else ""))
        for line in unused:
            print(f"  (not used) {line}")
    print("or any import path package.module:factory (a function or class returning the model), "
          "e.g. --generator mygan:make_generator")


def check_result_dir(given, what, optional=False):
    """``given`` names a directory written by `gandissect dissect` (checked before anything is loaded)."""
    advice = "give a directory written by `gandissect dissect`" + (" (or leave it out)" if optional else "")
    if not given.strip():
        raise UserError(f"{what} is empty; {advice}")
    if not os.path.isdir(given):
        why = "it is a file" if os.path.exists(given) else "the folder does not exist"
        raise UserError(f"no dissect.json in {what} {given!r}: {why}; {advice}")
    if not os.path.isfile(os.path.join(given, "dissect.json")):
        raise UserError(f"no dissect.json in {what} {given!r}: not a saved dissection; {advice}")
    return given


def cmd_report_checked(a):
    from gandissect_widgets.report.html import cmd_report
    check_result_dir(a.dir, "the report's DIR")
    if a.out is not None:
        _check_out_file(a.out)
    else:
        _check_writable_dir(os.path.abspath(a.dir), "the report's DIR", a.dir)
    _int("--samples-per-unit", a.samples_per_unit, 1)
    _int("--top-units", a.top_units, 0)
    if not a.no_pictures:
        a.device = _device(a.device)
    _check_checkpoint_arg("--checkpoint", a.checkpoint)
    _check_checkpoint_arg("--segmenter-checkpoint", a.segmenter_checkpoint)
    if not a.no_pictures:
        fill_models_from(a, a.dir)
    cmd_report(a)


# -- the error boundary ---------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_run_state: dict = {}


def _one_line(text, limit=1500) -> str:
    text = re.sub(r"\s+", " ", _ANSI.sub("", str(text))).strip()
    return text if len(text) <= limit else text[:limit - 5].rstrip() + " ..."


def _frames(exc):
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _json_file(exc):
    """The name of the file ``json.load`` was reading when ``exc`` was raised (else None)."""
    for frame in _frames(exc):
        if frame.f_code is json.load.__code__:
            return getattr(frame.f_locals.get("fp"), "name", None)
    return None


def _dissection_dir(exc):
    """The directory ``Dissection.load`` was reading when ``exc`` was raised (else None)."""
    from gandissect_widgets.engine.results import Dissection
    code = Dissection.load.__func__.__code__
    for frame in _frames(exc):
        if frame.f_code is code:
            return os.fspath(frame.f_locals.get("directory"))
    return None


def _inside(path, folder):
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)
    except ValueError:
        return False


def _reason(exc) -> str:
    """What went wrong, in words, for an exception met while reading a file."""
    if isinstance(exc, json.JSONDecodeError):
        name = _json_file(exc) or "a JSON file"
        return f"{name} is not valid JSON (truncated or damaged?): {exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, KeyError) and not (isinstance(exc.args[0], str) and " " in exc.args[0]):
        return f"a field is missing: {exc.args[0]!r}"
    if isinstance(exc, OSError) and exc.strerror and not (exc.args and isinstance(exc.args[0], str)):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{type(exc).__name__}: {msg}" if not isinstance(exc, (ValueError, OSError, KeyError)) else str(msg)


def _os_message(e: OSError) -> str:
    if e.args and isinstance(e.args[0], str) and len(e.args) == 1:
        return e.args[0]  # one of our own messages
    what = f"{e.strerror or type(e).__name__}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") \
        if e.filename else (e.strerror or str(e))
    hints = {errno.ENOSPC: "free some disk space or write elsewhere (--out, --cache-dir)",
             errno.EACCES: "choose a path you can read and write", errno.EPERM: "choose a path you can read and write",
             errno.EROFS: "the file system is read-only: write elsewhere",
             errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EISDIR: "give a file, not a folder", errno.ENOENT: "check the path"}
    hint = hints.get(e.errno)
    return f"{what}; {hint}" if hint else what


def expected_message(exc) -> str | None:
    """The one-line message for an expected failure, or None for a bug."""
    from gandissect_widgets.download import DownloadError
    from gandissect_widgets.engine.hooks import UnknownLayerError
    from gandissect_widgets.registry import UnknownNameError

    where = _dissection_dir(exc)
    if where is not None:  # a saved dissection that cannot be read: a damaged file, never a bug
        reason = _reason(exc)
        cache = _run_state.get("cache")
        cached = (cache and _inside(where, cache)) or os.path.basename(os.path.normpath(where)).startswith("dissect-")
        if cached:
            advice = (f"it is a damaged cached result: delete {where} (or run with --cache-dir none) and run the "
                      f"command again")
        else:
            advice = "give a directory written by `gandissect dissect`, or write it again with that command"
        if where not in reason:
            reason = f"cannot load the dissection in {where}: {reason}"
        if cached and "delete" not in reason:
            return f"{reason}; {advice}"
        return reason if "delete" in reason or "recompute" in reason else f"{reason}; {advice}"
    if isinstance(exc, json.JSONDecodeError):
        return _reason(exc) + "; restore the file or write it again"
    if isinstance(exc, (UserError, RankFailed)):
        return str(exc)
    if isinstance(exc, KeyError):
        if isinstance(exc, (UnknownLayerError, UnknownNameError)) or (
                exc.args and isinstance(exc.args[0], str) and " " in exc.args[0]):
            return str(exc.args[0])
        return None
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (f"out of memory ({type(exc).__name__}{': ' + _one_line(str(exc), 200) if str(exc) else ''}); "
                f"use fewer samples, a smaller --batch-size or --lanes 1, or a machine with more memory")
    if isinstance(exc, DownloadError):
        return str(exc)
    if isinstance(exc, ImportError):
        mod = getattr(exc, "name", None) or ""
        return None if mod.startswith("gandissect_widgets") else str(exc)
    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, ValueError):
        return str(exc) or type(exc).__name__
    return None


def _holds_work(cache) -> bool:
    """Whether ``cache`` holds work a rerun resumes from (a checkpoint or segmentations)."""
    if not cache or not os.path.isdir(cache):
        return False
    for _, _, files in os.walk(cache):
        if "checkpoint.pt" in files or "segmentation.npy" in files:
            return True
    return False


def _job(args):
    """The commands that run models run as one rank of a ``torchrun`` job when started by one
    (``engine.distributed.job``: gloo on CPUs, nccl for --device cuda, one GPU per local rank);
    otherwise, and for the others, as one process."""
    if args.command not in ("dissect", "ace", "optimize", "context", "artifacts"):
        return contextlib.nullcontext()
    if args.rank_timeout is not None:
        _number("--rank-timeout", args.rank_timeout, 0, lo_open=True, hint=" seconds")
    return job(_device(getattr(args, "device", None)), timeout=args.rank_timeout or DEFAULT_TIMEOUT)


COMMANDS = {"dissect": cmd_dissect, "layers": cmd_layers, "models": cmd_models, "report": cmd_report_checked}


def main(argv=None) -> int:
    """Run one command; 0 on success, 2 for an expected failure (one line), 130 interrupted, 1 a bug."""
    from gandissect_widgets import causal_cli
    commands = dict(COMMANDS, ace=causal_cli.cmd_ace, optimize=causal_cli.cmd_optimize,
                    context=causal_cli.cmd_context, artifacts=causal_cli.cmd_artifacts)
    _run_state.clear()
    args = None
    try:
        args = build_parser().parse_args(argv)
        if args.command == "artifacts" and args.generator is None and not args.dissection:
            args.generator = "sceneworld-artifacts"  # the GAN whose artifact units are known
        if args.command in ("ace", "optimize", "context", "artifacts"):
            fill_models_from(args, args.dissection if args.dissection and os.path.isdir(args.dissection) else None)
        with _job(args), warnings.catch_warnings():
            from gandissect_widgets.engine.results import LowCeilingWarning
            warnings.simplefilter("ignore", LowCeilingWarning)  # dissect prints its own line (d.ceiling_warning)
            commands[args.command](args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt as e:
        cache = _run_state.get("cache")
        hint = f"; the work so far is kept in {cache}: the same command resumes it" if _holds_work(cache) else ""
        how = "interrupted"
        if "SIGTERM" in str(e):  # engine.workdir.InterruptGuard: `kill`, or torchrun stopping a job's ranks
            ranks = os.environ.get("WORLD_SIZE", "1")
            how = (f"rank {os.environ.get('RANK', '?')} of {ranks} stopped by its launcher (SIGTERM: another rank of "
                   f"the job failed; torchrun's report names it)" if ranks not in ("", "1") else "stopped (SIGTERM)")
        print(f"{PROG}: {how}{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        msg = expected_message(e)
        if msg is None:
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(str(e), 300)}. This is a bug in "
                  f"gandissect-widgets, not a problem with your input: please report it with the traceback above",
                  file=sys.stderr)
            return 1
        if os.environ.get("GANDISSECT_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    finally:
        sys.stdout.flush()
    return 0


if __name__ == "__main__":  # python -m: run the package's module, whose classes the other modules raise
    from gandissect_widgets.cli import main as _main
    sys.exit(_main())
