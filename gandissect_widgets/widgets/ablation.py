"""Ablation panel: samples shown as columns (original, edited, difference); toggle units and the
edited images re-render at once from cached activations.  The columns wrap onto as many lines
as the width needs, and every line starts with the names of its rows."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from gandissect_widgets.engine.imaging import difference, to_uint8
from gandissect_widgets.engine.session import parse_indices
from gandissect_widgets.report.figures import difference_colorbar_figure
from gandissect_widgets.widgets import snapshot
from gandissect_widgets.widgets.base import Chart, View, image_widget, pixels, row, strength_slider
from gandissect_widgets.widgets.encode import drawn, encode_image

__all__ = ["AblationPanel"]

ROWS = ("original", "edited", "difference")
DIFFERENCE_GAIN = 2.0  # the difference images are |original - edited| times this


class AblationPanel(View):
    """Units to switch: the session's selection.  Candidate toggles: the concept's top units by IoU
    plus whatever is selected.  Shows each sample's original, edited image and their difference,
    and the change in the concept's pixels.  Controls and pictures are made once and reused."""

    def __init__(self, session, candidates: int = 20, scale: int = 2):
        s = session
        s._need_dissection()
        self.n_candidates, self.scale = candidates, scale
        self.samples = W.Text(value=_format(s.samples), description="samples", layout=W.Layout(width="220px"))
        self.concept = W.Dropdown(options=s.concepts(), value=s.concept or s.concepts()[0], description="concept",
                                  layout=W.Layout(width="240px"))
        self.mode = W.ToggleButtons(options=[("ablate", "ablate"), ("insert", "insert")], value=s.mode,
                                    style={"button_width": "70px"})
        self.strength = strength_slider(s)
        self.topk = W.IntSlider(value=min(10, candidates), min=0, max=candidates, description="top-k",
                                continuous_update=False, layout=W.Layout(width="300px"))
        self.use_topk = W.Button(description="switch top-k", tooltip="select the concept's top-k units by IoU",
                                 layout=W.Layout(width="auto"))
        self.clear = W.Button(description="none", tooltip="switch no unit", layout=W.Layout(width="auto"))
        self.toggles = row([])
        self.columns = _Columns()
        self.scale_bar = Chart("gd-key", width="320px")  # a key, not a picture to enlarge
        self.stats = W.HTML()
        self._toggles: list[W.ToggleButton] = []  # a pool: reused when the candidates change
        self._cells: list[_Sample] = []  # a pool of sample columns
        self._syncing = False
        self._base = None  # (key, uint8 originals, presence, original PNGs)
        super().__init__(session, [row([self.samples, self.concept, self.mode, self.strength]),
                                   row([self.topk, self.use_topk, self.clear]), self.toggles, self.columns,
                                   self.scale_bar, self.stats])
        self.add_class("gd-ablation")
        self.samples.observe(self.safely(self._samples_changed), names="value")
        self.concept.observe(self.safely(lambda ch: s.update(concept=ch["new"])), names="value")
        self.mode.observe(self.safely(lambda ch: s.update(mode=ch["new"])), names="value")
        self.strength.observe(self.safely(lambda ch: s.update(strength=ch["new"])), names="value")
        self.use_topk.on_click(self.safely(lambda b: self.switch_top(self.topk.value)))
        self.clear.on_click(self.safely(lambda b: s.update(selection=())))
        s.observe(self._session_changed, names=["selection", "samples", "mode", "concept", "layer", "strength"])
        if s.concept is None:
            s.update(concept=self.concept.value)
        self.scale_bar.value = drawn(difference_colorbar_figure, DIFFERENCE_GAIN)
        self._build_toggles()
        self.refresh()

    # the pictures of sample i: self.originals[i], self.editeds[i], self.differences[i]
    def _pictures(self, row: int) -> list:
        return [c.pictures[row] for c in self._cells if c.layout.display != "none"]

    originals = property(lambda self: self._pictures(0))
    editeds = property(lambda self: self._pictures(1))
    differences = property(lambda self: self._pictures(2))

    # -- state ---------------------------------------------------------------------------------
    def candidates(self) -> list[int]:
        s = self.session
        top = s.top_units(s.layer, self.concept.value, self.n_candidates)
        return top + [u for u in s.selection if u not in top]

    def toggle(self, unit: int, on: bool | None = None):
        """Switch one unit on or off (what clicking its toggle does)."""
        sel = set(self.session.selection)
        on = (unit not in sel) if on is None else on
        sel = sel | {unit} if on else sel - {unit}
        self.session.update(selection=sorted(sel))

    def switch_top(self, k: int):
        s = self.session
        s.update(selection=s.top_units(s.layer, self.concept.value, k))

    def _samples_changed(self, ch):
        self.session.update(samples=parse_indices(ch["new"]))

    def _session_changed(self, name, old, new):
        s = self.session
        if name == "samples":
            self.samples.value = _format(new)
        elif name == "mode":
            self.mode.value = new
        elif name == "strength":
            self.strength.value = new
            if s.mode != "insert" or not s.selection:
                return  # nothing shown depends on it
        elif name == "concept" and new is not None and new != self.concept.value:
            self.concept.value = new
        if name in ("concept", "layer", "selection"):
            self._build_toggles()
        self.refresh()

    def _build_toggles(self):
        sel = set(self.session.selection)
        cands = self.candidates()
        while len(self._toggles) < len(cands):
            t = W.ToggleButton(layout=W.Layout(width="auto", min_width="48px"))
            t.add_class("gd-unit-toggle")
            t.observe(self.safely(lambda ch, t=t: self._toggled(t, ch["new"])), names="value")
            self._toggles.append(t)
        self._syncing = True
        try:
            for t, u in zip(self._toggles, cands):
                t.unit = u
                t.description, t.tooltip, t.value = str(u), f"unit {u}", u in sel
                t.layout.display = None
            for t in self._toggles[len(cands):]:
                t.unit, t.layout.display = None, "none"
        finally:
            self._syncing = False
        if len(self.toggles.children) != len(self._toggles):
            self.toggles.children = list(self._toggles)

    def _toggled(self, t, on):
        if not self._syncing and t.unit is not None:
            self.toggle(t.unit, on)

    def unit_toggles(self) -> dict:
        """{unit: its ToggleButton} of the candidates shown."""
        return {t.unit: t for t in self._toggles if t.unit is not None}

    # -- rendering -----------------------------------------------------------------------------
    def refresh(self):
        s = self.session
        layer, samples, units, mode, concept = s.layer, s.samples, tuple(s.selection), s.mode, self.concept.value
        self.run(lambda report: self.compute(layer, samples, units, mode, concept, report), self._show,
                 progress=True)

    def compute(self, layer, samples, units, mode, concept, progress=False):
        """(original PNGs, edited PNGs, difference PNGs, display size, how to count the change):
        one PNG per sample; the pictures show first, the count of the concept's pixels (a
        segmenter pass) follows as a job of its own."""
        s = self.session
        key = (layer, samples, concept)
        enc = lambda a: [encode_image(x, "png", self.scale) for x in a]
        if self._base is None or self._base[0] != key:
            x0 = s.render(samples, [])
            orig = to_uint8(x0)
            self._base = (key, orig, s.presence(x0, concept), enc(orig))
        _, orig, p0, orig_png = self._base
        if units:
            x1 = s.render(samples, [s.intervention(layer, units, mode, concept, progress=progress)])
            edited = to_uint8(x1)
            edited_png = enc(edited)
        else:
            x1, edited, edited_png = None, orig, orig_png
        H, W_ = orig.shape[1:3]
        how = f"insert (x{s.strength:g})" if mode == "insert" else mode
        count = lambda: self._stats(x1, p0, concept, f"{how} {len(units)} unit(s) of {layer}", H * W_)
        return orig_png, edited_png, enc(difference(orig, edited, DIFFERENCE_GAIN)), (W_ * self.scale, H * self.scale), count

    def _stats(self, x1, p0, concept, what, pixels_per_image):
        """The stats line: the concept's share of pixels before and after the edit."""
        p1 = p0 if x1 is None else self.session.presence(x1, concept)
        d = float(np.mean(p1 - p0))
        return (f"{html.escape(what)}: <b>{html.escape(concept)}</b> pixels "
                f"{100 * np.mean(p0):.2f}% → {100 * np.mean(p1):.2f}% "
                f"(<b>{'+' if d >= 0 else ''}{100 * d:.2f}</b> points; "
                f"{int(round(np.sum(p1 - p0) * pixels_per_image)):+d} pixels over {len(p0)} samples)")

    def _show(self, parts):
        orig, edited, diff, side, count = parts
        n = len(orig)
        while len(self._cells) < n:
            self._cells.append(_Sample(side))
        with self.hold_sync():
            for i, cell in enumerate(self._cells):
                cell.layout.display = None if i < n else "none"
                if i < n:
                    cell.resize(side)
                    for w, v in zip(cell.pictures, (orig[i], edited[i], diff[i])):
                        if w.value != v:
                            w.value = v
            if len(self.columns.children) != len(self._cells):
                self.columns.children = list(self._cells)
        self.run(count, self._show_stats)  # a newer toggle drops it

    def _show_stats(self, text):
        self.stats.value = text


class _Sample(W.HBox):
    """One sample's column: its original, edited and difference pictures, with the rows' names
    on their left.  The stylesheet tucks the names under the pictures of the column before, so
    that they show only where a line of columns begins, whatever the width wraps them to."""

    def __init__(self, side):
        self.pictures = [pixels(image_widget(), *side) for _ in ROWS]
        for p, r in zip(self.pictures, ROWS):
            p.add_class(f"gd-{r}")
        self.labels = W.HTML()
        self.labels.add_class("gd-sample-labels")
        box = W.VBox(self.pictures)
        box.add_class("gd-sample-pictures")
        super().__init__([self.labels, box])
        self.add_class("gd-sample")
        self.side = None
        self.resize(side)

    def resize(self, side):
        if side == self.side:
            return
        self.side = side
        for p in self.pictures:
            pixels(p, *side)
        self.labels.value = "".join(f'<div class="gd-sample-label" style="height: {side[1] + 2}px">'
                                    f'<b>{r}</b></div>' for r in ROWS)


class _Columns(W.HBox):
    """The samples' columns, wrapping to the view's width.  A static picture of them (snapshot)
    draws each line of columns with the rows' names on its left, as the browser shows them."""

    def __init__(self):
        super().__init__([], layout=W.Layout(flex_flow="row wrap"))
        self.add_class("gd-row")
        self.add_class("gd-samples")

    def snapshot_compose(self, pictures_only=False):
        cells = [c for c in self.children if c.layout.display != "none"]
        columns = [snapshot.compose(c.children[1], True) for c in cells]
        columns = [c for c in columns if c is not None]
        if not columns:
            return None
        if pictures_only:
            return snapshot._row(columns)
        step = cells[0].side[1] + snapshot.GAP  # compose stacks the pictures GAP apart
        names = [snapshot.text_image(r) for r in ROWS]
        key = snapshot.Image.new("RGB", (max(n.width for n in names), columns[0].height), snapshot.PAPER)
        for i, n in enumerate(names):
            key.paste(n, (0, i * step + 2))
        lines, line, width = [], [], key.width
        for c in columns:
            if line and width + snapshot.GAP + c.width > snapshot.MAX_WIDTH:
                lines.append(line)
                line, width = [], key.width
            line.append(c)
            width += snapshot.GAP + c.width
        lines.append(line)
        return snapshot._column([snapshot._join([key] + l, horizontal=True) for l in lines])


def _format(samples) -> str:
    s = list(samples)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))
