"""Run renders off the comm thread; the latest request wins and stale results are dropped."""
from __future__ import annotations

import atexit
import threading
import time
import traceback
import weakref
from typing import Callable

__all__ = ["LatestWins"]

_LIVE: "weakref.WeakSet[LatestWins]" = weakref.WeakSet()


@atexit.register
def _quiesce(timeout: float = 30.0):
    """At interpreter exit no job starts any more and the running ones finish first: a daemon
    thread stopped inside torch's C++ code while the interpreter shuts down aborts the process
    ("terminate called without an active exception", exit status 134)."""
    live = list(_LIVE)
    for w in live:
        with w._cv:
            w._closed, w._pending = True, None
            w._cv.notify_all()
    deadline = time.monotonic() + timeout
    for w in live:
        t = w._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


class LatestWins:
    """One background thread per view.  ``submit(job, done)`` replaces any job not yet started;
    ``done(result)`` runs only if no newer job was submitted meanwhile.  ``on_busy(flag)`` and
    ``on_error(exc, text)`` report state to the view."""

    def __init__(self, on_error: Callable | None = None, on_busy: Callable | None = None, name: str = "render"):
        self.on_error, self.on_busy, self.name = on_error, on_busy, name
        self._cv = threading.Condition()
        self._pending = None
        self._gen = 0
        self._running = False
        self._thread = None
        self._closed = False  # the interpreter is exiting: no job starts
        _LIVE.add(self)

    @property
    def generation(self):
        return self._gen

    def submit(self, job: Callable, done: Callable | None = None):
        with self._cv:
            self._gen += 1
            if self._closed:
                return self._gen
            self._pending = (self._gen, job, done)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=f"gandissect-{self.name}", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return self._gen

    def _loop(self):
        while True:
            with self._cv:
                while self._pending is None:
                    if self._closed:
                        self._thread = None
                        return
                    if not self._cv.wait(timeout=5.0):
                        if self._pending is None:
                            self._thread = None
                            return
                gen, job, done = self._pending
                self._pending = None
                self._running = True
            if self.on_busy:
                self.on_busy(True)
            try:
                result = job()
                if gen == self._gen and done is not None:
                    done(result)
            except Exception as e:  # shown in the view, never lost
                if gen == self._gen and self.on_error:
                    self.on_error(e, traceback.format_exc())
            finally:
                with self._cv:
                    self._running = False
                    idle = self._pending is None
                    self._cv.notify_all()
                if idle and self.on_busy:
                    self.on_busy(False)

    def on_worker_thread(self) -> bool:
        """Whether the caller runs inside a job (it must not wait for itself)."""
        return threading.current_thread() is self._thread

    def idle(self) -> bool:
        with self._cv:
            return self._pending is None and not self._running

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until no job is pending or running (tests and scripts)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending is None and not self._running, timeout=timeout)
