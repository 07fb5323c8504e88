"""What every view shares: a Session, a status line for busy state and errors, a render worker."""
from __future__ import annotations

import base64
import html
import threading
import time

import ipywidgets as W

from gandissect_widgets.widgets.snapshot import snapshot_png
from gandissect_widgets.widgets.worker import LatestWins

__all__ = ["View", "image_widget", "strength_slider"]

BUSY_AFTER = 0.15  # seconds before "rendering..." shows
SNAPSHOT_WAIT = 10.0  # seconds a display waits for the first render, for its static picture


def image_widget(**layout):
    return W.Image(format="png", layout=W.Layout(**layout) if layout else W.Layout())


def strength_slider(session):
    """The session's insertion strength (a multiple of the units' insertion values)."""
    return W.FloatSlider(value=session.strength, min=0.5, max=8.0, step=0.5, description="strength",
                         continuous_update=False, readout_format=".1f",
                         tooltip="insertions set units to this many times their insertion values")


class View(W.VBox):
    """A VBox with ``session``, ``status`` (an HTML line) and ``worker`` (LatestWins)."""

    def __init__(self, session, children=(), **kwargs):
        self.session = session
        self.status = W.HTML(value="", layout=W.Layout(min_height="1.5em"))
        self.last_error = None
        self._busy_since = None
        self.worker = LatestWins(on_error=self._show_error, on_busy=self._set_busy, name=type(self).__name__)
        super().__init__(children=list(children) + [self.status], **kwargs)
        self.add_class("gandissect-view")

    def _set_busy(self, flag):
        """Show "rendering…" only when a render takes longer than BUSY_AFTER (fast ones don't flicker)."""
        if flag:
            since = self._busy_since = time.monotonic()

            def show():
                if self._busy_since == since and self.last_error is None:
                    self.status.value = '<span style="color:#777">rendering…</span>'
            timer = threading.Timer(BUSY_AFTER, show)
            timer.daemon = True
            timer.start()
        else:
            self._busy_since = None
            if self.last_error is None:
                self.status.value = ""

    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    def _show_error(self, exc, text=""):
        self.last_error = exc
        self.status.value = (f'<span style="color:#b00020"><b>{html.escape(type(exc).__name__)}:</b> '
                             f'{html.escape(str(exc))}</span>')

    def clear_error(self):
        self.last_error = None
        self.status.value = ""

    def run(self, job, done=None):
        """Run ``job`` off the comm thread; ``done(result)`` if it is still the latest."""
        self.clear_error()
        return self.worker.submit(job, done)

    def safely(self, fn):
        """Wrap a UI callback so that its errors show in the view instead of vanishing."""
        def wrapped(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:
                self._show_error(e)
        return wrapped

    def wait(self, timeout=60.0):
        return self.worker.wait(timeout)

    # -- static pictures, for notebooks read without a kernel or saved widget state -------------
    def snapshot_png(self, timeout: float = SNAPSHOT_WAIT) -> bytes | None:
        """PNG of what the view shows now (its images, laid out like the view), after the
        render in flight; None before anything was rendered."""
        if not self.worker.on_worker_thread():
            self.wait(timeout)
        return snapshot_png(self)

    def snapshot(self):
        """The view's current state as a static image: the last expression of a cell, it stays
        in the saved notebook whatever happens to the widgets (figure notebooks, exports)."""
        from IPython.display import Image
        png = self.snapshot_png()
        if png is None:
            raise RuntimeError(f"{type(self).__name__} has rendered nothing yet")
        return Image(data=png, format="png")

    def _repr_mimebundle_(self, **kwargs):
        """The widget, plus a PNG of its first render for readers that cannot show widgets
        (JupyterLab shows the widget; nbconvert, GitHub and the like show the picture)."""
        data = super()._repr_mimebundle_(**kwargs)
        png = self.snapshot_png()
        if png is not None:
            data["image/png"] = base64.b64encode(png).decode("ascii")
            data["text/plain"] = f"{type(self).__name__} (a widget; static picture of its first render)"
        return data
