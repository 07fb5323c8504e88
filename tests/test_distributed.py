"""engine.distributed under real torchrun jobs (gloo, CPU): blocks, collectives, failures."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gandissect_widgets.engine.distributed import Ranks, agree, all_sum, broadcast, gather, join

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def torchrun(nproc, out, mode, timeout=120, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "--monitor-interval=0.5", WORKER, str(out), mode]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, installed or not
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
             **env)
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    return p, time.monotonic() - t0


def reports(out):
    return {int(f[5:-5]): json.load(open(out / f)) for f in os.listdir(out) if f.startswith("rank-")}


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_equal_one_process(tmp_path, size):
    p, _ = torchrun(size, tmp_path, "collectives")
    assert p.returncode == 0, p.stderr[-3000:]
    got = reports(tmp_path)
    assert sorted(got) == list(range(size))
    blocks = [got[r]["block"] for r in range(size)]
    # the blocks tile the samples in order, each a run of whole batches of 8
    assert blocks[0][0] == 0 and blocks[-1][1] == 103
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(b[0] % 8 == 0 for b in blocks)
    every = torch.arange(103)
    for r, rep in got.items():
        assert rep["backend"] == "gloo" and rep["size"] == size
        assert rep["sum"] == int(every.sum()) and rep["count"] == 103 and rep["min"] == 0 and rep["max"] == 103
        assert rep["gathered"] == (every.reshape(-1, 1).expand(-1, 2) * 1.5).tolist()  # sample order
        assert rep["broadcast"] == {"from": 0}


def test_rank_that_dies_stops_the_others_with_one_line(tmp_path):
    p, took = torchrun(2, tmp_path, "die", GD_TEST_TIMEOUT="20")
    assert p.returncode != 0
    got = reports(tmp_path)
    assert 1 not in got  # the dead rank wrote nothing
    # the surviving rank stopped (within the timeout) with a sentence, not a hang
    if 0 in got:
        assert "RankFailed" in got[0]["error"] and "rank 0 of 2" in got[0]["error"]
    assert took < 100


def test_ranks_started_with_different_settings_refuse(tmp_path):
    p, _ = torchrun(2, tmp_path, "disagree")
    assert p.returncode != 0
    got = reports(tmp_path)
    assert any("ranks disagree on the settings" in r.get("error", "") and "rank 1 has {'n': 101}" in r["error"]
               for r in got.values())


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = join()
    assert ranks == Ranks() and ranks.writer and not ranks.distributed
    t = torch.arange(5)
    assert all_sum(t, ranks) is t and gather(t, ranks) is t and broadcast(3, ranks) == 3 and agree(1, ranks, "x") == 1
    assert ranks.block(10, 4) == (0, 10)


@pytest.mark.parametrize("n,bs,size", [(103, 8, 2), (103, 8, 3), (5, 8, 3), (64, 16, 4), (1, 1, 1), (17, 4, 5)])
def test_blocks_tile_whole_batches(n, bs, size):
    blocks = [Ranks(r, size).block(n, bs) for r in range(size)]
    covered = [i for a, b in blocks for i in range(a, b)]
    assert covered == list(range(n))
    assert all(a % bs == 0 for a, b in blocks if b > a)
    sizes = [-(-(b - a) // bs) for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1  # batches spread evenly


@pytest.mark.parametrize("n,size", [(10, 3), (2, 5), (7, 1)])
def test_shares_tile_the_items_round_robin(n, size):
    shares = [Ranks(r, size).share(range(n)) for r in range(size)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert all(Ranks(0, size).owner(i) == r for r, s in enumerate(shares) for i in s)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_cuda_means_this_ranks_gpu():
    assert Ranks(1, 2, local_rank=1).device("cuda") == torch.device("cuda", 1)
    assert Ranks(1, 2, local_rank=1).device("cuda:0") == torch.device("cuda", 0)
    assert Ranks().device("cuda") == torch.device("cuda")
    assert Ranks(0, 2).device("cpu") == torch.device("cpu")


def test_bad_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        join()


def test_more_local_ranks_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 on its host, which has 1 CUDA device\(s\): start at most 1"):
        join("cuda")
