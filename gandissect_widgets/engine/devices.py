"""Where a branch for the host (CPU) and one for an accelerator part, said once.

A few statistics take another path on a CPU than on a GPU: ``bincount`` (a host synchronisation
on a GPU, the fastest count on a CPU), interpolation by one-hot products (exact on a CPU only) and
the segmentation cache (a file on a CPU, device memory on a GPU).  They all ask ``on_host``, so a
test can run the accelerator's branches on a CPU (``monkeypatch.setattr(devices, "on_host", ...)``).
"""
from __future__ import annotations

import torch

__all__ = ["on_host"]


def on_host(device) -> bool:
    """Whether tensors on ``device`` live in host memory (a CPU)."""
    return torch.device(device).type == "cpu"
