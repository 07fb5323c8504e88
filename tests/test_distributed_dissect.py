"""dissect across the ranks of real torchrun jobs (gloo, CPU): the same result as one process.

Counts, thresholds, IoUs, top-k and concept positions bit for bit; moments to the last bits; a
rank killed half-way stops the job with one line and no result, and the same command resumes it."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# every layer, main pass batches the pilot does not hold (so ranks run the generator in it too)
DISSECT = ["dissect", "--layers", "layer4", "layer6", "--samples", "96", "--pilot-samples", "32",
           "--batch-size", "16", "--lanes", "1"]
FLOAT_ONLY_TO_LAST_BITS = ("mean", "std")  # float64 running moments, added in another order


def env(**extra):
    path = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def cli(args, **extra):
    return subprocess.run([sys.executable, "-m", "gandissect_widgets.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env(**extra))


def torchrun(nproc, args, module=True, timeout=300, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "--monitor-interval=0.5"]
    cmd += ["-m", "gandissect_widgets.cli", *args] if module else list(args)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**extra))
    return p, time.monotonic() - t0


def result(out):
    with open(os.path.join(out, "dissect.json")) as f:
        doc = json.load(f)
    with np.load(os.path.join(out, doc["arrays"]["file"])) as z:
        return doc, {k: z[k] for k in z.files}


def assert_same_result(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        if k.rsplit("/", 1)[-1] in FLOAT_ONLY_TO_LAST_BITS:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)
        else:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k], equal_nan=True), k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    p = cli(DISSECT + ["--out", str(out), "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    return p, result(out)


@pytest.mark.parametrize("size", [2, 3])
def test_cli_job_writes_what_one_process_writes(tmp_path, one_process, size):
    single, (want_doc, want) = one_process
    out = tmp_path / "out"
    p, _ = torchrun(size, DISSECT + ["--out", str(out), "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    doc, got = result(out)
    assert_same_result(got, want)
    settings = dict(doc["settings"])
    assert settings.pop("ranks") == size  # the settings record the job; the cache key does not depend on it
    assert settings == want_doc["settings"]
    assert doc["labels"] == want_doc["labels"]
    # one rank wrote and told: the same lines as one process, once
    assert p.stdout.count("interpretable units") == 2 and p.stdout.splitlines()[:2] == single.stdout.splitlines()[:2]
    assert set(os.listdir(out)) == {".cache", "dissect.json", doc["arrays"]["file"]}
    # the result is cached under the same key as one process's: a second job loads it
    cached = os.listdir(out / ".cache")
    assert cached == [f"dissect-{want_doc['settings']['cache_key']}"]
    assert not os.path.exists(out / ".cache" / cached[0] / "work")  # every rank's work is gone


def test_python_api_in_a_job_every_rank_gets_the_result(tmp_path):
    """dissect() inside distributed.job(), the IQR rule (its threshold set shared across ranks too)."""
    sys.path.insert(0, HERE)
    try:
        import dist_dissect_worker as w
    finally:
        sys.path.remove(HERE)
    from gandissect_widgets.engine.dissection import dissect
    from gandissect_widgets.engine.tuning import Tuning
    from gandissect_widgets.registry import load_generator, load_segmenter
    p, _ = torchrun(3, [os.path.join(HERE, "dist_dissect_worker.py"), str(tmp_path)], module=False)
    assert p.returncode == 0, p.stderr[-3000:]
    want = w.arrays(dissect(load_generator("sceneworld"), load_segmenter("sceneworld"),
                            tuning=Tuning(threshold_samples=40), **w.ARGS))
    assert "layer4/iqr" in want
    for r in range(3):
        with np.load(tmp_path / f"rank-{r}.npz") as z:
            assert_same_result({k: z[k] for k in z.files}, want)
        assert json.load(open(tmp_path / f"rank-{r}.json"))["ranks"] == 3


def test_killed_rank_stops_the_job_and_the_same_command_resumes(tmp_path, one_process):
    _, (want_doc, want) = one_process
    out, marker = tmp_path / "out", tmp_path / "died"
    args = DISSECT + ["--out", str(out), "--generator", "dist_models:dying_sceneworld", "--checkpoint-every", "0",
                      "--rank-timeout", "30"]
    # rank 1: probe, pilot batch 1, main batches 1 (the pilot's), 3: it dies at the forward pass of batch 5
    p, took = torchrun(2, args, GD_DIE_AT="4", GD_DIE_MARKER=str(marker), GD_DIE_RANK="1")
    assert marker.exists(), p.stderr[-3000:]
    assert p.returncode != 0
    assert not (out / "dissect.json").exists()  # no result, not even a partial one
    assert took < 120
    # rank 0 stopped with one line: the job's failure, or torchrun stopping it (its work kept)
    lines = [l for l in p.stderr.splitlines() if l.startswith("gandissect: ")]
    assert lines and all("another rank of the job stopped" in l or "stopped by its launcher" in l for l in lines), p.stderr[-3000:]
    work = out / ".cache" / f"dissect-{want_doc['settings']['cache_key']}" / "work"
    assert sorted(os.listdir(work)) == ["rank-0-of-2", "rank-1-of-2"]
    assert all((work / r / "checkpoint.pt").exists() for r in os.listdir(work))
    stale = work / "rank-0-of-3"  # what a job of another size left: removed with the rest on success
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"stale")
    # the same command resumes from every rank's checkpoint and ends where one process does
    p, _ = torchrun(2, args, GD_DIE_AT="4", GD_DIE_MARKER=str(marker), GD_DIE_RANK="1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from the checkpoint" in p.stderr
    doc, got = result(out)
    assert_same_result(got, want)
    assert not work.exists()
