"""What every view shares: a Session, a status line for busy state and errors, a progress line
with a cancel button for long work, a render worker, and the views' stylesheet."""
from __future__ import annotations

import base64
import html
import threading
import time

import ipywidgets as W
import traitlets

from gandissect_widgets.engine.progress import Cancelled
from gandissect_widgets.widgets.snapshot import snapshot_png
from gandissect_widgets.widgets.worker import LatestWins

__all__ = ["View", "ChoiceButtons", "Chart", "image_widget", "strength_slider", "pixels", "stylesheet", "row", "caption", "in_browser_order"]

BUSY_AFTER = 0.15  # seconds before "rendering..." shows
SNAPSHOT_WAIT = 10.0  # seconds a display waits for the first render, for its static picture
BUSY_TEXT = '<span class="gd-muted">rendering…</span>'
PROGRESS_EVERY = 0.1  # seconds between updates of a progress line


def stylesheet() -> str:
    """The views' CSS (JupyterLab theme variables, so light and dark themes both fit)."""
    from importlib.resources import files
    return files("gandissect_widgets.widgets").joinpath("style.css").read_text()


def pixels(widget, width: int, height: int | None = None):
    """Show ``widget`` at exactly this size (CSS px): pictures are never squeezed below it."""
    widget.layout.width = f"{width}px"
    widget.layout.min_width = f"{width}px"
    if height is not None:
        widget.layout.height = f"{height}px"
    widget.add_class("gd-fixed")
    return widget


def image_widget(**layout):
    return W.Image(format="png", layout=W.Layout(**layout) if layout else W.Layout())


class Chart(W.Box):
    """A chart (or a key to pictures) as two PNGs, for JupyterLab's light and dark themes
    (``encode.figure_pngs``: one layout, the same data colours, each theme's ink on a transparent
    background); the stylesheet shows the one of the theme in use.  ``value``: the light PNG;
    ``show(fig)`` draws both from a figure, ``value = (light, dark)`` sets them."""

    def __init__(self, *classes, **layout):
        self.light, self.dark = image_widget(**layout), image_widget(**layout)
        for image, theme in ((self.light, "light"), (self.dark, "dark")):
            for c in ("gd-chart", f"gd-for-{theme}") + classes:
                image.add_class(c)
        super().__init__([self.light, self.dark])
        self.add_class("gd-themed")

    @property
    def value(self) -> bytes:
        return self.light.value

    @value.setter
    def value(self, pngs):
        for image, png in zip((self.light, self.dark), pngs):
            if image.value != png:
                image.value = png



def strength_slider(session):
    """The session's insertion strength (a multiple of the units' insertion values)."""
    return W.FloatSlider(value=session.strength, min=0.5, max=8.0, step=0.5, description="strength",
                         continuous_update=False, readout_format=".1f",
                         tooltip="insertions set units to this many times their insertion values")


def row(children=(), **layout):
    """Controls or pictures side by side, wrapping to the width the view is given."""
    box = W.HBox(list(children), layout=W.Layout(flex_flow="row wrap", **layout))
    box.add_class("gd-row")
    return box


def caption(text: str, **layout):
    """A bold caption (escaped: captions may hold concept names from a user's files)."""
    return W.HTML(f'<span class="gd-caption"><b>{html.escape(text)}</b></span>',
                  layout=W.Layout(**layout) if layout else W.Layout())


def in_browser_order(*widgets):
    """Have the browser send these widgets' events on the one channel it chose, so the kernel
    handles them in the order they were made.  ipykernel 7 with JupyterLab's kernel subshells
    asks the browser to answer each comm on the subshell that last sent to it: a canvas
    repainted from a worker thread and buttons restyled in a click handler end up on two
    threads, and a mode click could reach the kernel after the stroke that followed it."""
    for w in widgets:
        comm = getattr(w, "comm", None)
        if comm is not None and hasattr(comm, "_reply_subshell_for"):
            comm._reply_subshell_for = lambda data, default: default


class ChoiceButtons(W.HBox):
    """Buttons of which one is chosen (``value``), like ``ToggleButtons``, but a click reaches the
    kernel as an event, in order with canvas mouse events: a ToggleButtons value is synced state,
    which the browser holds back while the kernel is busy, so strokes drawn just after a click
    would still see the old choice."""

    value = traitlets.Unicode()

    def __init__(self, options, value=None, tooltips=(), button_width="70px"):
        self._buttons = {}
        for i, o in enumerate(options):
            b = W.Button(description=o, tooltip=tooltips[i] if i < len(tooltips) else o,
                         layout=W.Layout(width=button_width))
            b.add_class("gd-mode")
            b.on_click(lambda _, o=o: setattr(self, "value", o))
            self._buttons[o] = b
        in_browser_order(*self._buttons.values())
        super().__init__(list(self._buttons.values()))
        self.observe(self._mark, names="value")
        self.value = value if value is not None else options[0]

    @traitlets.validate("value")
    def _valid(self, proposal):
        if proposal["value"] not in self._buttons:
            raise traitlets.TraitError(f"choose one of {', '.join(self._buttons)}, not {proposal['value']!r}")
        return proposal["value"]

    def _mark(self, change=None):
        for o, b in self._buttons.items():
            b.button_style = "primary" if o == self.value else ""

    def click(self, option):
        """What a click on ``option``'s button does (tests and scripts)."""
        self._buttons[option].click()


class View(W.VBox):
    """A VBox with ``session``, ``status`` (an HTML line) and ``worker`` (LatestWins)."""

    def __init__(self, session, children=(), **kwargs):
        self.session = session
        self.status = W.HTML(value="", layout=W.Layout(min_height="1.5em"))
        self.progress_bar = W.FloatProgress(value=0, min=0, max=1, layout=W.Layout(width="180px"))
        self.progress_text = W.HTML()
        self.cancel_button = W.Button(description="cancel", icon="stop", tooltip="stop this computation",
                                      layout=W.Layout(width="auto", min_width="90px"))
        self.cancel_button.on_click(lambda b: self.cancel())
        self.progress_line = W.HBox([self.progress_bar, self.progress_text, self.cancel_button],
                                    layout=W.Layout(display="none", align_items="center"))
        self.progress_line.add_class("gd-progress")
        self.last_error = None
        self._busy_since = None
        self._task = None
        self._lanes: dict[str, LatestWins] = {}
        self.worker = self._lane("main")
        style = W.HTML(f"<style>{stylesheet()}</style>", layout=W.Layout(display="none"))
        super().__init__(children=[style] + list(children) + [self.progress_line, self.status], **kwargs)
        self.add_class("gandissect-view")

    def _set_busy(self, flag):
        """Show "rendering…" only when a render takes longer than BUSY_AFTER (fast ones don't flicker)."""
        if flag:
            since = self._busy_since = time.monotonic()

            def show():
                if self._busy_since == since and not self.status.value:  # over no message
                    self.status.value = BUSY_TEXT
            timer = threading.Timer(BUSY_AFTER, show)
            timer.daemon = True
            timer.start()
        else:
            self._busy_since = None
            if self.status.value == BUSY_TEXT:  # a message (an error, "cancelled") stays
                self.status.value = ""

    @property
    def busy(self) -> bool:
        return self._busy_since is not None

    def _show_error(self, exc, text=""):
        if isinstance(exc, Cancelled):
            self.last_error = None
            self.status.value = f'<span class="gd-muted">cancelled: {html.escape(str(exc))}</span>'
            return
        self.last_error = exc
        self.status.value = (f'<span class="gd-error"><b>{html.escape(type(exc).__name__)}:</b> '
                             f'{html.escape(str(exc))}</span>')

    def clear_error(self):
        self.last_error = None
        self.status.value = ""

    def _lane(self, name: str) -> LatestWins:
        if name not in self._lanes:
            self._lanes[name] = LatestWins(on_error=self._show_error, on_busy=self._set_busy,
                                           name=f"{type(self).__name__}-{name}")
        return self._lanes[name]

    def run(self, job, done=None, progress: bool = False, lane: str = "main"):
        """Run ``job`` off the comm thread; ``done(result)`` if it is still the latest of its
        ``lane`` (a view draws its charts in a lane of their own, so that redrawing one does not
        drop the result of a long computation in the main lane).

        ``progress=True``: ``job(report)`` gets the engine's progress callback (see
        ``engine.progress``): long work shows done/total and the time left in the view's progress
        line, and its cancel button stops it (the callback raises ``Cancelled``)."""
        self.clear_error()
        worker = self._lane(lane)
        if not progress:
            return worker.submit(job, done)
        task = _Task(self)

        def tracked():
            self._task = task
            try:
                return job(task.report)
            finally:
                task.finish()
        return worker.submit(tracked, done)

    def cancel(self):
        """Stop the long computation in flight (what the cancel button does)."""
        if self._task is not None:
            self._task.cancelled = True

    def safely(self, fn):
        """Wrap a UI callback so that its errors show in the view instead of vanishing."""
        def wrapped(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:
                self._show_error(e)
        return wrapped

    def wait(self, timeout=60.0):
        """Block until every lane is idle (tests and scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lanes = list(self._lanes.values())
            if not all(w.wait(max(0.0, deadline - time.monotonic())) for w in lanes):
                return False
            if all(w.idle() for w in self._lanes.values()):  # none started another meanwhile
                return True

    def _progress(self, task, done, total, desc):
        """Show a task's progress (called from the worker thread, at most every PROGRESS_EVERY s)."""
        if task.finished:
            return
        self._task = task
        elapsed = time.monotonic() - task.started
        left = f", about {_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
        with self.hold_sync():
            self.progress_bar.value = done / total if total else 0
            self.progress_text.value = (f'<span class="gd-progress-text">{html.escape(desc)}: '
                                        f'{done}/{total}{left}</span>')
            self.progress_line.layout.display = "flex"

    def _progress_done(self, task):
        if self._task is task:
            self._task = None
            self.progress_line.layout.display = "none"

    # -- static pictures, for notebooks read without a kernel or saved widget state -------------
    def snapshot_png(self, timeout: float = SNAPSHOT_WAIT) -> bytes | None:
        """PNG of what the view shows now (its images, laid out like the view), after the
        render in flight; None before anything was rendered."""
        if not any(w.on_worker_thread() for w in self._lanes.values()):
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


class _Task:
    """One long job of a view: its progress reports, and whether its cancel button was pressed."""

    def __init__(self, view):
        self.view, self.cancelled, self.finished = view, False, False
        self.started = time.monotonic()
        self._shown = 0.0

    def report(self, done, total, desc):
        if self.cancelled:
            raise Cancelled(desc)
        now = time.monotonic()
        if done in (0, total) or now - self._shown >= PROGRESS_EVERY:
            self._shown = now
            self.view._progress(self, done, total, desc)

    def finish(self):
        self.finished = True
        self.view._progress_done(self)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
