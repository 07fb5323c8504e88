"""Independent per-layer work run side by side on the CPU's cores.

A dissection's statistics are many small tensor operations per layer.  On a CPU, torch's
intra-op threads speed such small operations up poorly (on 2 cores: 1.3x against 1.7x for the
model's convolutions), but the layers are independent of each other.  So layers run in Python
threads (torch releases the GIL inside its operators), each with its share of the intra-op
threads.  The same holds for the models' forward passes of small batches: two on one core each
run faster than one on two cores (about 20% on SceneWorld), so the next batches go through the
models on lane threads while the statistics of the current one are counted.  Off the CPU, work
runs in turn: the device queues it anyway.

    with SideBySide(device, lanes=2) as side:
        side.run(work, layers, weights)   # work(layer) for every layer; returns when all are done
        for out in side.ahead(forward, batches):   # forward(batch), in order, computed ahead
            ...

Where the lanes' threads have the intra-op share ``run`` wants, ``run`` uses them too: every
thread gets its own glibc heap arena, and fewer threads hold less memory.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import threading
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


def _wait_all(futures):
    """Cancel what has not started and wait for the rest, through further interrupts (the
    caller is raising one already): no work on shared state outlives the call that gave it."""
    for f in futures:
        f.cancel()
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            continue


class SideBySide(contextlib.AbstractContextManager):
    """Runs work on several items at once on a CPU (see the module docstring)."""

    def __init__(self, device, lanes: int = 2):
        self.cores = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
        self.lanes = max(1, min(int(lanes), self.cores))
        self._pool = self._lane_pool = None
        self._lane_idents = set()

    def _inline(self):
        """Whether work must run in the calling thread: a lane's own work that asks for more
        (it would wait in the queue behind itself)."""
        return threading.get_ident() in self._lane_idents

    @property
    def _lane_threads(self):
        return max(1, self.cores // self.lanes)

    def run(self, work, items, weights=None):
        """``work(item)`` for every item, in groups of about equal ``weights``, one per thread."""
        items = list(items)
        weights = list(weights) if weights is not None else [1.0] * len(items)
        groups = _balanced(items, weights, min(self.cores, len(items))) if items else []
        if len(groups) <= 1 or self._inline():
            for item in items:
                work(item)
            return
        per = max(1, self.cores // len(groups))
        if self._lane_pool is not None and len(groups) <= self.lanes and per == self._lane_threads:
            # the lanes' threads will do: fewer threads, fewer glibc arenas (these groups queue
            # behind the forward passes already given to the lanes, which keeps the cores busy)
            pool = self._lane_pool
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cores, thread_name_prefix="gandissect-layer")
            pool = self._pool
        before = torch.get_num_threads()
        # a thread takes the intra-op thread count in force at its first operation, and keeps it
        torch.set_num_threads(per)
        try:
            done = [pool.submit(lambda group: [work(item) for item in group], g) for g in groups]
            try:
                wait(done)  # all of them, even if one failed: none may still be working when this returns
            except BaseException:  # an interrupt while waiting: the work already started still ends first
                _wait_all(done)
                raise
            for f in done:
                f.result()
        finally:
            torch.set_num_threads(before)

    def ahead(self, work, items):
        """``work(item)`` for every item, yielded in order, computed up to ``lanes`` items ahead
        on lane threads (each with its share of the intra-op threads) while the caller uses the
        one yielded.  On a CPU two model forward passes on one core each run faster than one on
        two cores.  An exception in ``work`` is raised where its item is yielded; work already
        started is waited for when the caller stops early."""
        items = list(items)
        if self.lanes <= 1 or len(items) <= 1 or self._inline():
            for item in items:
                yield work(item)
            return
        pool = self._lanes()
        pending, rest = collections.deque(), iter(items)
        try:
            pending.extend(pool.submit(work, item) for item in itertools.islice(rest, self.lanes))
            while pending:
                done = pending[0].result()  # still pending while waited for: an interrupt waits for it too
                pending.popleft()
                pending.extend(pool.submit(work, item) for item in itertools.islice(rest, 1))
                yield done
                del done  # the caller is done with it: not held while the next one is waited for
        finally:
            _wait_all(pending)

    def _lanes(self):
        if self._lane_pool is None:
            pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="gandissect-lane")
            before = torch.get_num_threads()
            torch.set_num_threads(self._lane_threads)
            barrier = threading.Barrier(self.lanes)
            started = []
            try:  # every lane thread takes its intra-op thread count now (its first get_num_threads), and keeps it

                def warm():
                    try:
                        barrier.wait()  # one task per thread
                    except threading.BrokenBarrierError:  # the warm-up was interrupted: see below
                        return None
                    self._lane_idents.add(threading.get_ident())
                    return torch.get_num_threads()

                for _ in range(self.lanes):
                    started.append(pool.submit(warm))
                wait(started)
            except BaseException:
                # interrupted (Ctrl-C) before every lane thread was given its task: a thread at the
                # barrier would wait for the others for ever, and the process could not exit
                barrier.abort()
                _wait_all(started)
                pool.shutdown(wait=True)
                self._lane_idents = set()
                raise
            finally:
                torch.set_num_threads(before)
            self._lane_pool = pool
        return self._lane_pool

    def close(self):
        for pool in (self._pool, self._lane_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._lane_pool = None
        self._lane_idents = set()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False
