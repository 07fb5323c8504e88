"""Unit browser: a grid of a layer's units with their top samples masked, and a unit's detail."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from gandissect_widgets.engine.imaging import grid, heatmap, overlay_mask, strip
from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU, descending, descending_within
from gandissect_widgets.report.figures import heatmap_colorbar_figure, unit_histogram_figure, unit_iou_figure
from gandissect_widgets.widgets.base import Chart, View, caption, image_widget, pixels, row
from gandissect_widgets.widgets.encode import drawn, encode_image

__all__ = ["UnitBrowser"]

ALL = "(all concepts)"
DETAIL_COLUMNS = 4  # the detail's samples and heat maps, in rows of this many


class UnitBrowser(View):
    """Cards of units (top samples with the unit's mask at the dissection threshold, label, IoU);
    sort by unit, IoU or concept, filter by concept; a click shows the unit's detail.  The grid
    holds as many columns of cards as fit, and the detail goes below it when they do not fit
    beside each other; cards are made once and reused from page to page."""

    def __init__(self, session, per_page: int = 12, samples_per_unit: int = 4, scale: int = 2):
        self.per_page, self.k, self.scale = per_page, samples_per_unit, scale
        s = session
        d = s._need_dissection()
        self.layer = W.Dropdown(options=d.layers, value=s.layer if s.layer in d.layers else d.layers[0],
                                description="layer", layout=W.Layout(width="200px"))
        self.sort = W.Dropdown(options=[("unit", "unit"), ("IoU", "iou"), ("concept", "concept")], value="iou",
                               description="sort by", layout=W.Layout(width="190px"))
        self.filter = W.Dropdown(options=[ALL] + s.concepts(), value=ALL, description="concept",
                                 layout=W.Layout(width="240px"))
        self.interp_only = W.Checkbox(value=False, description="interpretable only", indent=False,
                                      layout=W.Layout(width="auto"))
        self.page = W.IntSlider(value=0, min=0, max=0, description="page", continuous_update=False,
                                layout=W.Layout(width="280px"))
        size = self._sample_size(s)
        self.card_width = samples_per_unit * size[0] * scale + (samples_per_unit - 1) * 2 * scale + 8
        self.grid = W.GridBox(layout=W.Layout(grid_template_columns=f"repeat(auto-fill, {self.card_width}px)",
                                              grid_gap="6px", flex=f"1 1 {self.card_width}px",
                                              min_width=f"{self.card_width}px"))
        self.detail_title = W.HTML()
        self.detail_iou, self.detail_hist = Chart(), Chart()  # a light and a dark theme's copy each
        self.detail_samples = image_widget()
        self.detail_heat = image_widget()
        self.detail_key = Chart("gd-key")  # a key to the heat maps
        side = DETAIL_COLUMNS * size[0] * scale + (DETAIL_COLUMNS - 1) * 2 * scale
        self.detail = W.VBox([self.detail_title, row([self.detail_iou, self.detail_hist]),
                              caption("top samples (mask at the dissection threshold)"), self.detail_samples,
                              caption("activation heat maps (one scale for all)"), self.detail_heat,
                              self.detail_key],
                             layout=W.Layout(width=f"{side + 12}px", flex="none"))
        self.detail.add_class("gd-panel")
        self.detail.layout.display = "none"  # until a unit is shown: no empty pictures
        self.cards: dict[int, W.VBox] = {}
        self._pool: list[tuple] = []  # (card, image, button): made once, reused
        self.add_class("gd-browser")
        super().__init__(session, [row([self.layer, self.sort, self.filter, self.interp_only, self.page]),
                                   row([self.grid, self.detail])])
        for w in (self.layer, self.sort, self.filter, self.interp_only):
            w.observe(self.safely(self._controls_changed), names="value")
        self.page.observe(self.safely(lambda ch: self.refresh()), names="value")
        s.observe(self._session_changed, names=["layer", "unit", "dissection"])
        self.refresh()
        if s.unit is not None:
            self.show_unit(s.unit)

    @staticmethod
    def _sample_size(s):
        d = s.dissection
        seed = int(d.settings.get("seed", 1))
        with s.lock:
            x = s.render([0], [], seed)
        return int(x.shape[-1]), int(x.shape[-2])

    # -- ordering ------------------------------------------------------------------------------
    def order(self) -> list[int]:
        """Units of the current layer in display order, after filtering."""
        d, L = self.session.dissection, self.layer.value
        ids, ious = d.unit_label_ids(L), d.unit_ious(L)
        units = np.arange(len(ious))
        if self.filter.value != ALL:
            units = units[ids == d.concept_index(self.filter.value)]
        if self.interp_only.value:
            units = units[d.interpretable(L, DEFAULT_MIN_IOU)[units]]
        if self.sort.value == "iou":
            units = units[descending(ious[units])]
        elif self.sort.value == "concept":
            units = units[descending_within(np.array(d.labels, dtype=object)[ids[units]], ious[units])]
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
            pic = strip(overlay_mask(imgs, masks), fill=None)  # transparent gaps: the card shows through
            out.append((u, encode_image(pic, "png", self.scale), f"unit {u}: {labels[u]} (IoU {ious[u]:.3f})",
                        pic.shape[1] * self.scale, pic.shape[0] * self.scale))
        return out

    def _set_cards(self, cards):
        while len(self._pool) < len(cards):
            img = image_widget()
            btn = W.Button(layout=W.Layout(width="100%"))
            card = W.VBox([img, btn], layout=W.Layout(width=f"{self.card_width}px"))
            card.add_class("gd-unit-card")
            btn.on_click(self.safely(lambda b, card=card: self.click(card.unit)))
            self._pool.append((card, img, btn))
        self.cards = {}
        with self.hold_sync():
            for i, (card, img, btn) in enumerate(self._pool):
                if i < len(cards):
                    u, png, text, w, h = cards[i]
                    card.unit = u
                    pixels(img, w, h)
                    img.value, btn.description, btn.tooltip = png, text, f"show unit {u}"
                    card.layout.display = None
                    self.cards[u] = card
                else:
                    card.unit, card.layout.display = None, "none"
            if len(self.grid.children) != len(self._pool):
                self.grid.children = [c[0] for c in self._pool]

    def visible_cards(self) -> list:
        """The cards shown, in order."""
        return [c for c, _, _ in self._pool if c.layout.display != "none"]

    def click(self, unit: int):
        """What a click on a unit's card does (also for tests and scripts)."""
        self.session.update(unit=int(unit))

    def show_unit(self, unit: int):
        layer = self.layer.value
        self.run(lambda: self._detail(layer, unit), self._set_detail, lane="detail")

    def _detail(self, layer, unit):
        s = self.session
        d = s.dissection
        imgs, masks, all_maps = s.unit_gallery(layer, [unit], 20)[unit]  # one render for both views
        n = 2 * DETAIL_COLUMNS
        imgs, masks, maps = imgs[:n], masks[:n], all_maps[:n]
        iou_png = drawn(unit_iou_figure, d, layer, unit)
        hist_png = drawn(unit_histogram_figure, all_maps.reshape(-1), float(d.thresholds(layer)[unit]), unit)
        samples = grid(overlay_mask(imgs, masks), cols=DETAIL_COLUMNS, fill=None)
        lo, hi = float(maps.min()), float(maps.max())
        heat = grid(np.stack([heatmap(m, lo, hi) for m in maps]), cols=DETAIL_COLUMNS, fill=None)
        key_png = drawn(heatmap_colorbar_figure, lo, hi, f"activation of unit {unit}")
        title = (f"<b>{html.escape(layer)} unit {unit}</b>: {html.escape(d.unit_labels(layer)[unit])}, "
                 f"{html.escape(d.describe_unit(layer, unit))}; threshold {d.thresholds(layer)[unit]:.3g}")
        size = (samples.shape[1] * self.scale, samples.shape[0] * self.scale)
        return (title, iou_png, hist_png, encode_image(samples, "png", self.scale),
                encode_image(heat, "png", self.scale), key_png, size)

    def _set_detail(self, parts):
        title, iou_png, hist_png, samples_png, heat_png, key_png, size = parts
        with self.hold_sync():
            self.detail_title.value = title
            self.detail_iou.value = iou_png
            self.detail_hist.value = hist_png
            pixels(self.detail_samples, *size)
            pixels(self.detail_heat, *size)
            self.detail_samples.value = samples_png
            self.detail_heat.value = heat_png
            self.detail_key.value = key_png
            self.detail.layout.display = None


