"""Unit browser: a grid of a layer's units with their top samples masked, and a unit's detail."""
from __future__ import annotations

import ipywidgets as W
import numpy as np

from gandissect_widgets.engine.imaging import heatmap, overlay_mask, strip
from gandissect_widgets.report.figures import unit_histogram_figure, unit_iou_figure
from gandissect_widgets.widgets.base import View, image_widget
from gandissect_widgets.widgets.encode import encode_image, figure_png

__all__ = ["UnitBrowser"]

ALL = "(all concepts)"


class UnitBrowser(View):
    """Cards of units (top samples with the unit's mask at the dissection threshold, label, IoU);
    sort by unit, IoU or concept, filter by concept; a click shows the unit's detail."""

    def __init__(self, session, per_page: int = 12, samples_per_unit: int = 4, scale: int = 2):
        self.per_page, self.k, self.scale = per_page, samples_per_unit, scale
        s = session
        d = s._need_dissection()
        self.layer = W.Dropdown(options=d.layers, value=s.layer if s.layer in d.layers else d.layers[0],
                                description="layer", layout=W.Layout(width="180px"))
        self.sort = W.Dropdown(options=[("unit", "unit"), ("IoU", "iou"), ("concept", "concept")], value="iou",
                               description="sort by", layout=W.Layout(width="170px"))
        self.filter = W.Dropdown(options=[ALL] + s.concepts(), value=ALL, description="concept",
                                 layout=W.Layout(width="220px"))
        self.interp_only = W.Checkbox(value=False, description="interpretable only", indent=False)
        self.page = W.IntSlider(value=0, min=0, max=0, description="page", continuous_update=False,
                                layout=W.Layout(width="260px"))
        self.grid = W.GridBox(layout=W.Layout(grid_template_columns="repeat(3, max-content)", grid_gap="6px"))
        self.detail_title = W.HTML()
        self.detail_iou = image_widget()
        self.detail_hist = image_widget()
        self.detail_samples = image_widget()
        self.detail_heat = image_widget()
        self.detail = W.VBox([self.detail_title, W.HBox([self.detail_iou, self.detail_hist]),
                              W.HTML("<b>top samples</b> (mask at the dissection threshold)"), self.detail_samples,
                              W.HTML("<b>activation heatmaps</b>"), self.detail_heat],
                             layout=W.Layout(border="1px solid #ddd", padding="4px", min_width="380px"))
        self.cards: dict[int, W.VBox] = {}
        self.add_class("gd-browser")
        controls = W.HBox([self.layer, self.sort, self.filter, self.interp_only, self.page])
        super().__init__(session, [controls, W.HBox([self.grid, self.detail])])
        for w in (self.layer, self.sort, self.filter, self.interp_only):
            w.observe(self.safely(self._controls_changed), names="value")
        self.page.observe(self.safely(lambda ch: self.refresh()), names="value")
        s.observe(self._session_changed, names=["layer", "unit", "dissection"])
        self.refresh()
        if s.unit is not None:
            self.show_unit(s.unit)

    # -- ordering ------------------------------------------------------------------------------
    def order(self) -> list[int]:
        """Units of the current layer in display order, after filtering."""
        d, L = self.session.dissection, self.layer.value
        ids, ious = d.unit_label_ids(L), d.unit_ious(L)
        units = np.arange(len(ious))
        if self.filter.value != ALL:
            units = units[ids == d.concept_index(self.filter.value)]
        if self.interp_only.value:
            units = units[ious[units] > 0.04]
        if self.sort.value == "iou":
            units = units[np.argsort(-ious[units], kind="stable")]
        elif self.sort.value == "concept":
            names = np.array(d.labels, dtype=object)[ids[units]]
            units = units[np.lexsort((-ious[units], names))]
        return [int(u) for u in units]

    def _controls_changed(self, change):
        if change["owner"] is self.layer:
            self.session.update(layer=self.layer.value)
        self.page.value = 0
        self.refresh()

    def _session_changed(self, name, old, new):
        if name == "layer" and new in self.session.dissection.layers and new != self.layer.value:
            self.layer.value = new
        elif name == "unit" and new is not None:
            self.show_unit(new)
        elif name == "dissection":
            self.refresh()

    # -- rendering -----------------------------------------------------------------------------
    def refresh(self):
        units = self.order()
        pages = max(1, -(-len(units) // self.per_page))
        self.page.max = pages - 1
        shown = units[self.page.value * self.per_page:(self.page.value + 1) * self.per_page]
        layer = self.layer.value
        self.run(lambda: self._cards(layer, shown), self._set_cards)

    def _cards(self, layer, units):
        s = self.session
        d = s.dissection
        gallery = s.unit_gallery(layer, units, self.k)
        labels, ious = d.unit_labels(layer), d.unit_ious(layer)
        out = []
        for u in units:
            imgs, masks, _ = gallery[u]
            pic = strip(overlay_mask(imgs, masks))
            out.append((u, encode_image(pic, "png", self.scale), f"#{u} {labels[u]} {ious[u]:.2f}"))
        return out

    def _set_cards(self, cards):
        children = []
        self.cards = {}
        for u, png, text in cards:
            img = W.Image(value=png, format="png")
            btn = W.Button(description=text, tooltip=f"show unit {u}", layout=W.Layout(width="auto"))
            btn.on_click(self.safely(lambda b, u=u: self.session.update(unit=u)))
            card = W.VBox([img, btn])
            card.add_class("gd-unit-card")
            self.cards[u] = card
            children.append(card)
        self.grid.children = children

    def click(self, unit: int):
        """What a click on a unit's card does (also for tests and scripts)."""
        self.session.update(unit=int(unit))

    def show_unit(self, unit: int):
        layer = self.layer.value
        self.run(lambda: self._detail(layer, unit), self._set_detail)

    def _detail(self, layer, unit):
        s = self.session
        d = s.dissection
        imgs, masks, all_maps = s.unit_gallery(layer, [unit], 20)[unit]  # one render for both views
        imgs, masks, maps = imgs[:8], masks[:8], all_maps[:8]
        iou_png = figure_png(unit_iou_figure(d, layer, unit))
        hist_png = figure_png(unit_histogram_figure(all_maps.reshape(-1), float(d.thresholds(layer)[unit]), unit))
        samples_png = encode_image(strip(overlay_mask(imgs, masks)), "png", self.scale)
        lo, hi = float(maps.min()), float(maps.max())
        heat_png = encode_image(strip(np.stack([heatmap(m, lo, hi) for m in maps])), "png", self.scale)
        title = (f"<b>{layer} unit {unit}</b>: {d.unit_labels(layer)[unit]} (IoU {d.unit_ious(layer)[unit]:.3f}); "
                 f"threshold {d.thresholds(layer)[unit]:.3g}")
        return title, iou_png, hist_png, samples_png, heat_png

    def _set_detail(self, parts):
        title, iou_png, hist_png, samples_png, heat_png = parts
        with self.hold_sync():
            self.detail_title.value = title
            self.detail_iou.value = iou_png
            self.detail_hist.value = hist_png
            self.detail_samples.value = samples_png
            self.detail_heat.value = heat_png
