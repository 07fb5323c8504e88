"""Paint objects in or out: an ipycanvas canvas over a generated image.

Each stroke is a region at image resolution; on mouse-up it becomes an insertion ("draw") or an
ablation ("erase") of a concept's top units at a layer, inside that region, and the image
re-renders.  A stroke takes its mode, concept, layer and unit count when it starts, and keeps them.
The strokes live in Python (the canvas is only a view of them), so the canvas is repainted
whenever a client connects, and undo/reset/export work on the real state.  The picture itself is
an image widget under a transparent canvas: a notebook saved with its widget state shows it again.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as W
import numpy as np
from ipycanvas import Canvas, hold_canvas

from gandissect_widgets.engine.io import atomic_write_bytes
from gandissect_widgets.widgets.base import (ChoiceButtons, View, caption, image_widget, in_browser_order, pixels, row,
                                             strength_slider)
from gandissect_widgets.widgets.encode import encode_image, enlarge

__all__ = ["PaintWidget", "Stroke"]

MODES = {"draw": "insert", "erase": "ablate"}
OVERLAY = {"draw": (0, 200, 255, 110), "erase": (255, 40, 40, 110)}


@dataclass
class Stroke:
    mode: str          # "draw" (insert the concept) or "erase" (remove it)
    concept: str
    layer: str
    units: tuple
    mask: np.ndarray   # (H,W) bool at image resolution


def disc_mask(shape, points, radius) -> np.ndarray:
    """Pixels within ``radius`` of the polyline through ``points`` (image coordinates)."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    m = np.zeros(shape, dtype=bool)
    pts = list(points)
    if len(pts) == 1:
        pts = pts * 2
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        steps = max(1, int(np.ceil(np.hypot(x1 - x0, y1 - y0))))
        for t in np.linspace(0, 1, steps + 1):
            cx, cy = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            m |= (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius ** 2
    return m


class PaintWidget(View):
    """Draw a concept in, or erase it, on generated sample ``sample`` (``layer``: where its units
    are switched; default the session's layer).  The brush's concept is the widget's own: painting
    with another concept does not change what the other views show."""

    def __init__(self, session, sample: int = 0, scale: int = 4, units: int = 10, layer: str | None = None):
        s = session
        d = s._need_dissection()
        layer = layer if layer is not None else s.layer
        if layer is not None and layer not in d.layers:
            raise ValueError(f"layer {layer!r} was not dissected; dissected layers: {', '.join(d.layers)}")
        self.scale = scale
        wide = W.Layout(width="300px")
        self.sample = W.BoundedIntText(value=sample, min=0, max=10 ** 6, description="sample",
                                       layout=W.Layout(width="180px"))
        self.concept = W.Dropdown(options=s.concepts(), value=s.concept or s.concepts()[0], description="concept",
                                  layout=wide)
        self.layer = W.Dropdown(options=d.layers, value=layer if layer in d.layers else d.layers[0],
                                description="layer", layout=wide)
        self.mode = ChoiceButtons(["draw", "erase"], "draw", tooltips=["insert the concept here",
                                                                       "remove the concept here"])
        self.brush = W.IntSlider(value=4, min=1, max=16, description="brush", continuous_update=False, layout=wide)
        self.units = W.IntSlider(value=units, min=1, max=min(50, s.n_units(self.layer.value)), description="units",
                                 continuous_update=False, tooltip="the concept's top units by IoU", layout=wide)
        self.strength = strength_slider(s)
        self.strength.layout = W.Layout(width="300px")
        self.undo_btn = W.Button(description="undo", icon="undo", layout=W.Layout(width="auto"))
        self.reset_btn = W.Button(description="reset", icon="trash", layout=W.Layout(width="auto"))
        self.export_path = W.Text(value="painted.png", layout=W.Layout(width="160px"))
        self.export_btn = W.Button(description="export PNG", icon="download", layout=W.Layout(width="auto"))
        self.strokes: list[Stroke] = []
        self._current = None  # (points, mode, concept, layer, units, brush) of the stroke being drawn
        self._image = None  # last rendered uint8 (H,W,3)
        x = s.images([sample])
        H, W_ = x.shape[1:3]
        self.size = (H, W_)
        # the picture (saved with the widget state) under a transparent canvas for the strokes
        self.picture = pixels(image_widget(), W_ * scale, H * scale)
        self.canvas = pixels(Canvas(width=W_ * scale, height=H * scale), W_ * scale, H * scale)
        self.picture.layout.grid_area = "cell"
        self.canvas.layout.grid_area = "cell"
        board = W.GridBox([self.picture, self.canvas],
                          layout=W.Layout(grid_template_areas='"cell"', width=f"{W_ * scale}px"))
        board.add_class("gd-fixed")
        self.result = pixels(image_widget(), W_ * scale, H * scale)  # the last result, also when exported
        controls = W.VBox([self.sample, self.concept, self.layer, self.mode, self.brush, self.units, self.strength,
                           W.HBox([self.undo_btn, self.reset_btn]), W.HBox([self.export_path, self.export_btn])],
                          layout=W.Layout(width="310px"))
        super().__init__(session, [row([W.VBox([caption("paint here"), board]), controls,
                                        W.VBox([caption("result"), self.result])])])
        self.add_class("gd-paint")
        self.canvas.add_class("gd-paint-canvas")
        self.picture.add_class("gd-paint-picture")
        self.result.add_class("gd-paint-result")
        c = self.canvas
        in_browser_order(c)  # strokes in order with the mode buttons' clicks (see in_browser_order)
        c.on_mouse_down(self.safely(self.mouse_down))
        c.on_mouse_move(self.safely(self.mouse_move))
        c.on_mouse_up(self.safely(self.mouse_up))
        c.on_mouse_out(self.safely(self.mouse_up))
        c.on_client_ready(self.safely(self.repaint))
        self.undo_btn.on_click(self.safely(lambda b: self.undo()))
        self.reset_btn.on_click(self.safely(lambda b: self.reset()))
        self.export_btn.on_click(self.safely(lambda b: self.export(self.export_path.value)))
        self.sample.observe(self.safely(lambda ch: self.reset()), names="value")
        self.layer.observe(self.safely(self._layer_changed), names="value")
        self.strength.observe(self.safely(lambda ch: s.update(strength=ch["new"])), names="value")
        s.observe(self._session_changed, names=["strength"])
        self._show(x[0])

    def _session_changed(self, name, old, new):
        self.strength.value = new
        if any(st.mode == "draw" for st in self.strokes):  # insertions depend on it
            self.rerender()

    def _layer_changed(self, ch):
        self.units.max = min(50, self.session.n_units(ch["new"]))

    # -- events (canvas pixels) ----------------------------------------------------------------
    def _image_xy(self, x, y):
        return x / self.scale, y / self.scale

    def mouse_down(self, x, y):
        """A stroke starts: it takes the brush as it is now (mode, concept, layer, units, size)."""
        self._current = ([self._image_xy(x, y)], self.mode.value, self.concept.value, self.layer.value,
                         self.units.value, self.brush.value)
        self._dab(x, y)

    def mouse_move(self, x, y):
        if self._current is not None:
            self._current[0].append(self._image_xy(x, y))
            self._dab(x, y)

    def mouse_up(self, x, y):
        if self._current is None:
            return
        (pts, mode, concept, layer, n, brush), self._current = self._current, None
        units = tuple(self.session.top_units(layer, concept, n))
        self.strokes.append(Stroke(mode, concept, layer, units, disc_mask(self.size, pts, brush)))
        self.rerender()

    def _dab(self, x, y):
        mode, brush = self._current[1], self._current[5]
        self.canvas.fill_style = "rgba({},{},{},{})".format(*OVERLAY[mode][:3], OVERLAY[mode][3] / 255)
        self.canvas.fill_circle(x, y, brush * self.scale)

    # -- state ---------------------------------------------------------------------------------
    def interventions(self, strokes=None, progress=False):
        """The strokes (default: all so far) as interventions; the first insertion at a layer
        computes its insertion values, so this runs off the comm thread, with ``progress``."""
        s = self.session
        return [s.intervention(st.layer, st.units, MODES[st.mode], st.concept, region=st.mask, progress=progress)
                for st in (self.strokes if strokes is None else strokes)]

    def undo(self):
        if self.strokes:
            self.strokes.pop()
        self.rerender()

    def reset(self):
        self.strokes = []
        self.rerender()

    def mask_rgba(self) -> np.ndarray:
        """The strokes as an RGBA overlay (H,W,4), later strokes on top."""
        out = np.zeros(self.size + (4,), dtype=np.uint8)
        for st in self.strokes:
            out[st.mask] = OVERLAY[st.mode]
        return out

    def rerender(self):
        sample, strokes = self.sample.value, list(self.strokes)

        def job(report):
            return self.session.images([sample], self.interventions(strokes, report))[0]
        self.run(job, self._show, progress=True)

    def _show(self, img):
        self._image = img
        png = encode_image(img, "png", self.scale)
        with self.hold_sync():
            self.picture.value = png
            self.result.value = png
        self.repaint()

    def repaint(self, *_):
        if self._image is None:
            return
        overlay = self.mask_rgba()
        with hold_canvas():
            self.canvas.clear()
            if overlay[..., 3].any():
                self.canvas.put_image_data(enlarge(overlay, self.scale), 0, 0)

    def export(self, path: str):
        """Write the current result as a PNG (at display scale)."""
        if self._image is None:
            raise ValueError("nothing rendered yet")
        atomic_write_bytes(path, encode_image(self._image, "png", self.scale))
        self.status.value = f"wrote {html.escape(str(path))}"
        return path

