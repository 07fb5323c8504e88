"""``Tuning``: every knob of a dissection that changes how it is computed, in one place.

The definitions (threshold rule, upsampling convention, samples, seed) are ``dissect``'s own
arguments; these say how the work is done.  The ones that can change the result (bins, pilot,
rank tolerance, the IQR rule's threshold set) go into the cache key; the others (lanes, chunk
sizes, checkpoint interval) cannot, and do not.

    dissect(G, S, layers, tuning=Tuning(lanes=1, threshold_samples=500))
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from gandissect_widgets.engine.stats import MAX_BINS

__all__ = ["Tuning"]


@dataclass(frozen=True)
class Tuning:
    """How a dissection is computed (``dissect(..., tuning=...)``)."""
    bins: int = 128                   # histogram edges per unit around the quantile (quantile rule)
    pilot_samples: int = 512          # samples whose random pixels place those edges
    pilot_pixels: int = 64            # pixels per pilot sample, one in each block of a grid
    rank_tolerance: float = 5e-4      # a threshold's fraction above may miss its target by this
    lanes: int = 2                    # batches through the models at once on a CPU (engine.sidebyside)
    checkpoint_every: float = 60.0    # seconds between checkpoints of a run with a cache_dir
    chunk_elements: int = 1 << 25     # upsampled values (at most) held at once per layer (tail)
    dense_chunk_elements: int = 1 << 22  # the same for the dense backend, which holds whole maps
    pilot_cache_bytes: int = 256 << 20   # raw pilot activations kept for the main pass, at most
    device_seg_bytes: int = 1 << 30   # segmentations kept on a GPU for the run, at most (else read back)
    threshold_samples: int | None = None  # IQR rule: size of the threshold set (None: n_samples)
    threshold_seed: int = 2           # IQR rule: the threshold set's seed (the ICLR code's)
    iqr_candidates: int = 100         # IQR rule: candidate levels, log-spaced top 0.1% ... 100%

    # the knobs that can change a result, by name (the cache key holds them)
    RESULT_KNOBS = ("bins", "pilot_samples", "pilot_pixels", "rank_tolerance")
    IQR_KNOBS = ("threshold_samples", "threshold_seed", "iqr_candidates", "pilot_pixels")

    def __post_init__(self):
        ints = (("bins", 16, MAX_BINS), ("pilot_samples", 1, None), ("pilot_pixels", 16, None), ("lanes", 1, None),
                ("chunk_elements", 1, None), ("dense_chunk_elements", 1, None), ("pilot_cache_bytes", 0, None),
                ("device_seg_bytes", 0, None), ("iqr_candidates", 2, None))
        for name, lo, hi in ints:
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo or (hi and val > hi):
                raise ValueError(f"{name} must be an integer >= {lo}{f' and <= {hi}' if hi else ''}, got {val!r}")
        t = self.threshold_samples
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1):
            raise ValueError(f"threshold_samples must be None (as many as n_samples) or an integer >= 1, got {t!r}")
        if isinstance(self.threshold_seed, bool) or not isinstance(self.threshold_seed, (int, np.integer)):
            raise ValueError(f"threshold_seed must be an integer, got {self.threshold_seed!r}")
        for name in ("rank_tolerance", "checkpoint_every"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {val!r}")

    def with_args(self, **given):
        """This tuning with ``dissect``'s own knob arguments where they differ from the defaults;
        a knob set both here and there to different values is an error."""
        default = Tuning()
        changes = {}
        for name, val in given.items():
            if val == getattr(default, name):
                continue
            mine = getattr(self, name)
            if mine != getattr(default, name) and mine != val:
                raise ValueError(f"{name} is given twice: {val!r} as an argument and {mine!r} in tuning; give it once")
            changes[name] = val
        return dataclasses.replace(self, **changes) if changes else self
