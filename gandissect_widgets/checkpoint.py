"""Reading weight files safely, and loading them with strict key checks that say what is wrong.

- ``torch_load(path)``: ``torch.load`` on the CPU with ``weights_only=True`` unless the caller opts in;
  a file that is empty, truncated or not PyTorch's gives one ``CheckpointError`` naming it, a file that
  needs trust an ``UntrustedPickleError`` saying how to give it (never torch's own advice).
- ``load_strict(module, state_dict, layout)``: every key the module needs, no key it does not know,
  every shape right; otherwise one ``CheckpointError`` listing the missing, unexpected and
  mis-shaped keys and naming the layout that was expected.
"""
from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile

import torch

__all__ = ["CheckpointError", "UntrustedPickleError", "explain_load_error", "torch_load", "unwrap_state_dict",
           "strip_prefix", "load_strict"]


class CheckpointError(ValueError):
    """A weight file that is not in the layout a loader expects (the message says how it differs)."""


class UntrustedPickleError(CheckpointError, PermissionError):
    """A file that holds Python objects beyond weights: it loads only when the user trusts it."""


TRUST_ADVICE = ("if you know where the file comes from, pass --trust-pickle (command line) or "
                "trust_pickle=True (Python); unpickling runs code stored in the file")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _from_torch_serialization(exc) -> bool:
    """Whether ``exc`` was raised inside torch's (un)pickling code (torch.load)."""
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if f.endswith(("torch/serialization.py", "torch/_weights_only_unpickler.py")):
            return True
        tb = tb.tb_next
    return False


def explain_load_error(path, exc, what: str = "checkpoint") -> CheckpointError | None:
    """The clear error for ``exc``, raised by ``torch.load(path)`` (else None: not a reading error).

    A file with pickled objects beyond weights -> ``UntrustedPickleError`` (say how to trust it);
    an empty, truncated, corrupted or foreign file -> ``CheckpointError`` "not a PyTorch checkpoint";
    never torch's own advice to load with ``weights_only=False``.
    """
    path = os.fspath(path)
    text = _ANSI.sub("", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        found = f" ({m.group(1)})" if m else ""
        return UntrustedPickleError(
            f"{what} {path} holds Python objects beyond tensors and plain containers{found}, so it was not "
            f"loaded as weights only; {TRUST_ADVICE}")
    reading = isinstance(exc, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
                               UnicodeDecodeError))
    if isinstance(exc, (RuntimeError, KeyError, ValueError, AttributeError, IndexError, TypeError, OSError)) \
            and not isinstance(exc, (FileNotFoundError, PermissionError)) and _from_torch_serialization(exc):
        reading = True
    if not reading:
        return None
    size = os.path.getsize(path) if os.path.isfile(path) else None
    detail = "the file is empty" if size == 0 else _first_line(exc)
    if "weights only load failed" in detail.lower():  # torch's advice; the detail is further down
        m = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
        detail = _first_line(m.group(1)) if m else "unreadable pickle data"
    detail = re.split(r"(?<=[a-z)])\. ", detail)[0].rstrip(".")  # the first sentence
    if len(detail) < 8 or isinstance(exc, OSError):
        detail = f"unrecognised contents ({type(exc).__name__}: {detail})"
    return CheckpointError(
        f"cannot read {what} {path}: not a PyTorch {'checkpoint' if what == 'checkpoint' else 'file'} (or "
        f"truncated, or corrupted): {detail}; "
        f"expected a file written by torch.save")


def torch_load(path, trust: bool = False, safe_globals=(), what: str = "checkpoint"):
    """The object in ``path``, loaded on the CPU; ``weights_only=True`` unless ``trust``.

    ``safe_globals``: extra classes allowed in a weights-only load (e.g. ``argparse.Namespace``);
    ``what``: what the file is, for messages ("checkpoint", "reference tensor", ...).
    Errors: ``FileNotFoundError`` (no such file), ``UntrustedPickleError`` (the file needs trust),
    ``CheckpointError`` (empty, truncated or not a PyTorch file), ``ImportError`` (a trusted pickle
    whose classes cannot be imported), each naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        problem = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"{what} file {problem}: {path}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except ImportError as e:  # a trusted pickle naming a module that is not installed
        raise ImportError(f"{what} {path} needs module {getattr(e, 'name', None) or _first_line(e)!r} "
                          f"to be unpickled; install or import the code that wrote it") from e
    except Exception as e:
        err = explain_load_error(path, e, what)
        if err is None:
            raise
        raise err from e


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
