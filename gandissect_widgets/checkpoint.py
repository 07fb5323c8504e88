"""Reading weight files safely, and loading them with strict key checks that say what is wrong.

- ``torch_load(path)``: ``torch.load`` on the CPU with ``weights_only=True`` unless the caller opts in.
- ``load_strict(module, state_dict, layout)``: every key the module needs, no key it does not know,
  every shape right; otherwise one ``CheckpointError`` listing the missing, unexpected and
  mis-shaped keys and naming the layout that was expected.
"""
from __future__ import annotations

import os
import pickle

import torch

__all__ = ["CheckpointError", "torch_load", "unwrap_state_dict", "strip_prefix", "load_strict"]


class CheckpointError(ValueError):
    """A weight file that is not in the layout a loader expects (the message says how it differs)."""


def torch_load(path, trust: bool = False, safe_globals=()):
    """The object in ``path``, loaded on the CPU; ``weights_only=True`` unless ``trust``.

    ``safe_globals``: extra classes allowed in a weights-only load (e.g. ``argparse.Namespace``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds more than tensors and plain containers, so it was not loaded with "
            f"weights_only=True ({first}). Loading it in full runs code stored in the file: only do so "
            f"for a file you trust, with trust_pickle=True.") from e


def unwrap_state_dict(obj, keys=("state_dict",)):
    """The state dict inside a ``{'state_dict': ...}`` wrapper (or ``obj`` itself)."""
    for k in keys:
        if isinstance(obj, dict) and k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict (a dict of tensors), got {type(obj).__name__}")
    return obj


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    """Drop a prefix carried by every key (``module.`` from DataParallel)."""
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _show(keys, limit=12):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(module: torch.nn.Module, state_dict: dict, layout: str, source: str = "checkpoint",
                optional_suffixes=("num_batches_tracked",)):
    """Load ``state_dict`` into ``module`` after checking keys and shapes; raise ``CheckpointError``.

    Keys ending in ``optional_suffixes`` may be missing (BatchNorm's counter, absent from old files).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(tuple(optional_suffixes))]
    unexpected = [k for k in state_dict if k not in expected]
    bad_shape = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in state_dict if k in expected and torch.is_tensor(state_dict[k])
                 and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_show(unexpected)}")
        if bad_shape:
            parts.append(f"wrong shapes: {_show(bad_shape)}")
        raise CheckpointError(f"{source} does not match the {layout} layout; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=False)
    return module
