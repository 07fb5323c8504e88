"""The dissection's work directory kept whole: disk space, one process at a time, interrupts.

- ``reserve(fd, size)``: the segmentation cache's blocks allocated before it is mapped (a memory map
  of a sparse file on a full disk dies of SIGBUS); ``space_error``: the one-line ``CacheSpaceError``.
- ``WorkLock``: an exclusive ``fcntl.flock`` on ``work_dir/lock`` while a process works there;
  another waits for it and loads its result, or gives up (``CacheBusyError``).
- ``InterruptGuard``: a Ctrl-C inside ``critical()`` (a batch being counted, a checkpoint being
  written) waits for the section to end, so a checkpoint always holds whole batches.
- ``remove_work``: a work directory with nothing to resume from goes, with its empty result directory.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import threading
import time
import warnings

try:
    import fcntl
except ImportError:  # not on Windows: no locking there
    fcntl = None

__all__ = ["WorkDirError", "CacheSpaceError", "CacheBusyError", "SPACE_ERRNOS", "space_error", "reserve",
           "InterruptGuard", "WorkLock", "remove_work"]

SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_LOCK_POLL = 0.1  # seconds between tries for a work directory another process holds


class WorkDirError(OSError, ValueError):
    """The dissection's work directory cannot be used (one-line message naming it and what to do)."""

    def __init__(self, message, directory=None, err=None):
        super().__init__(message)
        self.errno = err
        self.directory = directory


class CacheSpaceError(WorkDirError):
    """Not enough disk space in the work directory; nothing partial was left there."""


class CacheBusyError(WorkDirError):
    """Another process works on the same dissection (same cache key) and ``lock_wait`` ran out."""


def _fmt_bytes(n) -> str:
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _free_space(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def space_error(directory, what, need, cause=None):
    free = _free_space(directory)
    have = f", {_fmt_bytes(free)} free" if free is not None else ""
    err = CacheSpaceError(f"not enough disk space in {directory}: {what} needs {_fmt_bytes(need)}{have}; free some "
                          f"space, dissect fewer samples, or give another cache_dir (--cache-dir)",
                          directory, errno.ENOSPC)
    if cause is not None:
        err.__cause__ = cause
    return err


def reserve(fd, size):
    """Allocate ``size`` bytes of the file ``fd`` on disk now (``posix_fallocate``; zeros written
    where the file system cannot), so that a memory map of it never meets a full disk."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                               errno.ENOSYS):
                raise
    block = bytes(1 << 20)
    pos = os.fstat(fd).st_size  # (holes before the end, left by other writers, stay: none of ours makes them)
    while pos < size:
        n = min(len(block), size - pos)
        pos += os.pwrite(fd, block[:n], pos)


class InterruptGuard:
    """A SIGINT (Ctrl-C) or SIGTERM (``kill``; torchrun stopping the other ranks of a job when one
    fails) that arrives inside ``critical()`` is held until the section ends, then raised as
    ``KeyboardInterrupt``; elsewhere it is raised at once.  Only where signals can be handled (the
    main thread); elsewhere no KeyboardInterrupt can arrive anyway.  SIGTERM is taken only where
    it has its default action (a program that handles it keeps its handler)."""

    def __init__(self):
        self.depth, self.pending = 0, None
        self._prev = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    prev = signal.getsignal(sig)
                    if callable(prev) if sig == signal.SIGINT else prev == signal.SIG_DFL:
                        signal.signal(sig, self._handler)
                        self._prev[sig] = prev
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev = {}
        return False

    def _handler(self, signum, frame):
        if self.depth > 0:
            self.pending = signum  # a second signal inside the section waits too: it is short
            return
        self._raise(signum, frame)

    def _raise(self, signum, frame):
        prev = self._prev.get(signum)
        if signum == signal.SIGINT and callable(prev):
            return prev(signum, frame)  # the default handler raises KeyboardInterrupt
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            self._raise(signum, None)


class WorkLock:
    """An exclusive ``fcntl.flock`` on ``work_dir/lock``, held while a process works there.

    The holder may delete the directory (with the lock file) when done; a process that then gets
    the lock of a deleted file sees that the path no longer names it, and tries again."""

    def __init__(self, work_dir, done_path, wait=None, progress=True):
        self.work_dir, self.done_path = work_dir, done_path
        self.path = os.path.join(work_dir, "lock")
        self.wait, self.progress = wait, progress
        self.fd = None

    def _holder(self, fd):
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""
        return f" (pid {text})" if text.isdigit() else ""

    def acquire(self) -> bool:
        """True once the lock is held; False if the result appeared meanwhile (load it, no lock)."""
        if fcntl is None:
            os.makedirs(self.work_dir, exist_ok=True)
            return True
        deadline = None if self.wait is None else time.monotonic() + max(0.0, float(self.wait))
        told = False
        while True:
            if os.path.exists(self.done_path):
                return False
            try:
                os.makedirs(self.work_dir, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileNotFoundError:  # the holder removed the directory just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(f"{self.work_dir}: this file system cannot lock files ({os.strerror(e.errno)}); "
                                  f"the dissection runs unlocked: do not share this cache_dir between processes",
                                  RuntimeWarning, stacklevel=4)
                    self.fd = fd
                    return True
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise CacheBusyError(
                        f"another process{holder} is working on this dissection in {self.work_dir}; wait for it "
                        f"to finish (lock_wait=None waits and then loads its result), or give another cache_dir",
                        self.work_dir, errno.EWOULDBLOCK) from None
                if not told and self.progress:
                    print(f"dissect: another process{holder} is working on this dissection in {self.work_dir}; "
                          f"waiting for it, then loading its result", file=sys.stderr, flush=True)
                    told = True
                time.sleep(_LOCK_POLL)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # locked a lock file its holder had removed: take the one there now
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid is only for messages (a full disk may refuse it)
            self.fd = fd
            return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def remove_work(work_dir, result_dir):
    """Remove a work directory that holds nothing to resume from, and its result directory if empty."""
    if os.path.exists(os.path.join(work_dir, "checkpoint.pt")):
        return
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(result_dir)
