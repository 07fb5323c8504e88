"""Paint objects in or out: an ipycanvas canvas over a generated image.

Each stroke is a region at image resolution; on mouse-up it becomes an insertion ("draw") or an
ablation ("erase") of the chosen concept's top units at the chosen layer, inside that region, and
the image re-renders.  The strokes live in Python (the canvas is only a view of them), so the
canvas is repainted whenever a client connects, and undo/reset/export work on the real state.
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as W
import numpy as np
from ipycanvas import MultiCanvas, hold_canvas

from gandissect_widgets.engine.io import atomic_write_bytes
from gandissect_widgets.widgets.base import View, image_widget, strength_slider
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
    def __init__(self, session, sample: int = 0, scale: int = 4, units: int = 10, layer: str | None = None):
        s = session
        d = s._need_dissection()
        layer = layer if layer is not None else s.layer
        if layer is not None and layer not in d.layers:
            raise ValueError(f"layer {layer!r} was not dissected; dissected layers: {', '.join(d.layers)}")
        self.scale = scale
        self.sample = W.BoundedIntText(value=sample, min=0, max=10 ** 6, description="sample",
                                       layout=W.Layout(width="160px"))
        self.concept = W.Dropdown(options=s.concepts(), value=s.concept or s.concepts()[0], description="concept",
                                  layout=W.Layout(width="220px"))
        self.layer = W.Dropdown(options=d.layers, value=layer if layer in d.layers else d.layers[0],
                                description="layer", layout=W.Layout(width="180px"))
        self.mode = W.ToggleButtons(options=["draw", "erase"], value="draw",
                                    tooltips=["insert the concept here", "remove the concept here"])
        self.brush = W.IntSlider(value=4, min=1, max=16, description="brush", continuous_update=False)
        self.units = W.IntSlider(value=units, min=1, max=min(50, s.n_units(self.layer.value)), description="units",
                                 continuous_update=False, tooltip="the concept's top units by IoU")
        self.strength = strength_slider(s)
        self.undo_btn = W.Button(description="undo", icon="undo")
        self.reset_btn = W.Button(description="reset", icon="trash")
        self.export_path = W.Text(value="painted.png", layout=W.Layout(width="180px"))
        self.export_btn = W.Button(description="export PNG", icon="download")
        self.result = image_widget()  # saved in widget state: the last result survives export/reload
        self.strokes: list[Stroke] = []
        self._current: list | None = None
        self._image = None  # last rendered uint8 (H,W,3)
        x = s.images([sample])
        H, W_ = x.shape[1:3]
        self.size = (H, W_)
        self.canvas = MultiCanvas(2, width=W_ * scale, height=H * scale)
        self.canvas.layout.width = f"{W_ * scale}px"
        self.canvas.layout.height = f"{H * scale}px"
        controls = W.VBox([self.sample, self.concept, self.layer, self.mode, self.brush, self.units, self.strength,
                           W.HBox([self.undo_btn, self.reset_btn]), W.HBox([self.export_path, self.export_btn])])
        super().__init__(session, [W.HBox([self.canvas, controls, W.VBox([W.HTML("<b>result</b>"), self.result])])])
        self.add_class("gd-paint")
        self.canvas.add_class("gd-paint-canvas")
        self.result.add_class("gd-paint-result")
        top = self.canvas[1]
        top.on_mouse_down(self.safely(self.mouse_down))
        top.on_mouse_move(self.safely(self.mouse_move))
        top.on_mouse_up(self.safely(self.mouse_up))
        top.on_mouse_out(self.safely(self.mouse_up))
        self.canvas.on_client_ready(self.safely(self.repaint))
        self.undo_btn.on_click(self.safely(lambda b: self.undo()))
        self.reset_btn.on_click(self.safely(lambda b: self.reset()))
        self.export_btn.on_click(self.safely(lambda b: self.export(self.export_path.value)))
        self.sample.observe(self.safely(lambda ch: self.reset()), names="value")
        self.concept.observe(self.safely(lambda ch: s.update(concept=ch["new"])), names="value")
        self.strength.observe(self.safely(lambda ch: s.update(strength=ch["new"])), names="value")
        s.observe(self._session_changed, names=["strength"])
        self._show(x[0])

    def _session_changed(self, name, old, new):
        self.strength.value = new
        if any(st.mode == "draw" for st in self.strokes):  # insertions depend on it
            self.rerender()

    # -- events (canvas pixels) ----------------------------------------------------------------
    def _image_xy(self, x, y):
        return x / self.scale, y / self.scale

    def mouse_down(self, x, y):
        self._current = [self._image_xy(x, y)]
        self._dab(x, y)

    def mouse_move(self, x, y):
        if self._current is not None:
            self._current.append(self._image_xy(x, y))
            self._dab(x, y)

    def mouse_up(self, x, y):
        if self._current is None:
            return
        pts, self._current = self._current, None
        mask = disc_mask(self.size, pts, self.brush.value)
        s = self.session
        units = tuple(s.top_units(self.layer.value, self.concept.value, self.units.value))
        self.strokes.append(Stroke(self.mode.value, self.concept.value, self.layer.value, units, mask))
        self.rerender()

    def _dab(self, x, y):
        top = self.canvas[1]
        top.fill_style = "rgba({},{},{},{})".format(*OVERLAY[self.mode.value][:3], OVERLAY[self.mode.value][3] / 255)
        top.fill_circle(x, y, self.brush.value * self.scale)

    # -- state ---------------------------------------------------------------------------------
    def interventions(self):
        s = self.session
        return [s.intervention(st.layer, st.units, MODES[st.mode], st.concept, region=st.mask) for st in self.strokes]

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
        sample, ivs = self.sample.value, self.interventions()
        self.run(lambda: self.session.images([sample], ivs)[0], self._show)

    def _show(self, img):
        self._image = img
        self.result.value = encode_image(img, "png", self.scale)
        self.repaint()

    def repaint(self, *_):
        if self._image is None:
            return
        with hold_canvas():
            self.canvas[0].put_image_data(enlarge(self._image, self.scale), 0, 0)
            self.canvas[1].clear()
            overlay = self.mask_rgba()
            if overlay[..., 3].any():
                self.canvas[1].put_image_data(enlarge(overlay, self.scale), 0, 0)

    def export(self, path: str):
        """Write the current result as a PNG (at display scale)."""
        if self._image is None:
            raise ValueError("nothing rendered yet")
        atomic_write_bytes(path, encode_image(self._image, "png", self.scale))
        self.status.value = f"wrote {path}"
        return path
