"""Run by tests/test_distributed.py under torchrun: exercises engine.distributed on every rank.

argv: OUT_DIR MODE, MODE in {collectives, die, disagree}; each rank writes OUT_DIR/rank-R.json."""
import json
import os
import sys

import torch

from gandissect_widgets.engine.distributed import RankFailed, agree, all_max, all_min, all_sum, broadcast, gather, job


def work(ranks, mode, report):
    if mode == "die" and ranks.rank == ranks.size - 1:
        os._exit(3)  # a rank dying without a word, as a killed process does
    if mode == "disagree":
        agree({"n": 100 + (ranks.rank == 1)}, ranks, "the settings")
    i0, i1 = ranks.block(103, 8)
    report["block"] = [i0, i1]
    ids = torch.arange(i0, i1)
    report["sum"] = int(all_sum(ids.sum().reshape(1), ranks))
    report["count"] = int(all_sum(torch.tensor([i1 - i0]), ranks))
    report["min"] = int(all_min(torch.tensor([i0 if i1 > i0 else 10**9]), ranks))
    report["max"] = float(all_max(torch.tensor([float(i1)]), ranks))
    report["gathered"] = gather(ids.reshape(-1, 1).expand(-1, 2) * 1.5, ranks).tolist()
    report["broadcast"] = broadcast({"from": ranks.rank}, ranks)
    agree({"key": "same"}, ranks, "the cache key")
    report["ok"] = True


def main(out, mode):
    with job(timeout=float(os.environ.get("GD_TEST_TIMEOUT", "60"))) as ranks:
        report = {"rank": ranks.rank, "size": ranks.size, "backend": ranks.backend}
        try:
            work(ranks, mode, report)
        except (RankFailed, ValueError) as e:
            report["error"] = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank-{ranks.rank}.json"), "w") as f:
            json.dump(report, f)
    return 0 if report.get("ok") else 2


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
