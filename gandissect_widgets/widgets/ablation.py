"""Ablation panel: a strip of samples, originals beside edited images; toggle units and the edited
images re-render at once from cached activations."""
from __future__ import annotations

import ipywidgets as W
import numpy as np

from gandissect_widgets.engine.imaging import difference, strip, to_uint8
from gandissect_widgets.engine.session import parse_indices
from gandissect_widgets.widgets.base import View, image_widget, strength_slider
from gandissect_widgets.widgets.encode import encode_image

__all__ = ["AblationPanel"]


class AblationPanel(View):
    """Units to switch: the session's selection.  Candidate toggles: the concept's top units by IoU
    plus whatever is selected.  Shows originals, edited images, their difference, and the change in
    the concept's pixels."""

    def __init__(self, session, candidates: int = 20, scale: int = 2):
        s = session
        s._need_dissection()
        self.n_candidates, self.scale = candidates, scale
        self.samples = W.Text(value=_format(s.samples), description="samples", layout=W.Layout(width="200px"))
        self.concept = W.Dropdown(options=s.concepts(), value=s.concept or s.concepts()[0], description="concept",
                                  layout=W.Layout(width="220px"))
        self.mode = W.ToggleButtons(options=[("ablate", "ablate"), ("insert", "insert")], value=s.mode)
        self.strength = strength_slider(s)
        self.topk = W.IntSlider(value=min(10, candidates), min=0, max=candidates, description="top-k",
                                continuous_update=False)
        self.use_topk = W.Button(description="switch top-k", tooltip="select the concept's top-k units by IoU")
        self.clear = W.Button(description="none", tooltip="switch no unit")
        self.toggles = W.HBox(layout=W.Layout(flex_flow="row wrap", max_width="900px"))
        self.original = image_widget()
        self.edited = image_widget()
        self.diff = image_widget()
        self.stats = W.HTML()
        self._toggles: dict[int, W.ToggleButton] = {}
        self._base = None  # (key, uint8 originals, presence)
        rows = W.VBox([W.HTML("<b>original</b>"), self.original, W.HTML("<b>edited</b>"), self.edited,
                       W.HTML("<b>difference</b>"), self.diff])
        super().__init__(session, [W.HBox([self.samples, self.concept, self.mode, self.strength]),
                                   W.HBox([self.topk, self.use_topk, self.clear]), self.toggles, rows, self.stats])
        self.add_class("gd-ablation")
        self.edited.add_class("gd-edited")
        self.original.add_class("gd-original")
        self.samples.observe(self.safely(self._samples_changed), names="value")
        self.concept.observe(self.safely(lambda ch: s.update(concept=ch["new"])), names="value")
        self.mode.observe(self.safely(lambda ch: s.update(mode=ch["new"])), names="value")
        self.strength.observe(self.safely(lambda ch: s.update(strength=ch["new"])), names="value")
        self.use_topk.on_click(self.safely(lambda b: self.switch_top(self.topk.value)))
        self.clear.on_click(self.safely(lambda b: s.update(selection=())))
        s.observe(self._session_changed, names=["selection", "samples", "mode", "concept", "layer", "strength"])
        if s.concept is None:
            s.update(concept=self.concept.value)
        self._build_toggles()
        self.refresh()

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
            if s.mode != "insert":
                return  # ablations do not depend on it
        elif name == "concept" and new is not None and new != self.concept.value:
            self.concept.value = new
        if name in ("concept", "layer", "selection"):
            self._build_toggles()
        self.refresh()

    def _build_toggles(self):
        sel = set(self.session.selection)
        cands = self.candidates()
        if set(cands) != set(self._toggles):
            self._toggles = {}
            for u in cands:
                t = W.ToggleButton(value=u in sel, description=str(u), tooltip=f"unit {u}",
                                   layout=W.Layout(width="46px"))
                t.add_class("gd-unit-toggle")
                t.observe(self.safely(lambda ch, u=u: self.toggle(u, ch["new"])), names="value")
                self._toggles[u] = t
            self.toggles.children = list(self._toggles.values())
        for u, t in self._toggles.items():
            if t.value != (u in sel):
                t.value = u in sel

    # -- rendering -----------------------------------------------------------------------------
    def refresh(self):
        s = self.session
        layer, samples, units, mode, concept = s.layer, s.samples, tuple(s.selection), s.mode, self.concept.value
        self.run(lambda: self.compute(layer, samples, units, mode, concept), self._show)

    def compute(self, layer, samples, units, mode, concept):
        """(original bytes, edited bytes, difference bytes, stats html) for this state."""
        s = self.session
        key = (layer, samples, concept)
        if self._base is None or self._base[0] != key:
            x0 = s.render(samples, [])
            self._base = (key, to_uint8(x0), s.presence(x0, concept))
        _, orig, p0 = self._base
        if units:
            x1 = s.render(samples, [s.intervention(layer, units, mode, concept)])
            edited, p1 = to_uint8(x1), s.presence(x1, concept)
        else:
            edited, p1 = orig, p0
        H, W_ = orig.shape[1:3]
        d = float(np.mean(p1 - p0))
        how = f"insert (x{s.strength:g})" if mode == "insert" else mode
        stats = (f"{how} {len(units)} unit(s) of {layer}: <b>{concept}</b> pixels "
                 f"{100 * np.mean(p0):.2f}% → {100 * np.mean(p1):.2f}% "
                 f"(<b>{'+' if d >= 0 else ''}{100 * d:.2f}</b> points; "
                 f"{int(round(np.sum(p1 - p0) * H * W_)):+d} pixels over {len(samples)} samples)")
        enc = lambda a: encode_image(strip(a), "png", self.scale)
        return enc(orig), enc(edited), enc(difference(orig, edited)), stats

    def _show(self, parts):
        o, e, d, stats = parts
        with self.hold_sync():
            self.original.value, self.edited.value, self.diff.value = o, e, d
            self.stats.value = stats


def _format(samples) -> str:
    s = list(samples)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ", ".join(map(str, s))
