"""Layer summary: interpretable units per concept per layer, for one dissection or two side by side
(one y range and one concept colour map for both, so the charts compare).  The charts are drawn
for the light and the dark theme alike, in the same colours: a concept has one colour in both."""
from __future__ import annotations

import html

import ipywidgets as W

from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU
from gandissect_widgets.report.figures import interpretable_units_figures
from gandissect_widgets.widgets.base import Chart, View, caption, row
from gandissect_widgets.widgets.encode import drawing, figure_pngs

__all__ = ["LayerSummary"]


class LayerSummary(View):
    """``LayerSummary(session)`` or ``LayerSummary(session, other=dissection_b, names=("A", "B"))``."""

    def __init__(self, session, other=None, names=("this model", "other")):
        self.other, self.names = other, names
        self.min_iou = W.FloatSlider(value=DEFAULT_MIN_IOU, min=0.0, max=0.3, step=0.01, description="min IoU",
                                     continuous_update=False, readout_format=".2f", layout=W.Layout(width="320px"))
        self.left, self.right = Chart(), Chart()  # a light and a dark theme's copy each
        self.ylims = []  # the charts' y limits (shared), as drawn
        self.table = W.HTML()
        panes = [W.VBox([caption(names[0]), self.left])]
        if other is not None:
            panes.append(W.VBox([caption(names[1]), self.right]))
        super().__init__(session, [self.min_iou, row(panes), self.table])
        self.add_class("gd-summary")
        session._need_dissection()
        self.min_iou.observe(self.safely(lambda ch: self.refresh()), names="value")
        session.observe(lambda *a: self.refresh(), names=["dissection"])
        self.refresh()

    def refresh(self):
        """Redraw the charts and the table, off the comm thread."""
        d = self.session._need_dissection()
        m = self.min_iou.value
        rows = [(self.names[0], d)] + ([(self.names[1], self.other)] if self.other is not None else [])
        self.run(lambda: self._draw(rows, m), self._show)

    def _draw(self, rows, m):
        with drawing():  # the figures made and drawn under one lock
            figs = interpretable_units_figures([dd for _, dd in rows], min_iou=m)
            return [f.axes[0].get_ylim() for f in figs], [figure_pngs(f) for f in figs], self._table(rows, m)

    def _show(self, parts):
        self.ylims, pngs, table = parts
        with self.hold_sync():
            for image, png in zip((self.left, self.right), pngs):
                image.value = png
            self.table.value = table

    @staticmethod
    def _table(rows, m):
        head = "<tr><th>model</th><th>layer</th><th>interpretable</th><th>concepts</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{html.escape(l)}</td><td>{int(dd.interpretable(l, m).sum())}/"
            f"{len(dd.thresholds(l))}</td><td>{len(dd.concept_counts(l, m))}</td></tr>"
            for n, dd in rows for l in dd.layers)
        return f"<table style='font-size:12px'>{head}{body}</table>"
