"""Run by tests/test_distributed_dissect.py under torchrun: the Python API inside a job.

argv: OUT_DIR; each rank calls dissect() inside ``distributed.job()`` and writes what it got back
to OUT_DIR/rank-R.npz (every array of the result) and OUT_DIR/rank-R.json (its settings)."""
import json
import os
import sys

import numpy as np

from gandissect_widgets.engine.distributed import job
from gandissect_widgets.engine.dissection import dissect
from gandissect_widgets.registry import load_generator, load_segmenter

ARGS = dict(layers=["layer4"], n_samples=56, batch_size=8, threshold="iqr", progress=False)


def arrays(d):
    return {f"{layer}/{k}": np.asarray(v) for layer, a in d._layers.items() for k, v in a.items()}


def main(out):
    from gandissect_widgets.engine.tuning import Tuning
    with job() as ranks:
        d = dissect(load_generator("sceneworld"), load_segmenter("sceneworld"), tuning=Tuning(threshold_samples=40),
                    **ARGS)
        np.savez(os.path.join(out, f"rank-{ranks.rank}.npz"), **arrays(d))
        with open(os.path.join(out, f"rank-{ranks.rank}.json"), "w") as f:
            json.dump({k: v for k, v in d.settings.items() if isinstance(v, (int, float, str))}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
