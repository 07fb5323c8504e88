"""IoU ranking: for a concept, the units ranked by IoU (or by ACE where computed); pick the
top-k or click units, and send the choice to the ablation panel (the session's selection)."""
from __future__ import annotations

import ipywidgets as W
import numpy as np

from gandissect_widgets.engine.readout import descending
from gandissect_widgets.report.figures import ranking_figure
from gandissect_widgets.widgets.base import Chart, View, row
from gandissect_widgets.widgets.encode import drawn

__all__ = ["IouRanking", "ACE_SCOPES"]

# what "compute ACE" measures: (units, samples); quick answers in seconds on the default world
ACE_SCOPES = {"quick": (20, 8), "full": (None, 32)}


class IouRanking(View):
    def __init__(self, session, shown: int = 40):
        s = session
        d = s._need_dissection()
        self.shown = shown
        self.concept = W.Dropdown(options=s.concepts(), value=s.concept or s.concepts()[0], description="concept",
                                  layout=W.Layout(width="240px"))
        self.layer = W.Dropdown(options=d.layers, value=s.layer if s.layer in d.layers else d.layers[0],
                                description="layer", layout=W.Layout(width="200px"))
        self.metric = W.ToggleButtons(options=["IoU", "ACE"], value="IoU", style={"button_width": "60px"})
        self.ace_scope = W.Dropdown(options=[("ACE of the top 20 units by IoU, 8 samples (seconds)", "quick"),
                                             ("ACE of every unit, 32 samples (minutes)", "full")],
                                    value="quick", layout=W.Layout(width="370px"))
        self.compute_ace = W.Button(description="compute ACE", icon="play", layout=W.Layout(width="auto"),
                                    tooltip="single-unit ACE: each unit inserted alone minus ablated alone")
        self.topk = W.IntSlider(value=10, min=1, max=min(50, s.n_units(self.layer.value)), description="top-k",
                                continuous_update=False, layout=W.Layout(width="340px"))
        self.units = W.SelectMultiple(options=[], rows=12, description="units", layout=W.Layout(width="340px"))
        self.send = W.Button(description="send to ablation panel", button_style="primary",
                             layout=W.Layout(width="auto"))
        self.chart = Chart()  # a light and a dark theme's copy
        self.highlighted: frozenset = frozenset()  # the units the chart shows as selected
        super().__init__(session, [row([self.concept, self.layer, self.metric]),
                                   row([self.ace_scope, self.compute_ace]),
                                   row([W.VBox([self.topk, self.units, self.send]), self.chart])])
        self.add_class("gd-ranking")
        self.concept.observe(self.safely(self._concept_changed), names="value")
        self.layer.observe(self.safely(self._layer_changed), names="value")
        self.metric.observe(self.safely(lambda ch: self.refresh()), names="value")
        self.topk.observe(self.safely(lambda ch: self.select_top(ch["new"])), names="value")
        self._refreshing = False
        self.units.observe(self.safely(lambda ch: self._refreshing or self._draw()), names="value")
        self.send.on_click(self.safely(lambda b: self.send_selection()))
        self.compute_ace.on_click(self.safely(lambda b: self.run_ace()))
        s.observe(self._session_changed, names=["concept", "layer", "ace"])
        self.refresh()

    def scores(self) -> np.ndarray:
        """(U,) the current metric of every unit (NaN where ACE was not measured)."""
        s, L = self.session, self.layer.value
        if self.metric.value == "ACE":
            key = (L, self.concept.value)
            if key not in s.ace:
                raise ValueError(f"no ACE computed for {self.concept.value} at {L} yet: press 'compute ACE'")
            return np.asarray(s.ace[key], dtype=float)
        return s.dissection.iou(L)[:, s.dissection.concept_index(self.concept.value)]

    def ranked(self) -> list[int]:
        """Units by the metric, best first; units without a score are left out."""
        sc = self.scores()
        return [int(u) for u in descending(sc) if np.isfinite(sc[u])]

    def refresh(self):
        try:
            sc = self.scores()
        except ValueError as e:
            self._show_error(e)
            return
        self.clear_error()
        order = self.ranked()
        self._refreshing = True  # one chart for the whole refresh, not one per list change
        try:
            with self.hold_trait_notifications():
                self.units.options = [(f"unit {u:>4}  {self.metric.value} {sc[u]:.3f}", u)
                                      for u in order[:max(self.shown, 50)]]
                self.topk.max = max(1, min(50, len(order)))
            self.select_top(self.topk.value)
        finally:
            self._refreshing = False
        self._draw()  # also when the selection came out the same as before

    def select_top(self, k: int):
        self.units.value = tuple(self.ranked()[:k])

    def chosen(self) -> tuple:
        return tuple(self.units.value)

    def _draw(self):
        """Redraw the chart off the comm thread (matplotlib takes a few tenths of a second)."""
        try:
            sc = self.scores()
        except ValueError:
            return
        order = self.ranked()[:self.shown]
        selected, concept, metric = frozenset(self.units.value), self.concept.value, self.metric.value

        def shown(png):
            self.chart.value = png
            self.highlighted = selected
        self.run(lambda: drawn(ranking_figure, sc, order, set(selected), concept, metric), shown, lane="chart")

    def send_selection(self):
        s = self.session
        s.update(layer=self.layer.value, concept=self.concept.value, selection=self.chosen())

    def run_ace(self, scope: str | None = None):
        """Single-unit ACE of the units ``ace_scope`` names (shown with progress; cancel stops it)."""
        s, L, c = self.session, self.layer.value, self.concept.value
        top, n = ACE_SCOPES[scope or self.ace_scope.value]
        units = None if top is None else s.top_units(L, c, top)

        def job(report):
            return s.unit_ace(L, c, n_samples=n, units=units, progress=report)

        def done(values):
            s.update(ace={**s.ace, (L, c): values})  # the ranking refreshes with it
            self.metric.value = "ACE"
        self.run(job, done, progress=True)

    def _concept_changed(self, ch):
        self.session.update(concept=ch["new"])
        self.refresh()

    def _layer_changed(self, ch):
        self.session.update(layer=ch["new"])
        self.refresh()

    def _session_changed(self, name, old, new):
        if name == "concept" and new is not None and new != self.concept.value:
            self.concept.value = new
        elif name == "layer" and new in self.layer.options and new != self.layer.value:
            self.layer.value = new
        elif name == "ace":
            self.refresh()
