"""Atomic file writing and cache keys: a result on disk is either whole or absent.

``atomic_write_bytes`` writes to a temporary file beside the destination (``.tmp-<name>.*``),
fsyncs it, renames it into place (``os.replace``) and fsyncs the directory; when any step fails
the temporary file is removed, the destination is untouched, and ``AtomicWriteError`` (an
``OSError`` with the original ``errno``) says in one line which file could not be written and why,
in plain words for a full disk or quota.
"""
from __future__ import annotations

import errno as _errno
import hashlib
import io
import json
import os
import tempfile

import numpy as np
import torch

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_save_npz", "atomic_torch_save",
           "sha256_file", "sha256_bytes", "cache_key", "json_bytes", "AtomicWriteError", "describe_os_error",
           "fsync_dir"]

_SPACE_ERRNOS = {_errno.ENOSPC, getattr(_errno, "EDQUOT", _errno.ENOSPC)}


class AtomicWriteError(OSError):
    """A file that could not be written; nothing was changed at its path (the message says why)."""

    def __init__(self, message, errno=None, path=None, reason=None):
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.reason = reason or message


def describe_os_error(e: OSError) -> str:
    """A short plain-words reason: 'no space left on device' for ENOSPC/EDQUOT, else the OS's words."""
    if getattr(e, "errno", None) == _errno.ENOSPC:
        return "no space left on device (ENOSPC)"
    if getattr(e, "errno", None) in _SPACE_ERRNOS:
        return "disk quota exceeded (EDQUOT)"
    if isinstance(e, AtomicWriteError):
        return e.reason
    text = e.strerror or str(e) or type(e).__name__
    return " ".join(str(text).split())  # one line


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask briefly changes process state


def fsync_dir(directory):
    """Make renames in ``directory`` durable; best effort, never raises (some filesystems cannot)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:1 << 24])
        view = view[n:]


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary file beside ``path``, then rename: readers see the old file or the new one.

    On failure the temporary file is removed, ``path`` is as it was, and ``AtomicWriteError`` is raised.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    tmp = fd = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + ".")
        _write_all(fd, data)
        os.fsync(fd)
        fd, open_fd = None, fd
        os.close(open_fd)  # closed even when this raises (Linux): never closed twice
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        reason = describe_os_error(e)
        raise AtomicWriteError(f"could not write {path}: {reason}; the file there (if any) is unchanged",
                               errno=e.errno, path=path, reason=reason) from e
    finally:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(d)


def json_clean(obj):
    """NaN and infinities become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def json_bytes(obj) -> bytes:
    """The bytes ``atomic_write_json`` writes: strict JSON, indented, one trailing newline."""
    return (json.dumps(json_clean(obj), indent=1, allow_nan=False) + "\n").encode()


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npz(path, arrays: dict):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(**parts) -> str:
    """A short hash of everything that affects a result (JSON-serialisable parts)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]
