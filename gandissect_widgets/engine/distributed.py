"""One job across processes with ``torch.distributed`` (launched by ``torchrun``), and nothing home-made.

- ``job()``: this process's place in the job (``Ranks``), as a context: the process group the user
  initialised, or one started from ``torchrun``'s environment (``gloo`` on CPUs, ``nccl`` on CUDA)
  and closed on exit, or a single process (``Ranks()``), where everything below is the identity.
- ``Ranks.share(items)``: the items (batches, units, draws) this rank computes: every ``size``-th,
  from its ``rank`` on (round robin, so that a first stage over the first batches, a pilot, is
  spread too).  Batches of the same ``sample_z(n, seed)`` sequence stay whole, so every sample goes
  through the models in the same batch as in one process (same bits), whatever the number of ranks.
  ``Ranks.block(n, batch_size)``: a contiguous run of whole batches instead.
- ``all_sum`` / ``all_min`` / ``all_max`` / ``gather`` / ``broadcast`` / ``agree``: the collectives
  the statistics merge with, in rank order, so every rank holds the same merged result.
- ``RankFailed``: a collective that failed because another rank died or stopped: one line naming it.

Usage (what ``dissect`` and the causal tools do)::

    with job(device) as ranks:
      for i0, i1 in ranks.share(batches):      # count these samples here
      counts = all_sum(counts, ranks)          # every rank: the counts over all n
      if ranks.writer: save(result)
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

__all__ = ["Ranks", "RankFailed", "job", "join", "current", "all_sum", "all_min", "all_max", "gather", "gather_objects",
           "broadcast", "agree", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for the other ranks before it fails


class RankFailed(RuntimeError):
    """Another rank of the job died, was interrupted or failed; this rank stops too."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a job: ``rank`` of ``size``; ``local_rank`` on its host."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not in a process group (one process)

    @property
    def writer(self) -> bool:
        """The one rank that writes results and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def block(self, n: int, batch_size: int) -> tuple[int, int]:
        """Samples ``[i0, i1)`` of this rank: whole batches, as evenly spread as batches allow."""
        batches = -(-n // batch_size)
        b0, b1 = self.rank * batches // self.size, (self.rank + 1) * batches // self.size
        return min(b0 * batch_size, n), min(b1 * batch_size, n)

    def share(self, items) -> list:
        """This rank's items: ``items[rank::size]`` (round robin; all of them in one process)."""
        return list(items)[self.rank::self.size]

    def owner(self, index: int) -> int:
        """The rank whose ``share`` holds item ``index``."""
        return index % self.size

    def device(self, requested=None) -> torch.device:
        """``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``) in a job; anything else as given."""
        dev = torch.device(requested) if requested is not None else torch.device("cpu")
        if dev.type == "cuda" and dev.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return dev

    def __str__(self):
        return f"rank {self.rank} of {self.size}" if self.distributed else "one process"


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def join(device=None, timeout: float = DEFAULT_TIMEOUT) -> Ranks:
    """This process's ``Ranks``: from the process group already initialised (by the user), or from
    the environment ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), in
    which case the group is initialised here with ``nccl`` for a CUDA ``device`` and ``gloo``
    otherwise, and collectives fail after ``timeout`` seconds.  Without either: one process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return Ranks()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"rank {rank} of {size} is local rank {local} on its host, which has {have} CUDA "
                             f"device(s): start at most {have} ranks per host (torchrun --nproc-per-node {have})")
        torch.cuda.set_device(local)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout))
    return Ranks(rank, size, local, backend)


def current() -> Ranks:
    """The ``Ranks`` of the process group the caller initialised (``job()`` or
    ``torch.distributed.init_process_group``), or one process.  Started by ``torchrun`` without
    a group: ``ValueError``, since each rank would do the whole job (and write the same files)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return join()
    if _env_int("WORLD_SIZE", 1) > 1:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set (torchrun) but no process group is "
                         "initialised: run the work inside `with gandissect_widgets.engine.distributed.job(device) "
                         "as ranks:` (or torch.distributed.init_process_group), or pass ranks=")
    return Ranks()


@contextlib.contextmanager
def job(device=None, timeout: float = DEFAULT_TIMEOUT):
    """``join()`` as a context: a process group started here is closed on exit (a gloo group left
    open when the interpreter exits aborts the process), one the user started is left alone."""
    import torch.distributed as dist
    started = not (dist.is_available() and dist.is_initialized())
    ranks = join(device, timeout)
    try:
        yield ranks
    finally:
        if started and ranks.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _collective(ranks: Ranks, what: str, fn):
    try:
        return fn()
    except RuntimeError as e:  # gloo/nccl report a dead peer or a timeout as (subclasses of) RuntimeError
        raise RankFailed(f"{ranks}: {what} failed: another rank of the job stopped or timed out "
                         f"({_first_sentence(e)}); the launcher's log names the rank that failed first") from e


def _first_sentence(e) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". This is typically")[0]


def _on_backend(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    # nccl moves CUDA tensors only, gloo CPU ones (it also takes CUDA ones, through the host)
    if ranks.backend == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _reduce(t: torch.Tensor, ranks: Ranks, op: str) -> torch.Tensor:
    if not ranks.distributed:
        return t
    import torch.distributed as dist
    work = _on_backend(t.contiguous().clone(), ranks)
    _collective(ranks, f"all_reduce({op})", lambda: dist.all_reduce(work, op=getattr(dist.ReduceOp, op)))
    return work.to(t.device)


def all_sum(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over ranks (exact for integer tensors: counts merge bit for bit)."""
    return _reduce(t, ranks, "SUM")


def all_min(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    return _reduce(t, ranks, "MIN")


def all_max(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    return _reduce(t, ranks, "MAX")


def gather(t: torch.Tensor, ranks: Ranks, dim: int = 0) -> torch.Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may differ;
    the other dimensions and the dtype must agree).  With blocks in rank order, that is sample order."""
    if not ranks.distributed:
        return t
    import torch.distributed as dist
    work = _on_backend(t.movedim(dim, 0).contiguous(), ranks)
    size = torch.tensor([work.shape[0]], dtype=torch.int64, device=work.device)
    sizes = [torch.zeros_like(size) for _ in range(ranks.size)]
    _collective(ranks, "gathering sizes", lambda: dist.all_gather(sizes, size))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest,) + tuple(work.shape[1:]), dtype=work.dtype, device=work.device)
    padded[:work.shape[0]] = work
    parts = [torch.empty_like(padded) for _ in range(ranks.size)]
    _collective(ranks, "gathering values", lambda: dist.all_gather(parts, padded))
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out.to(t.device).movedim(0, dim)


def gather_objects(obj, ranks: Ranks) -> list:
    """Every rank's ``obj`` (picklable values made by this package: state dicts, partial results),
    in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist
    values = [None] * ranks.size
    _collective(ranks, "gathering results", lambda: dist.all_gather_object(values, obj))
    return values


def broadcast(obj, ranks: Ranks, src: int = 0):
    """``src``'s ``obj`` (any picklable value made by this package, never read from files) on every rank."""
    if not ranks.distributed:
        return obj
    import torch.distributed as dist
    box = [obj]
    _collective(ranks, "sharing a value", lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def agree(value, ranks: Ranks, what: str):
    """Check that every rank holds the same ``value`` (settings, a cache key): a job whose ranks were
    started with different arguments stops at once, with one line naming the first rank that differs."""
    if not ranks.distributed:
        return value
    values = gather_objects(value, ranks)
    for r, v in enumerate(values):
        if v != values[0]:
            raise ValueError(f"ranks disagree on {what}: rank 0 has {values[0]!r}, rank {r} has {v!r}; "
                             "start every rank with the same command")
    return value
