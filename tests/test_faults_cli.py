"""A catalogue of faults at the command line: each is one line on stderr, exit status 2, nothing written.

Every case runs ``gandissect_widgets.cli.main([...])`` in-process on the planted world (or tiny
stand-ins) and checks: status 2; stderr is exactly one line, ``gandissect: error: ...``, with the
case's key words and no traceback; ``--out``, which holds an earlier result, is byte for byte as it
was and still loads; a new ``--out`` path is not created.  A few cases run in a subprocess.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets import cli
from gandissect_widgets.cli import main
from gandissect_widgets.registry import GENERATORS, SEGMENTERS
from tiny import TinyGenerator, TinySegmenter
from tiny_real import write_nvidia_standin

P = ["--generator", "planted", "--segmenter", "planted", "--device", "cpu", "--quiet"]
DIS = ["dissect", *P, "--layers", "layer1", "--samples", "20"]


def CAUSAL(cmd, layer="layer1"):
    return [cmd, *P, "--layer", layer, "--dissection", "{earlier}"]


# -- stand-ins -------------------------------------------------------------------------------------
class Pair(nn.Module):
    def forward(self, x):
        return x, x.mean()


class TupleGenerator(nn.Module):
    """'body' is a feature map, 'pair' outputs a tuple, 'head' a flat (N, 8) tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8 * 4 * 4)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.pair = Pair()
        self.head = nn.Linear(8, 8)
        self.rgb = nn.Conv2d(8, 3, 1)

    def forward(self, z):
        x = self.body(self.lin(z).view(-1, 8, 4, 4))
        x, _ = self.pair(x)
        self.head(x.mean((2, 3)))
        return torch.tanh(self.rgb(x))

    def sample_z(self, n, seed=0):
        return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


class NaNImages(TinyGenerator):
    """Samples whose first latent is above 1 are all NaN."""

    def forward(self, z):
        x = super().forward(z)
        return torch.where((z[:, 0] > 1.0)[:, None, None, None], torch.full_like(x, math.nan), x)


@pytest.fixture(scope="module", autouse=True)
def tuple_generator():
    GENERATORS.register("faults-tuple", lambda device="cpu": TupleGenerator().to(device), "test", overwrite=True)
    GENERATORS.register("faults-nan", lambda device="cpu": NaNImages().to(device), "test", overwrite=True)
    GENERATORS.register("faults-tiny", lambda device="cpu": TinyGenerator().to(device), "test", overwrite=True)
    SEGMENTERS.register("faults-seg", lambda device="cpu": TinySegmenter().to(device), "test", overwrite=True)
    yield
    GENERATORS.unregister("faults-tuple")
    GENERATORS.unregister("faults-nan")
    GENERATORS.unregister("faults-tiny")
    SEGMENTERS.unregister("faults-seg")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files shared by the cases: an earlier dissection result, damaged checkpoints, a plain file."""
    root = tmp_path_factory.mktemp("faults")
    earlier = root / "earlier"
    assert main([*DIS, "--out", str(earlier), "--cache-dir", "none"]) == 0
    torch.save({"w": torch.ones(100)}, root / "good.pt")
    good = (root / "good.pt").read_bytes()
    (root / "trunc.pt").write_bytes(good[: len(good) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "rand.pt").write_bytes(bytes((i * 97 + 13) % 256 for i in range(4096)))
    torch.save({"g_ema": {}, "args": SimpleNamespace(size=64)}, root / "objects.pt")  # needs trust
    (root / "network.pkl").write_bytes(pickle.dumps({"G_ema": None}))
    (root / "afile").write_text("not a folder\n")
    broken = root / "broken"
    shutil.copytree(earlier, broken)
    text = (broken / "dissect.json").read_text()
    (broken / "dissect.json").write_text(text[: len(text) // 3])  # truncated JSON
    torch.save(torch.zeros(2, 3, 8, 8), root / "ref.pt")
    (root / "ref_trunc.pt").write_bytes((root / "ref.pt").read_bytes()[:200])
    return SimpleNamespace(root=root, earlier=earlier, broken=broken)


def snapshot(folder):
    if not os.path.exists(folder):
        return None
    out = {}
    for base, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(base, d), folder) + "/"] = "dir"
        for f in files:
            p = os.path.join(base, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# -- set-ups for cases that need more than arguments --------------------------------------------------
def _deny_access_under(prefix):
    real = os.access

    def access(path, mode, *a, **k):
        if os.path.abspath(path).startswith(prefix) and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)
    return access


def setup_unwritable(ctx, mp):
    ro = ctx.tmp / "ro"
    ro.mkdir()
    mp.setattr(os, "access", _deny_access_under(str(ro)))  # root ignores chmod: say no here
    ctx.ro = ro


def setup_readonly_fs(ctx, mp):
    """A real read-only file system when this process may mount one, else a probe that fails as one."""
    ro = ctx.tmp / "ro"
    ro.mkdir()
    ctx.ro = ro
    if os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        ctx.cleanup.append(lambda: subprocess.run(["umount", str(ro)], capture_output=True))
        return

    def mkstemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    mp.setattr(cli.tempfile, "mkstemp", mkstemp)


def setup_cached_result(ctx, mp, damage):
    """A cached result of the very command the case runs, then damaged."""
    assert main([*DIS, "--out", str(ctx.out)]) == 0
    (entry,) = [p for p in (ctx.out / ".cache").iterdir() if p.name.startswith("dissect-")]
    doc = entry / "dissect.json"
    text = doc.read_text()
    doc.write_text(text.replace('"iou": 0', '"iou": 1', 1) if damage == "edit" else text[: len(text) // 2])


def setup_memory_error(ctx, mp):
    from gandissect_widgets.engine import dissection

    def dissect(*a, cache_dir=None, **k):  # runs out of memory after making its work folder
        os.makedirs(os.path.join(cache_dir, "dissect-0123", "work"))
        raise MemoryError()
    mp.setattr(dissection, "dissect", dissect)


def setup_disk_full(ctx, mp):
    from gandissect_widgets.engine.results import Dissection

    def save(self, directory, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, "dissect.json"))
    mp.setattr(Dissection, "save", save)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (argv with {out} = a copy of the earlier result, {new} = a path that does not exist, {root} = the
#  shared files; key words; set-up)
CASES = [
    # --out and --cache-dir: checked before anything is computed
    pytest.param([*DIS, "--out", "{root}/afile"], ["--out", "is a file, not a folder"], None, id="out-is-a-file"),
    pytest.param([*DIS, "--out", "{root}/afile/sub"], ["cannot create --out", "afile is a file"], None,
                 id="out-under-a-file"),
    pytest.param([*DIS, "--out", ""], ["--out is empty", "give the folder"], None, id="out-empty"),
    pytest.param([*DIS, "--out", "{tmp}/ro/res"], ["cannot write in", "choose a folder you can write"],
                 setup_unwritable, id="out-unwritable"),
    pytest.param([*DIS, "--out", "{tmp}/ro/res"], ["cannot write in", "ro"], setup_readonly_fs,
                 id="out-read-only-file-system"),
    pytest.param([*DIS, "--out", "{out}", "--cache-dir", "{root}/afile"], ["--cache-dir", "is a file"], None,
                 id="cache-dir-is-a-file"),
    pytest.param([*CAUSAL("ace"), "--concept", "red", "--out", "{root}/afile"], ["--out", "is a file"], None,
                 id="ace-out-is-a-file"),
    # devices
    pytest.param([*DIS, "--out", "{new}", "--device", "cuda"], ["--device cuda", "no CUDA GPU", "--device cpu"], None,
                 id="device-cuda-without-gpu", marks=NO_CUDA),
    pytest.param([*DIS, "--out", "{new}", "--device", "tpu0"], ["unknown --device 'tpu0'", "cpu, cuda"], None,
                 id="device-unknown"),
    pytest.param([*DIS, "--out", "{new}", "--device", "cuda:99"], ["--device cuda:99"], None, id="device-index"),
    pytest.param(["layers", "--generator", "planted", "--device", "gpu"], ["unknown --device 'gpu'"], None,
                 id="layers-device-unknown"),
    # numbers
    pytest.param([*DIS, "--out", "{new}", "--samples", "1000000000000"],
                 ["--samples 1000000000000 is too many", "memory", "use at most"], None, id="samples-huge"),
    pytest.param([*DIS, "--out", "{out}", "--samples", "0"], ["--samples must be an integer >= 1", "got 0"], None,
                 id="samples-zero"),
    pytest.param([*DIS, "--out", "{out}", "--min-iou", "nan"], ["--min-iou", "finite number", "nan"], None,
                 id="min-iou-nan"),
    pytest.param([*DIS, "--out", "{out}", "--min-iou", "inf"], ["--min-iou", "inf"], None, id="min-iou-inf"),
    pytest.param([*DIS, "--out", "{out}", "--quantile", "1.5"], ["--quantile", "[0.5, 1)", "1.5"], None,
                 id="quantile-above-1"),
    pytest.param([*DIS, "--out", "{out}", "--quantile", "nan"], ["--quantile", "nan"], None, id="quantile-nan"),
    pytest.param([*DIS, "--out", "{out}", "--lanes", "0"], ["--lanes must be an integer >= 1"], None, id="lanes-zero"),
    pytest.param([*DIS, "--out", "{out}", "--batch-size", "0"], ["--batch-size must be an integer >= 1"], None,
                 id="batch-size-zero"),
    pytest.param([*DIS, "--out", "{out}", "--seed", "-1"], ["--seed must be an integer between 0 and"], None,
                 id="seed-negative"),
    pytest.param([*DIS, "--out", "{out}", "--samples", "abc"], ["invalid int value: 'abc'", "--help"], None,
                 id="samples-not-a-number"),
    pytest.param([*DIS, "--out", "{out}", "--lock-wait", "-1"], ["--lock-wait must be a finite number >= 0", "-1"],
                 None, id="lock-wait-negative"),
    pytest.param([*DIS, "--out", "{out}", "--lock-wait", "nan"], ["--lock-wait", "finite number", "nan"], None,
                 id="lock-wait-nan"),
    pytest.param([*DIS, "--out", "{out}", "--nonfinite", "ignore"], ["--nonfinite", "invalid choice: 'ignore'"],
                 None, id="nonfinite-unknown"),
    pytest.param(["dissect", "--generator", "faults-nan", "--segmenter", "faults-seg", "--layers", "layer2",
                  "--samples", "40", "--out", "{new}", "--quiet", "--cache-dir", "none"],
                 ["non-finite values (NaN or inf)", "images:", "--nonfinite skip"], None, id="nan-images"),
    pytest.param(["dissect", *P, "--out", "{out}"], ["required", "--layers"], None, id="layers-missing"),
    # names and layers
    pytest.param([*DIS[:-4], "--layers", "nope", "--out", "{out}"], ["unknown layer 'nope'", "layer1"], None,
                 id="layer-unknown"),
    pytest.param([*DIS[:-4], "--layers", "layer1", "layer1", "--out", "{out}"], ["repeats a layer"], None,
                 id="layer-repeated"),
    pytest.param(["dissect", "--generator", "nosuch", "--layers", "x", "--out", "{new}"],
                 ["unknown generator 'nosuch'", "planted"], None, id="generator-unknown"),
    pytest.param(["dissect", "--generator", "planted", "--segmenter", "nosuch", "--layers", "x", "--out", "{new}"],
                 ["unknown segmenter 'nosuch'", "planted"], None, id="segmenter-unknown"),
    pytest.param(["dissect", "--generator", "faults-tuple", "--segmenter", "planted", "--layers", "pair", "--out",
                  "{new}", "--quiet"], ["layer 'pair' outputs a tuple", "not a tensor", "feature map", "body"], None,
                 id="layer-outputs-a-tuple"),
    pytest.param(["dissect", "--generator", "faults-tuple", "--segmenter", "planted", "--layers", "head", "--out",
                  "{new}", "--quiet"], ["layer 'head' outputs a tensor of shape (1, 8)", "(N,C,h,w)"], None,
                 id="layer-outputs-a-flat-tensor"),
    # checkpoints
    pytest.param(["layers", "--checkpoint", "{root}/trunc.pt"],
                 ["cannot read checkpoint", "trunc.pt", "not a PyTorch checkpoint (or truncated"], None,
                 id="checkpoint-truncated"),
    pytest.param(["layers", "--checkpoint", "{root}/empty.pt"], ["empty.pt", "the file is empty"], None,
                 id="checkpoint-empty"),
    pytest.param(["layers", "--checkpoint", "{root}/rand.pt"], ["rand.pt", "not a PyTorch checkpoint"], None,
                 id="checkpoint-random-bytes"),
    pytest.param(["layers", "--checkpoint", "{root}/missing.pt"], ["--checkpoint", "missing.pt does not exist"], None,
                 id="checkpoint-missing"),
    pytest.param(["layers", "--checkpoint", "{root}/objects.pt"], ["holds Python objects", "reads weights only"],
                 None, id="checkpoint-objects-weights-only-loader"),
    pytest.param(["layers", "--generator", "stylegan2", "--checkpoint", "{root}/objects.pt"],
                 ["holds Python objects", "--trust-pickle", "trust_pickle=True"], None,
                 id="checkpoint-objects-needs-trust"),
    pytest.param(["layers", "--generator", "stylegan2", "--checkpoint", "{root}/network.pkl"],
                 ["network.pkl is a pickle", "--trust-pickle", "know where the file comes from"], None,
                 id="stylegan2-pkl-without-trust"),
    pytest.param(["layers", "--generator", "planted", "--checkpoint", "{root}/good.pt"],
                 ["--checkpoint", "'planted' loads no checkpoint"], None, id="checkpoint-for-a-family-without"),
    pytest.param([*DIS, "--out", "{out}", "--trust-pickle"], ["--trust-pickle", "nothing to trust"], None,
                 id="trust-pickle-nothing-to-trust"),
    # damaged results
    pytest.param([*DIS, "--out", "{out}"], [".cache", "dissect.json", "delete"],
                 lambda ctx, mp: setup_cached_result(ctx, mp, "edit"), id="cached-result-tampered"),
    pytest.param([*DIS, "--out", "{out}"], [".cache", "dissect.json", "JSON", "delete"],
                 lambda ctx, mp: setup_cached_result(ctx, mp, "truncate"), id="cached-result-truncated"),
    pytest.param([*CAUSAL("ace"), "--concept", "red", "--out", "{out}"], ["broken", "dissect.json", "valid JSON"],
                 lambda ctx, mp: setattr(ctx, "earlier", ctx.world.broken), id="dissection-json-truncated"),
    pytest.param(["report", "{root}/broken", "--no-pictures", "--out", "{new}"], ["dissect.json", "valid JSON"],
                 None, id="report-json-truncated"),
    # causal commands
    pytest.param([*CAUSAL("ace"), "--concept", "red", "--units", "0", "--top", "2", "--out", "{out}"],
                 ["--units and --top", "pick one"], None, id="ace-units-and-top"),
    pytest.param([*CAUSAL("ace"), "--concept", "purple", "--out", "{out}"], ["unknown concept 'purple'", "red"], None,
                 id="ace-concept-unknown"),
    pytest.param([*CAUSAL("ace"), "--concept", "red", "--units", "99", "--out", "{out}"],
                 ["--units 99", "out of range", "0 to 15"], None, id="ace-unit-out-of-range"),
    pytest.param([*CAUSAL("ace"), "--concept", "red", "--ks", "1", "100", "--out", "{out}"],
                 ["--ks 100", "between 1 and 16"], None, id="ace-ks-too-large"),
    pytest.param([*CAUSAL("ace", layer="layer2"), "--concept", "red", "--out", "{out}"],
                 ["has no layer 'layer2'", "layer1"], None, id="ace-dissection-lacks-layer"),
    pytest.param([*CAUSAL("ace")[:-1], "{new}", "--concept", "red", "--out", "{out}"],
                 ["--dissection", "does not exist"], None, id="ace-dissection-missing"),
    pytest.param([*CAUSAL("context"), "--concept", "red", "--patch", "99", "--out", "{out}"],
                 ["--patch 99", "10x10", "1 to 10"], None, id="context-patch-too-large"),
    pytest.param([*CAUSAL("context"), "--concept", "red", "--strength", "nan", "--out", "{out}"],
                 ["--strength", "finite number"], None, id="context-strength-nan"),
    pytest.param([*CAUSAL("optimize"), "--concept", "red", "--lr", "0", "--out", "{out}"], ["--lr", "> 0"], None,
                 id="optimize-lr-zero"),
    pytest.param([*CAUSAL("optimize"), "--concept", "red", "--l2=-inf", "--out", "{out}"], ["--l2", "-inf"], None,
                 id="optimize-l2-infinite"),
    pytest.param([*CAUSAL("artifacts"), "--reference", "{root}/nothing", "--out", "{out}"],
                 ["--reference", "does not exist"], None, id="artifacts-reference-missing"),
    pytest.param([*CAUSAL("artifacts"), "--reference", "{root}/ref_trunc.pt", "--out", "{out}"],
                 ["cannot read reference tensor", "ref_trunc.pt"], None, id="artifacts-reference-truncated"),
    pytest.param([*CAUSAL("artifacts"), "--out", "{out}"], ["give --reference"], None, id="artifacts-no-reference"),
    pytest.param(["artifacts", "--generator", "faults-tiny", "--segmenter", "faults-seg", "--layer", "layer2",
                  "--device", "cpu", "--reference", "{root}/ref.pt", "--out", "{new}", "--quiet"],
                 ["artifacts measures Fréchet distances", "'faults-seg' has neither features() nor probabilities()"],
                 None, id="artifacts-segmenter-without-features"),
    pytest.param([*CAUSAL("artifacts"), "--samples", "10", "--top-samples", "50", "--reference", "{root}/ref.pt",
                  "--out", "{out}"], ["--top-samples must be an integer between 2 and 10"], None,
                 id="artifacts-top-samples-above-samples"),
    # report
    pytest.param(["report", "{new}"], ["no dissect.json", "does not exist", "gandissect dissect"], None,
                 id="report-dir-missing"),
    pytest.param(["report", "{out}", "--out", "{root}", "--no-pictures"], ["is a folder", "report.html"], None,
                 id="report-out-is-a-folder"),
    # failures while running
    pytest.param([*DIS, "--out", "{new}"], ["out of memory", "--batch-size"], setup_memory_error,
                 id="out-of-memory-mid-run"),
    pytest.param([*DIS, "--out", "{out}", "--cache-dir", "none"], ["No space left on device", "free some disk space"],
                 setup_disk_full,
                 id="disk-full-at-save"),
]


@pytest.mark.parametrize("argv, words, setup", CASES)
def test_fault(argv, words, setup, world, tmp_path, monkeypatch, capsys):
    ctx = SimpleNamespace(world=world, tmp=tmp_path, out=tmp_path / "out", new=tmp_path / "new",
                          earlier=world.earlier, cleanup=[])
    shutil.copytree(world.earlier, ctx.out)
    try:
        if setup is not None:
            setup(ctx, monkeypatch)
        before = snapshot(ctx.out)
        argv = [a.format(out=ctx.out, new=ctx.new, root=world.root, tmp=tmp_path, earlier=ctx.earlier)
                for a in argv]
        capsys.readouterr()
        rc = main(argv)
        captured = capsys.readouterr()
    finally:
        monkeypatch.undo()
        for fn in ctx.cleanup:
            fn()
    err = captured.err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("gandissect: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert snapshot(ctx.out) == before  # nothing partial, nothing changed
    gw.Dissection.load(ctx.out)  # the earlier result still loads
    assert not ctx.new.exists()


def test_catalogue_size():
    assert len(CASES) >= 25


# -- beyond exit status 2 ----------------------------------------------------------------------------
def test_interrupt_exits_130_in_one_line(world, tmp_path, monkeypatch, capsys):
    from gandissect_widgets.engine import dissection

    kept = []

    def dissect(*a, cache_dir=None, **k):
        if kept:  # interrupted after a checkpoint was written
            os.makedirs(os.path.join(cache_dir, "dissect-0", "work"))
            open(os.path.join(cache_dir, "dissect-0", "work", "checkpoint.pt"), "wb").close()
        raise KeyboardInterrupt
    monkeypatch.setattr(dissection, "dissect", dissect)
    rc = main([*DIS, "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and err.startswith("gandissect: interrupted")
    assert "resumes" not in err and not (tmp_path / "new").exists()  # nothing kept: no word of resuming
    kept.append(True)
    rc = main([*DIS, "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "the work so far is kept in" in err and "resumes" in err


def test_a_bug_prints_its_traceback_and_says_so(tmp_path, monkeypatch, capsys):
    from gandissect_widgets.engine import dissection

    def dissect(*a, **k):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
    monkeypatch.setattr(dissection, "dissect", dissect)
    rc = main([*DIS, "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("Traceback") and "TypeError" in err
    assert "bug" in err.splitlines()[-1] and "report it" in err.splitlines()[-1]


def test_messages_are_one_line_even_when_the_error_is_not(tmp_path, monkeypatch, capsys):
    from gandissect_widgets.engine import dissection

    def dissect(*a, **k):
        raise ValueError("first line\n\tsecond line\n\x1b[1mbold\x1b[0m")
    monkeypatch.setattr(dissection, "dissect", dissect)
    assert main([*DIS, "--out", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err == "gandissect: error: first line second line bold\n"


def test_no_traceback_from_a_subprocess(world, tmp_path):
    """The installed entry point path: a truncated checkpoint, a --samples count that cannot fit."""
    ace = [a.format(earlier=world.earlier) for a in CAUSAL("ace")]
    for argv, word in [(["layers", "--checkpoint", str(world.root / "trunc.pt")], "not a PyTorch checkpoint"),
                       ([*DIS, "--out", str(tmp_path / "o"), "--samples", "1000000000000"], "too many"),
                       ([*ace, "--concept", "red", "--units", "0", "--top", "2", "--out", str(tmp_path / "o")],
                        "--units and --top")]:  # a UserError of causal_cli: the same class under python -m
        p = subprocess.run([sys.executable, "-m", "gandissect_widgets.cli", *argv], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("gandissect: error:") and word in p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "o").exists()


def test_help_exits_0(capsys):
    assert main(["dissect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--trust-pickle" in out and "--nonfinite {error,skip}" in out and "--lock-wait SECONDS" in out
    assert "arrays-<hash>.npz" in out and "arrays.npz" not in out
    assert main(["--help"]) == 0
    assert "exit status: 0 done; 2 an expected failure" in " ".join(capsys.readouterr().out.split())


def test_trust_pickle_reaches_the_loader(tmp_path, monkeypatch, capsys):
    """--trust-pickle is passed to a family that takes trust_pickle (a stand-in NVIDIA pickle)."""
    write_nvidia_standin(tmp_path, "faultnet")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("dnnlib", "torch_utils", "torch_utils.faultnet"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    from torch_utils.faultnet import G
    pkl = tmp_path / "net.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"G_ema": G()}, f)
    assert main(["layers", "--generator", "stylegan2", "--checkpoint", str(pkl), "--device", "cpu"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["layers", "--generator", "stylegan2", "--checkpoint", str(pkl), "--device", "cpu",
                 "--trust-pickle"]) == 0
    assert "synthesis" in capsys.readouterr().out
    (tmp_path / "cut.pkl").write_bytes(pkl.read_bytes()[:40])
    assert main(["layers", "--generator", "stylegan2", "--checkpoint", str(tmp_path / "cut.pkl"),
                 "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read NVIDIA pickle" in err and "truncated" in err


def test_torch_load_messages(world):
    """The API says the same as the command line: the file, what is wrong, and how to trust it."""
    from gandissect_widgets.checkpoint import CheckpointError, UntrustedPickleError, torch_load
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as e:
        torch_load(world.root / "trunc.pt")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UntrustedPickleError, match="trust_pickle=True") as e:
        torch_load(world.root / "objects.pt")
    assert isinstance(e.value, PermissionError) and "weights_only=False" not in str(e.value)
    assert torch_load(world.root / "objects.pt", trust=True)["args"].size == 64


# -- the dissection options of the Python API, from the command line -------------------------------------
def test_nonfinite_skip_leaves_the_samples_out(tmp_path, capsys):
    """--nonfinite skip: the NaN samples are left out of the counts, recorded, and said."""
    n = 40
    bad = int((NaNImages().sample_z(n, 1)[:, 0] > 1.0).sum())
    assert 0 < bad < n
    out = tmp_path / "skip"
    assert main(["dissect", "--generator", "faults-nan", "--segmenter", "faults-seg", "--layers", "layer2",
                 "--samples", str(n), "--out", str(out), "--quiet", "--nonfinite", "skip"]) == 0
    printed = capsys.readouterr().out
    assert f'left out as not finite (--nonfinite skip): {{"images": {bad}' in printed
    d = gw.Dissection.load(out)
    assert d.settings["nonfinite"] == "skip" and d.settings["nonfinite_skipped"]["images"] == bad
    assert int(d.array("layer2", "n_pixels")) == (n - bad) * 16 * 16


def test_lock_wait_gives_up_on_a_busy_cache(tmp_path, capsys):
    """--lock-wait 0 while another holder has the work directory's lock: one line, status 2; free: it runs."""
    argv = [*DIS, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "dissect.json").unlink()  # as if the other process had not finished it yet
    for f in entry.iterdir():
        f.unlink()
    (entry / "work").mkdir()
    capsys.readouterr()
    fd = os.open(entry / "work" / "lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"4242")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock: a second open file conflicts even in one process
        before = snapshot(tmp_path / "o")
        assert main([*argv, "--lock-wait", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gandissect: error: another process (pid 4242) is working")
        assert "leave --lock-wait out" in err and snapshot(tmp_path / "o") == before
    finally:
        os.close(fd)
    assert main([*argv, "--lock-wait", "0"]) == 0


def test_dissect_says_the_files_it_wrote(tmp_path, capsys):
    out = tmp_path / "o"
    assert main([*DIS, "--out", str(out), "--cache-dir", "none"]) == 0
    said = capsys.readouterr()
    last = said.out.splitlines()[-1]
    # the planted world's background covers most of each image: at the top 1% no unit can reach
    # the cut-off with it, and the command says so on stderr, naming it with its ceiling
    d = json.loads((out / "dissect.json").read_text())
    warning = [line for line in said.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "cannot reach the interpretability cut-off IoU 0.04" in warning[0]
    assert "background" in warning[0] and d["warnings"] and "background" in " ".join(d["warnings"])
    arrays = json.loads((out / "dissect.json").read_text())["arrays"]["file"]
    assert arrays.startswith("arrays-") and (out / arrays).is_file()
    assert last == f"wrote {out / 'dissect.json'} and {out / arrays}"


# -- trust, in every loader that reads pickles ----------------------------------------------------------
def _trusting_planted(checkpoint=None, device="cpu", trust_pickle=False):
    """The planted generator, from a file that holds a Python object beside its settings (needs trust)."""
    from gandissect_widgets.checkpoint import torch_load
    from gandissect_widgets.models.planted import load_planted_generator
    doc = torch_load(checkpoint, trust=trust_pickle)
    return load_planted_generator(seed=doc["seed"], device=device)


def test_report_takes_trust_pickle(tmp_path, capsys):
    """The report reloads the recorded model and checkpoint; a file that needs trust is said, not a dead end."""
    GENERATORS.register("faults-trusting", _trusting_planted, "test", overwrite=True)
    try:
        torch.save({"seed": 0, "meta": SimpleNamespace(note="an object")}, tmp_path / "g.pt")
        res = tmp_path / "res"
        assert main(["dissect", "--generator", "faults-trusting", "--checkpoint", str(tmp_path / "g.pt"),
                     "--trust-pickle", "--segmenter", "planted", "--layers", "layer1", "--samples", "20",
                     "--out", str(res), "--quiet", "--device", "cpu", "--cache-dir", "none"]) == 0
        rec = json.loads((res / "dissect.json").read_text())["settings"]["models"]["generator"]
        assert rec["name"] == "faults-trusting" and rec["checkpoint"] == str(tmp_path / "g.pt")
        assert rec["trust_pickle"] is True  # recorded, never applied without the flag
        capsys.readouterr()
        assert main(["report", str(res), "--quiet", "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert "No pictures" in err and "--trust-pickle" in err and "g.pt" in err
        assert "id='no-pictures'" in (res / "report.html").read_text()
        assert main(["report", str(res), "--quiet", "--device", "cpu", "--trust-pickle"]) == 0
        out = capsys.readouterr().out
        assert "pictures of 16 of 16 units" in out
        assert "id='no-pictures'" not in (res / "report.html").read_text()
    finally:
        GENERATORS.unregister("faults-trusting")


def test_upernet_folder_takes_trust_pickle(tmp_path):
    """A local UPerNet folder whose encoder file holds an object beside its weights: refused, then trusted."""
    from gandissect_widgets.checkpoint import UntrustedPickleError
    from tiny_real import save_upp, tiny_upp_parts
    enc, dec = tiny_upp_parts()
    folder = save_upp(str(tmp_path / "upp"), enc, dec)
    torch.save({"state_dict": enc.state_dict(), "args": SimpleNamespace(arch="resnet50")},
               os.path.join(folder, "encoder_epoch_40.pth"))
    with pytest.raises(UntrustedPickleError, match="encoder_epoch_40.pth.*trust_pickle=True"):
        gw.load_segmenter("upernet", checkpoint=folder, segsizes=None)
    S = gw.load_segmenter("upernet", checkpoint=folder, segsizes=None, trust_pickle=True)
    assert torch.equal(S.encoder.conv1.weight, enc.conv1.weight)
    from gandissect_widgets.registry import takes_option
    assert takes_option("segmenter", "upernet", "trust_pickle")  # so --trust-pickle reaches it
