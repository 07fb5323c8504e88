"""Independent per-layer work run side by side on the CPU's cores.

A dissection's statistics are many small tensor operations per layer.  On a CPU, torch's
intra-op threads speed such small operations up poorly (on 2 cores: 1.3x against 1.7x for the
model's convolutions), but the layers are independent of each other.  So layers run in Python
threads (torch releases the GIL inside its operators), each with its share of the intra-op
threads.  Off the CPU, work runs in turn: the device queues it anyway.

    with SideBySide(device) as side:
        side.run(work, layers, weights)   # work(layer) for every layer; returns when all are done
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, wait

import torch

__all__ = ["SideBySide"]


def _balanced(items, weights, k):
    """``items`` cut into ``k`` groups of about equal total weight (largest first)."""
    groups = [[] for _ in range(k)]
    load = [0.0] * k
    for w, i in sorted(zip(weights, range(len(items))), key=lambda t: -t[0]):
        g = load.index(min(load))
        groups[g].append(items[i])
        load[g] += w
    return [g for g in groups if g]


class SideBySide(contextlib.AbstractContextManager):
    """Runs work on several items at once on a CPU (see the module docstring)."""

    def __init__(self, device):
        self.cores = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
        self._pool = None

    def run(self, work, items, weights=None):
        items = list(items)
        weights = list(weights) if weights is not None else [1.0] * len(items)
        groups = _balanced(items, weights, min(self.cores, len(items))) if items else []
        if len(groups) <= 1:
            for item in items:
                work(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.cores, thread_name_prefix="gandissect-layer")
        before = torch.get_num_threads()
        # a thread takes the intra-op thread count in force at its first operation, and keeps it
        torch.set_num_threads(max(1, self.cores // len(groups)))
        try:
            done = [self._pool.submit(lambda group: [work(item) for item in group], g) for g in groups]
            wait(done)  # all of them, even if one failed: none may still be working when this returns
            for f in done:
                f.result()
        finally:
            torch.set_num_threads(before)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False
