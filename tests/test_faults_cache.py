"""Faults of the dissection's work directory: a full disk, two processes on one cache key,
Ctrl-C anywhere, and NaN or infinite values in (or a sample_z that is not reproducible)."""
import errno
import fcntl
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gandissect_widgets as gw
from gandissect_widgets.engine import dissection as D
from gandissect_widgets.engine.protocols import NonFiniteError, ProtocolError
from gandissect_widgets.engine.upsample import upsample
from tiny import TinyGenerator, TinySegmenter, files_under, run_dissect as run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entries_under(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, ds, fs in os.walk(d) for f in ds + fs)


def assert_identical(d1, d2, skip=()):
    assert d1.layers == d2.layers
    for layer in d1.layers:
        for k in ("iou", "intersection", "mask_pixels", "concept_pixels", "n_pixels", "thresholds", "fraction_above",
                  "topk_indices", "topk_values", "mean", "std", "min", "max", "shape"):
            if k in skip:
                continue
            a, b = d1.array(layer, k), d2.array(layer, k)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f"{layer}/{k} differs"


def checkpoint_of(cache):
    found = [os.path.join(cache, p) for p in files_under(cache) if p.endswith("checkpoint.pt")]
    assert len(found) <= 1, found
    return torch.load(found[0], weights_only=True) if found else None


def cli(*args):
    return [sys.executable, "-m", "gandissect_widgets.cli", "dissect", "--generator", "planted",
            "--segmenter", "planted", "--device", "cpu", *map(str, args)]


# -- 1. a full disk ---------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    mounted = []

    def make(size):
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size)}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def planted():
    return gw.load_generator("planted"), gw.load_segmenter("planted")


def test_fallocate_enospc_is_a_clean_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    cache = tmp_path / "cache"
    with pytest.raises(D.CacheSpaceError) as e:
        run(n_samples=100, cache_dir=cache)
    err = e.value
    assert isinstance(err, OSError) and isinstance(err, ValueError) and err.errno == errno.ENOSPC
    msg = str(err)
    assert "\n" not in msg and str(cache) in msg and "segmentation cache" in msg
    # 100 samples x 16 x 16 uint8 labels + the .npy header
    assert "25.1 KiB" in msg or "25.2 KiB" in msg, msg
    assert entries_under(cache) == []


def test_disk_too_small_for_the_segmentation_cache(small_fs):
    fs = small_fs(512 << 10)
    G, S = planted()
    with pytest.raises(D.CacheSpaceError) as e:  # 1000 x 40 x 40 labels = 1.5 MiB, on 512 KiB (no SIGBUS)
        gw.dissect(G, S, ["layer1"], n_samples=1000, batch_size=50, cache_dir=fs, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(fs) in msg and "1.5 MiB" in msg and "free" in msg, msg
    assert os.listdir(fs) == []
    # the command line: one line, status 2, no SIGBUS (135), nothing left
    r = subprocess.run(cli("--layers", "layer1", "--samples", 1000, "--batch-size", 50, "--quiet",
                           "--out", fs.parent / "out", "--cache-dir", fs), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "error" in lines[0] and ("disk" in lines[0] or "space" in lines[0]), r.stderr
    assert os.listdir(fs) == []


def test_disk_too_small_for_the_checkpoint(small_fs):
    G, S = planted()
    seg_bytes = 200 * 40 * 40 + 128
    fs = small_fs(seg_bytes + (48 << 10))  # the segmentations fit, a checkpoint (~200 KiB) does not
    with pytest.raises(D.CacheSpaceError) as e:
        gw.dissect(G, S, ["layer1", "layer2"], n_samples=200, batch_size=50, cache_dir=fs, progress=False,
                   checkpoint_every=0)
    msg = str(e.value)
    assert "\n" not in msg and str(fs) in msg and "checkpoint" in msg, msg
    assert os.listdir(fs) == []


# -- 2. two processes on one cache key --------------------------------------------------------
def test_two_processes_share_a_cache_dir(tmp_path):
    args = ("--layers", "layer1", "layer2", "--samples", 1500, "--seed", 3, "--batch-size", 50)
    single = subprocess.run(cli(*args, "--quiet", "--out", tmp_path / "single", "--cache-dir", "none"), cwd=REPO,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    cache = tmp_path / "shared"
    procs = [subprocess.Popen(cli(*args, "--out", tmp_path / f"out{i}", "--cache-dir", cache), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    ref = gw.Dissection.load(tmp_path / "single")
    for i in range(2):
        assert_identical(ref, gw.Dissection.load(tmp_path / f"out{i}"))
    cached = [p for p in os.listdir(cache) if p.startswith("dissect-")]
    assert len(cached) == 1
    assert_identical(ref, gw.Dissection.load(cache / cached[0]))
    assert "work" not in os.listdir(cache / cached[0])  # no lock file, no work files left


def _lock_path(cache, **kw):
    key = run(**kw).settings["cache_key"]  # the key does not depend on where the cache is
    work = os.path.join(cache, f"dissect-{key}", "work")
    os.makedirs(work, exist_ok=True)
    return os.path.join(work, "lock")


def test_lock_wait_zero_fails_at_once_and_none_waits(tmp_path):
    kw = dict(n_samples=48, layers=["layer1", "layer2"])
    alone = run(**kw)
    cache = tmp_path / "c"
    fd = os.open(_lock_path(cache, **kw), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another process working on it would
    os.pwrite(fd, b"4242\n", 0)
    try:
        t = time.monotonic()
        with pytest.raises(D.CacheBusyError, match=r"another process \(pid 4242\) is working on this dissection"):
            run(cache_dir=cache, lock_wait=0, **kw)
        assert time.monotonic() - t < 2
        with pytest.raises(D.CacheBusyError):
            run(cache_dir=cache, lock_wait=0.3, **kw)
        got = {}
        waiter = threading.Thread(target=lambda: got.setdefault("d", run(cache_dir=cache, **kw)))
        waiter.start()
        time.sleep(0.8)
        assert waiter.is_alive() and "d" not in got  # waiting for the lock
    finally:
        os.close(fd)  # the other "process" ends (without a result): the waiter does the work
    waiter.join(60)
    assert_identical(alone, got["d"])
    assert_identical(alone, run(cache_dir=cache, lock_wait=0, **kw))  # a result loads without the lock


def test_a_stale_lock_file_is_no_obstacle(tmp_path):
    kw = dict(n_samples=40)
    cache = tmp_path / "c"
    with open(_lock_path(cache, **kw), "w") as f:
        f.write("99999\n")  # left by a killed process: the file, but no flock
    assert_identical(run(**kw), run(cache_dir=cache, lock_wait=0, **kw))


def test_threads_of_one_process_share_a_cache_dir(tmp_path):
    kw = dict(n_samples=64, layers=["layer1", "layer3"], cache_dir=tmp_path / "c", lanes=1)
    out, errs = [None] * 3, []
    models = [(TinyGenerator(), TinySegmenter()) for _ in range(3)]  # made here: their init seeds torch's RNG

    def work(i):
        try:
            out[i] = run(*models[i], **kw)
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errs, errs
    ref = run(**dict(kw, cache_dir=None))
    for d in out:
        assert_identical(ref, d)


# -- 3. Ctrl-C anywhere -----------------------------------------------------------------------
class CountingSegmenter(TinySegmenter):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


KW = dict(layers=["layer1", "layer2", "layer3"], n_samples=120, batch_size=8, pilot_samples=40, checkpoint_every=1e9)


def crun(S=None, **kw):
    """``run`` with a segmenter that counts its calls (a class of its own: a cache key of its own)."""
    return run(S=S or CountingSegmenter(), **kw)


def sigint_on_call(monkeypatch, owner, name, at):
    """Patch owner.name so that its ``at``-th call sends SIGINT to this process, then runs."""
    real = getattr(owner, name)
    calls = [0]

    def patched(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, patched)
    return calls


@pytest.mark.parametrize("lanes", [1, 2])
def test_sigint_inside_the_statistics_saves_that_batch(tmp_path, monkeypatch, lanes):
    clean = crun(lanes=lanes, **KW)
    # upsample_columns runs in the layers' threads inside accumulate(): the interrupt lands mid-batch
    sigint_on_call(monkeypatch, D, "upsample_columns", 20)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, lanes=lanes, **KW)
    monkeypatch.undo()
    ck = checkpoint_of(tmp_path)
    assert ck is not None and ck["edges"] is not None and ck["next_batch"] > 0
    S = CountingSegmenter()
    resumed = crun(S=S, cache_dir=tmp_path, lanes=lanes, **KW)
    assert S.calls == 15 - ck["segmented"] // 8  # only the samples not segmented yet
    assert_identical(clean, resumed)
    assert files_under(tmp_path) and not [p for p in files_under(tmp_path) if "work" in p]


def test_sigint_in_the_pilot_keeps_its_segmentations(tmp_path, monkeypatch):
    clean = crun(**KW)
    sigint_on_call(monkeypatch, D, "upsample_pixels", 7)  # the 3rd pilot batch (3 layers a batch)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, **KW)
    monkeypatch.undo()
    ck = checkpoint_of(tmp_path)
    assert ck is not None and ck["edges"] is None and ck["segmented"] >= 16
    S = CountingSegmenter()
    resumed = crun(S=S, cache_dir=tmp_path, **KW)
    assert S.calls == 15 - ck["segmented"] // 8
    assert_identical(clean, resumed)


def test_sigint_before_the_main_pass_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The main pass counts the batches the pilot kept together: a resumed run, which does not
    hold them, computes them again and counts them in the same groups (mean and std to the bit)."""
    clean = crun(**KW)
    sigint_on_call(monkeypatch, D._Run, "main_pass", 1)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, **KW)
    monkeypatch.undo()
    ck = checkpoint_of(tmp_path)
    assert ck is not None and ck["edges"] is not None and ck["next_batch"] == 0 and ck["segmented"] == 40
    assert_identical(clean, crun(cache_dir=tmp_path, **KW))


def test_sigint_while_refining(tmp_path, monkeypatch):
    clean = crun(**KW)
    sigint_on_call(monkeypatch, D._Run, "refine", 1)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, **KW)
    monkeypatch.undo()
    ck = checkpoint_of(tmp_path)
    assert ck["next_batch"] == 15  # every batch counted: the rerun only refines and reads out
    assert_identical(clean, crun(cache_dir=tmp_path, **KW))


def test_a_checkpoint_of_another_batch_size_is_not_resumed(tmp_path, monkeypatch):
    """The batch size is not part of the key (results are the same), but a checkpoint counts
    batches: resumed with batches of another size it would count samples twice or not at all."""
    sigint_on_call(monkeypatch, D._Run, "accumulate", 4)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, **KW)
    monkeypatch.undo()
    assert checkpoint_of(tmp_path)["batch_size"] == 8
    other = dict(KW, batch_size=12)
    assert_identical(crun(**other), crun(cache_dir=tmp_path, **other))


def test_sigint_during_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    kw = dict(KW, checkpoint_every=0)
    clean = crun(**kw)
    sigint_on_call(monkeypatch, D, "atomic_write_bytes", 3)
    with pytest.raises(KeyboardInterrupt):
        crun(cache_dir=tmp_path, **kw)
    monkeypatch.undo()
    ck = checkpoint_of(tmp_path)  # whole, and loadable
    assert ck is not None and ck["next_batch"] >= 1
    assert_identical(clean, crun(cache_dir=tmp_path, **kw))


def _dissect_proc(args, cache, out):
    """A `gandissect dissect` subprocess, and a function that waits until its progress bar shows
    at least ``k`` steps done (the bar's own output on stderr)."""
    p = subprocess.Popen(cli(*args, "--out", out, "--cache-dir", cache), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    err, changed = bytearray(), threading.Condition()

    def read():
        for chunk in iter(lambda: p.stderr.read1(4096), b""):
            with changed:
                err.extend(chunk)
                changed.notify_all()
        with changed:
            changed.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def steps():
        done = re.findall(rb"dissect:.*?\| *(\d+)/(\d+)", bytes(err))
        return int(done[-1][0]) if done else -1

    def wait_for(k, timeout=300):
        end = time.monotonic() + timeout
        with changed:
            while steps() < k and p.poll() is None and time.monotonic() < end:
                changed.wait(0.05)
        return steps()

    return p, err, wait_for


@pytest.mark.parametrize("at", [2, 25, 50])
def test_ctrl_c_on_the_command_line_resumes_bit_for_bit(tmp_path, at):
    """SIGINT to a real `gandissect dissect` at several points of a run of 71 steps (11 of the
    pilot, then 60 of the main pass; 6-10 s on 2 cores), timed by its progress bar: the rerun says
    it resumes, and ends bit for bit where one uninterrupted run does."""
    args = ("--layers", "layer1", "layer2", "--samples", 3000, "--seed", 4, "--batch-size", 50)
    ref = tmp_path / "ref"
    r = subprocess.run(cli(*args, "--quiet", "--out", ref, "--cache-dir", "none"), cwd=REPO, capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cache, out = tmp_path / "cache", tmp_path / "out"
    p, err, wait_for = _dissect_proc(args, cache, out)
    seen = wait_for(at)
    assert p.poll() is None and at <= seen < 71, (seen, err.decode(errors="replace")[-2000:])
    p.send_signal(signal.SIGINT)
    p.wait(300)
    assert p.returncode != 0, err.decode(errors="replace")[-2000:]
    assert not (out / "dissect.json").exists()
    ck = checkpoint_of(cache)
    assert ck is not None and ck["segmented"] >= min(at, 11) * 50, err.decode(errors="replace")[-2000:]
    if at > 11:  # past the pilot: the main pass's counts were kept
        assert ck["edges"] is not None and ck["next_batch"] >= at - 11
    again = subprocess.run(cli(*args, "--out", out, "--cache-dir", cache), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from the checkpoint" in again.stderr
    assert_identical(gw.Dissection.load(ref), gw.Dissection.load(out))


def test_ctrl_c_while_the_lanes_start_leaves_no_thread_behind(monkeypatch):
    """An interrupt between the lane threads' warm-up tasks used to leave one waiting at a
    barrier for ever (the process then hung at exit)."""
    from gandissect_widgets.engine import sidebyside

    class Interrupted(sidebyside.ThreadPoolExecutor):
        def submit(self, fn, *a, **k):
            f = super().submit(fn, *a, **k)
            if fn.__name__ == "warm":
                raise KeyboardInterrupt
            return f

    monkeypatch.setattr(sidebyside, "ThreadPoolExecutor", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(lanes=2, n_samples=40)
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("gandissect-lane")]


# -- 4. NaN, inf and latents that are not reproducible -----------------------------------------
class Tapped(nn.Sequential):
    """TinyGenerator with a module ``tap`` after ``layer2``: layer2's output plus an extra unit
    (``extra``: a constant channel, or NaN), which ``drop`` removes again before layer3."""

    def __init__(self, extra=math.nan, after=None):
        t = TinyGenerator()
        super().__init__()
        self.add_module("layer1", t.layer1)
        self.add_module("layer2", t.layer2)
        self.add_module("tap", Extra(extra))
        self.add_module("drop", Drop())
        self.add_module("layer3", t.layer3)
        self.add_module("output", t.output)
        if after is not None:
            self.add_module("poison", after)
        self.zdim = t.zdim

    sample_z = TinyGenerator.sample_z


class Extra(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.cat([x, torch.full_like(x[:, :1], self.value)], 1)


class Drop(nn.Module):
    def forward(self, x):
        return x[:, :-1]


class PoisonWrap(nn.Module):
    """``inner``, with ``value`` written into the top-left 2x2 cells of unit 2 of its output for
    the samples whose first input activation is positive (decided per sample, whatever the batch)."""

    def __init__(self, inner, value=math.nan):
        super().__init__()
        self.inner, self.value = inner, value

    def forward(self, x):
        out = self.inner(x).clone()
        rows = torch.nonzero(x[:, 0, 0, 0] > 0).view(-1)
        out[rows, 2, 0:2, 0:2] = self.value
        return out


class Cleaned(nn.Module):
    """``inner`` on its input with NaN and inf made 0: the poison stays in the layer before."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.nan_to_num(x, 0.0, 0.0, 0.0))


def _poison_layer2(G, value=math.nan):
    G.layer2 = PoisonWrap(G.layer2, value)
    G.layer3 = Cleaned(G.layer3)
    return G


class NaNImages(TinyGenerator):
    def forward(self, z):
        x = super().forward(z)
        bad = z[:, 0] > 1.0
        return torch.where(bad[:, None, None, None], torch.full_like(x, math.nan), x)


def test_nan_images_are_an_error_by_default():
    with pytest.raises(NonFiniteError) as e:
        run(G=NaNImages())
    msg = str(e.value)
    assert "\n" not in msg and "nonfinite='skip'" in msg
    assert re.search(r"for samples \d+\.\.\d+: images: \d*768 of 6144 pixel values", msg), msg  # 8 of 3x16x16


def test_nan_images_skipped_leave_those_samples_out(recwarn):
    G = NaNImages()
    n = 200
    bad = int((G.sample_z(n, 1)[:, 0] > 1.0).sum())
    assert 0 < bad < n
    d = run(G=G, n_samples=n, nonfinite="skip", layers=["layer2", "layer3"])
    for layer in d.layers:
        assert int(d.array(layer, "n_pixels")) == (n - bad) * 16 * 16
        assert np.isfinite(d.thresholds(layer)).all() and d.iou(layer).max() > 0.05
        assert abs(d.array(layer, "fraction_above") - 0.01).max() < 2e-3
        assert not np.isin(d.array(layer, "topk_indices"), np.nonzero(G.sample_z(n, 1)[:, 0].numpy() > 1.0)[0]).any()
    assert d.settings["nonfinite_skipped"]["images"] == bad and d.settings["nonfinite"] == "skip"
    assert any("left out" in str(w.message) for w in recwarn)


def test_an_all_nan_unit_is_an_error_or_is_left_out():
    with pytest.raises(NonFiniteError) as e:
        run(G=Tapped(), layers=["tap"], n_samples=40)
    msg = str(e.value)
    assert "\n" not in msg and "layer 'tap': 512 of 3072 activation values" in msg and "nonfinite='skip'" in msg, msg
    kw = dict(n_samples=120, pilot_samples=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = run(G=Tapped(), layers=["tap", "layer3"], nonfinite="skip", **kw)
    ref = run(G=Tapped(extra=0.0), layers=["layer2", "layer3"], **kw)
    # the NaN unit counts nothing: NaN threshold, IoU 0, not interpretable; no -3.9e-31 threshold
    assert math.isnan(d.thresholds("tap")[5]) and (d.iou("tap")[5] == 0).all()
    assert not d.interpretable("tap")[5]
    assert int(d.array("tap", "nonfinite_pixels")[5]) == int(d.array("tap", "n_pixels")) == 120 * 16 * 16
    assert (d.array("tap", "nonfinite_pixels")[:5] == 0).all()
    # the other units are what they are without it, to the bit (moments: up to rounding)
    for k in ("iou", "intersection", "mask_pixels", "thresholds", "fraction_above", "topk_indices", "topk_values"):
        np.testing.assert_array_equal(d.array("tap", k)[:5], ref.array("layer2", k), err_msg=k)
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(d.array("tap", k)[:5], ref.array("layer2", k), rtol=1e-6, err_msg=k)
    for k in ("iou", "intersection", "thresholds", "fraction_above", "topk_indices", "mean", "std"):
        np.testing.assert_array_equal(d.array("layer3", k), ref.array("layer3", k), err_msg=k)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_partly_non_finite_units_count_their_finite_pixels(value):
    G = _poison_layer2(TinyGenerator(), value)
    S = TinySegmenter()
    n = 96
    with pytest.raises(NonFiniteError, match=r"layer 'layer2': \d*[048] of 2560 activation values"):
        run(G=G, S=S, n_samples=n)  # 4 cells of each poisoned sample of 8 x 5 x 8 x 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = run(G=G, S=S, n_samples=n, pilot_samples=32, nonfinite="skip")
    # brute force over the whole upsampled maps, the unit's non-finite pixels left out
    z = G.sample_z(n, 1)
    acts = {}
    h = G.layer2.register_forward_hook(lambda m, i, o: acts.setdefault("r", o))
    with torch.no_grad():
        seg = S(G(z))
    h.remove()
    up = upsample(acts["r"], (16, 16))
    t = torch.from_numpy(d.thresholds("layer2"))
    fin = torch.isfinite(up)
    skipped = (~fin).sum((0, 2, 3)).numpy()
    np.testing.assert_array_equal(d.array("layer2", "nonfinite_pixels"), skipped)
    assert skipped[2] > 0 and (np.delete(skipped, 2) == 0).all()
    mask = (up > t[None, :, None, None]) & fin
    for u in range(up.shape[1]):
        m = mask[:, u]
        assert int(m.sum()) == int(d.array("layer2", "mask_pixels")[u])
        np.testing.assert_allclose(d.array("layer2", "fraction_above")[u], float(m.sum()) / float(fin[:, u].sum()))
        for c in range(1, len(S.labels)):
            s = (seg == c) & fin[:, u]
            inter, union = int((m & s).sum()), int((m | s).sum())
            assert int(d.array("layer2", "intersection")[u, c]) == inter
            assert d.iou("layer2")[u, c] == pytest.approx(inter / union if union else 0.0, abs=1e-12)
    assert abs(d.array("layer2", "fraction_above") - 0.01).max() <= 1e-3 + 5e-4
    assert np.isfinite(d.array("layer2", "topk_values")).all() and np.isfinite(d.array("layer2", "mean")).all()


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be one of 'error', 'skip'"):
        run(nonfinite="ignore")
    with pytest.raises(ValueError, match="lock_wait must be None"):
        run(lock_wait=-1)


class GlobalRandomZ(TinyGenerator):
    def sample_z(self, n, seed=0):
        return torch.randn(n, self.zdim)


class NoPrefixZ(TinyGenerator):
    def sample_z(self, n, seed=0):
        return torch.from_numpy(np.random.RandomState(seed + n).standard_normal((n, self.zdim)).astype("float32"))


def test_sample_z_must_be_reproducible():
    with pytest.raises(ProtocolError, match=r"sample_z\(4, 1\) gave different latents on two calls"):
        run(G=GlobalRandomZ())
    with pytest.raises(ProtocolError, match=r"sample_z\(40, 1\)\[:4\] differs from sample_z\(4, 1\)"):
        run(G=NoPrefixZ())
    run(G=TinyGenerator(), n_samples=2)  # fewer samples than the check's k: fine


def test_moments_are_added_batch_by_batch_whether_kept_batches_are_grouped_or_not():
    """Samples left out whole (nonfinite='skip') inside batches the pilot keeps (counted as one
    group): the moments are the batches' own sums all the same, as a job's ranks add them."""
    from gandissect_widgets.engine.tuning import Tuning
    kw = dict(n_samples=64, batch_size=8, pilot_samples=40, nonfinite="skip", layers=["layer2", "layer3"])
    grouped = run(G=NaNImages(), **kw)
    alone = run(G=NaNImages(), tuning=Tuning(pilot_cache_bytes=0), **kw)  # nothing kept: each batch alone
    for layer in grouped.layers:
        for name in ("mean", "std", "thresholds", "topk_indices"):
            assert np.array_equal(grouped.array(layer, name), alone.array(layer, name)), (layer, name)
