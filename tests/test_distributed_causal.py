"""The causal tools and commands across torchrun ranks (gloo, CPU): every rank gets one process's
result, one rank writes, and a rank that dies stops the job with nothing written."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "dist_causal_worker.py")


def _env(**extra):
    path = os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the one-process runs are plain processes
    return env


def _torchrun(nproc, *cmd):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.5", *cmd]


def _run(cmd, timeout=120, **extra):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(**extra))


def _gandissect():
    """The installed console script, as a user starts it (else the module)."""
    exe = shutil.which("gandissect")
    return [exe] if exe else [sys.executable, "-m", "gandissect_widgets.cli"]


def _reports(out):
    return {int(f[5:-5]): json.load(open(out / f)) for f in os.listdir(out) if f.startswith("rank-")}


# -- the Python API --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tools' results in one plain process (no torchrun: engine.distributed's identity path)."""
    out = tmp_path_factory.mktemp("one")
    p = _run([sys.executable, WORKER, str(out), "tools"])
    assert p.returncode == 0, p.stderr[-3000:]
    got = _reports(out)
    assert list(got) == [0] and got[0]["size"] == 1
    return got[0]["result"]


def test_one_process_results_say_something(one_process):
    r = one_process
    assert len(r["ace"]["original"]) == 21 and r["ace"]["ace"] != 0
    assert sum(abs(x) > 0 for x in r["unit_ace"]) >= 3  # single-unit effects, not all zero
    assert r["removal"]["curves"]["mine"] != [0.0, 0.0, 0.0] and len(r["removal"]["random_draws"]) == 3
    assert sum(r["context"]["count"]) == 11 * 5 and any(r["context"]["added_mean"])
    assert len(r["artifacts"]["ranking"]) == 5 and len(r["artifacts"]["removal"]["fd_random_draws"][0]) == 2


@pytest.mark.parametrize("size", [2, 3])
def test_tools_on_every_rank_equal_one_process(tmp_path, one_process, size):
    p = _run(_torchrun(size, WORKER, str(tmp_path), "tools"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = _reports(tmp_path)
    assert sorted(got) == list(range(size))
    want = json.dumps(one_process)  # the JSON text: every float to its last bit, NaN as NaN
    for rank, rep in got.items():
        assert rep["size"] == size
        for tool in one_process:
            assert json.dumps(rep["result"][tool]) == json.dumps(one_process[tool]), (rank, tool)
        assert json.dumps(rep["result"]) == want


def test_rank_that_dies_stops_every_rank_without_a_result(tmp_path):
    p = _run(_torchrun(2, WORKER, str(tmp_path), "die"), GD_TEST_TIMEOUT="20", GD_DIE_AFTER="3")
    assert p.returncode != 0
    got = _reports(tmp_path)
    assert sorted(got) == [0]  # the dead rank wrote nothing; the survivor, at the gather, before the launcher stops it
    assert "result" not in got[0]
    assert got[0]["error"].startswith("RankFailed: rank 0 of 2: ") and "\n" not in got[0]["error"]


# -- the command line ------------------------------------------------------------------------------
ACE = ["ace", "--generator", "planted", "--layer", "layer1", "--concept", "green", "--top", "3",
       "--samples", "22", "--unit-samples", "10", "--ks", "1", "2", "4", "--random-draws", "3", "--batch-size", "4",
       "--device", "cpu"]


@pytest.fixture(scope="module")
def dissection(tmp_path_factory):
    d = tmp_path_factory.mktemp("dissection") / "d"
    p = _run([*_gandissect(), "dissect", "--generator", "planted", "--segmenter", "planted", "--layers", "layer1",
              "--samples", "48", "--out", str(d), "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    return str(d)


@pytest.fixture(scope="module")
def ace_one(tmp_path_factory, dissection):
    out = tmp_path_factory.mktemp("ace-one") / "out"
    p = _run([*_gandissect(), *ACE, "--segmenter", "planted", "--dissection", dissection, "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _outputs(out):
    return sorted(os.listdir(out))


@pytest.mark.parametrize("size", [2, 3])
def test_cli_ace_under_torchrun_writes_one_process_result(tmp_path, ace_one, dissection, size):
    out = tmp_path / "out"
    p = _run(_torchrun(size, "--no-python", *_gandissect(), *ACE, "--segmenter", "planted",
                       "--dissection", dissection, "--out", str(out)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _outputs(out) == _outputs(ace_one) == ["ace.json", "ace_ranking.png", "removal_curve.png"]
    assert (out / "ace.json").read_bytes() == (ace_one / "ace.json").read_bytes()
    doc = json.loads((out / "ace.json").read_text())
    assert len(doc["unit_ace"]) == 16 and doc["removal_curve"]["ks"] == [1, 2, 4]
    # one rank tells: one 'wrote' line, one result line, one plan, one bar per stage
    assert len(re.findall(r"^wrote ", p.stdout, re.M)) == 1 and len(re.findall(r"^ACE of 3 units", p.stdout, re.M)) == 1
    assert p.stderr.count("gandissect ace: planned") == 1
    assert len(re.findall(r"unit ACE layer1: +0%", p.stderr)) == 1


def test_cli_rank_killed_half_way_writes_nothing(tmp_path, dissection):
    out = tmp_path / "out"
    p = _run(_torchrun(2, "--no-python", *_gandissect(), *ACE, "--segmenter", "dist_causal_worker:dying_segmenter",
                       "--dissection", dissection, "--out", str(out)), GD_DIE_AFTER="12")
    assert p.returncode != 0
    assert not out.exists()  # no result, not even the folder
    # the launcher names the rank that died; a survivor says, in one line, that it stopped because of it
    assert re.search(r"Root Cause.*?rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 3", p.stderr, re.S), p.stderr[-3000:]
    errors = re.findall(r"^gandissect: .*$", p.stderr, re.M)
    assert all(re.match(r"gandissect: error: rank 0 of 2: .* failed: another rank of the job stopped", e)
               for e in errors), errors
    assert "internal error" not in p.stderr


def test_cli_ranks_with_different_arguments_refuse(tmp_path, dissection):
    out = tmp_path / "out"
    line = " ".join([*_gandissect(), *ACE, "--segmenter", "planted", "--dissection", dissection, "--out", str(out)])
    p = _run(_torchrun(2, "--no-python", "bash", "-c", line + " --random-draws $((3 + RANK))"))
    assert p.returncode != 0
    assert not out.exists()
    assert re.search(r"^gandissect: error: ranks disagree on the arguments of `gandissect ace`: rank 0 has .*"
                     r"rank 1 has .*; start every rank with the same command$", p.stderr, re.M), p.stderr[-3000:]
