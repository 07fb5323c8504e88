"""``gandissect report DIR``: one self-contained HTML page of a dissection and the causal results beside it.

    from gandissect_widgets.report.html import build_report
    build_report("results/sceneworld")            # -> results/sceneworld/report.html

DIR is a directory written by ``gandissect dissect`` (``dissect.json`` + ``arrays-<hash>.npz``); any
``ace.json``, ``context.json``, ``artifacts.json`` or ``optimize.json`` found in DIR or below it
(written by ``gandissect ace|context|artifacts|optimize``) gets its own section.  The page works
offline: no external script, style sheet or font; every picture is a ``data:`` URI; sorting the
unit cards (by IoU, concept or unit) is a few lines of inline JavaScript.

Unit cards show each unit's top-activating dissection samples with its mask (by default for the
interpretable units and the top 20 of each layer); drawing them needs the generator and segmenter,
loaded as ``dissect.json`` records them (name, plug-in or import path, checkpoint) unless others
are given.  When they cannot be loaded the report is written without the pictures and says why.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import sys

import numpy as np

from gandissect_widgets.engine.readout import descending

__all__ = ["build_report", "find_results", "add_parser", "cmd_report", "RESULT_FILES"]

RESULT_FILES = ("ace.json", "context.json", "artifacts.json", "optimize.json")
_SKIP_DIRS = {".cache", "report_files", "__pycache__", ".git"}


# -- finding and reading -------------------------------------------------------------------------
def find_results(directory) -> list[tuple[str, str, dict | Exception]]:
    """[(kind, path relative to directory, parsed JSON or the error)] for the causal result files in
    ``directory`` and below, in a stable order (kind order, then path)."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in RESULT_FILES:
            if name in files:
                path = os.path.join(root, name)
                try:
                    with open(path) as f:
                        doc = json.load(f)
                    if not isinstance(doc, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError) as e:
                    doc = e
                found.append((name[:-5], os.path.relpath(path, directory), doc))
    order = {k[:-5]: i for i, k in enumerate(RESULT_FILES)}
    return sorted(found, key=lambda t: (order[t[0]], t[1]))


# -- encoding ------------------------------------------------------------------------------------
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_uri(fig, dpi: int = 100) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return _data_uri(buf.getvalue())


def _array_uri(arr: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue())


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, fmt=".4f") -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    return format(x, fmt) if np.isfinite(x) else "–"


def _ci(pair, fmt=".4f") -> str:
    try:
        return f"[{_num(pair[0], fmt)}, {_num(pair[1], fmt)}]"
    except (TypeError, IndexError):
        return ""


def _table(head, rows, cls="") -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _img(uri, alt, cls="fig") -> str:
    return f"<img class='{cls}' src='{uri}' alt='{_e(alt)}'>"


# -- models and pictures -------------------------------------------------------------------------
MODELS_ADVICE = ("give the models with --generator and --segmenter: a registered name, a plug-in's name "
                 "(`gandissect models` lists both) or an import path package.module:factory, with --checkpoint / "
                 "--segmenter-checkpoint for their weights files")


def _load_models(d, directory, generator, segmenter, checkpoint, segmenter_checkpoint, device, trust_pickle=False):
    """(G, S, notes) or (None, None, notes): the models recorded in the settings unless others are given."""
    from gandissect_widgets.engine.protocols import fingerprint
    from gandissect_widgets.registry import load_model, models_in_settings, models_to_load
    recorded = models_in_settings(d.settings)
    gname = generator or recorded.get("generator", {}).get("name")
    sname = segmenter or recorded.get("segmenter", {}).get("name")
    notes = []
    try:
        chosen = models_to_load(d.settings, directory, generator, checkpoint, segmenter, segmenter_checkpoint)
        (gname, checkpoint), (sname, segmenter_checkpoint) = chosen["generator"], chosen["segmenter"]
        if not gname or not sname:
            raise ValueError("dissect.json records no generator/segmenter name")
        G = load_model("generator", gname, device, checkpoint, trust_pickle)
        S = load_model("segmenter", sname, device, segmenter_checkpoint, trust_pickle)
        if list(S.labels) != list(d.labels):
            raise ValueError(f"segmenter {sname!r} has other labels than the dissection's")
    except Exception as e:  # any failure to load means: a report without pictures
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        notes.append(f"No pictures: could not load generator {gname!r} and segmenter {sname!r} "
                     f"({type(e).__name__}: {msg}). To draw them, {MODELS_ADVICE}.")
        return None, None, notes
    want = d.settings.get("generator_fingerprint")
    if want and fingerprint(G) != want:
        notes.append(f"The loaded generator {gname!r} is not the dissected one (its weights differ from "
                     f"fingerprint {want}): the pictures show the loaded model's samples.")
    return G, S, notes


def drawn_units(d, layer, min_iou, top_units=20, all_units=False) -> list[int]:
    """The units whose cards get pictures: every one, or the interpretable ones and the ``top_units``
    best by IoU (in card order, best first)."""
    ious = d.unit_ious(layer)
    order = descending(ious)
    if all_units:
        return [int(u) for u in order]
    keep = d.interpretable(layer, min_iou)
    keep[order[:top_units]] = True
    return [int(u) for u in order if keep[u]]


def _unit_strips(session, layer, units, k, chunk=16):
    """{unit: (2H + gap, k*W + gaps, 3) uint8}: top samples darkened outside the unit's mask, in a
    row, over the same samples darkened outside the segmenter's mask of the unit's label (outlined
    in the galleries' concept colour): whether the unit's mask is the concept's shows at a glance."""
    from gandissect_widgets.engine.imaging import grid, overlay_mask
    from gandissect_widgets.report.figures import CONCEPT_OUTLINE
    label = session.dissection.unit_label_ids(layer)
    out = {}
    for i in range(0, len(units), chunk):
        gal = session.unit_gallery(layer, units[i:i + chunk], k=k)
        for u, entry in gal.items():
            images, masks, _ = entry
            concept = overlay_mask(images, entry.concept_mask(label[u]), dim=0.4, color=CONCEPT_OUTLINE)
            out[u] = grid(np.concatenate([overlay_mask(images, masks, dim=0.4), concept]), cols=len(images))
    return out


# -- sections ------------------------------------------------------------------------------------
def _summary_section(d, min_iou):
    from gandissect_widgets.report.figures import interpretable_units_figure
    rows = []
    for layer in d.layers:
        n = len(d.thresholds(layer))
        counts = d.concept_counts(layer, min_iou)
        rows.append([f"<a href='#layer-{_e(layer)}'>{_e(layer)}</a>",
                     _e("×".join(str(int(s)) for s in d.array(layer, "shape"))),
                     f"{int(d.interpretable(layer, min_iou).sum())}/{n}",
                     _e(", ".join(f"{c} {v}" for c, v in counts.items()) or "none")])
    fig = interpretable_units_figure(d, min_iou=min_iou)
    return ("<section id='summary'><h2>Interpretable units per layer</h2>"
            + _table(["layer", "shape (C×h×w)", "interpretable", "per concept"], rows, "summary")
            + _img(_figure_uri(fig), "interpretable units per concept for each layer")
            + _concepts_table(d, min_iou) + "</section>")


def _concepts_table(d, min_iou):
    """Per concept: its area, the highest IoU the threshold allows and the position-only baseline."""
    layer = d.layers[0]
    area = d.array(layer, "concept_pixels") / max(int(d.array(layer, "n_pixels")), 1)
    ceil = d.concept_ceiling(layer)
    base = d.concept_baseline(layer) if d.has_position_baseline else None
    rows = [[_e(d.labels[c]), _num(area[c]), _num(ceil[c], ".3f"), "–" if base is None else _num(base[c], ".3f")]
            for c in range(1, len(d.labels))]
    warning = d.ceiling_warning(min_iou)
    return ("<h3>What a unit's IoU is compared with</h3>"
            + (f"<p class='notice' id='low-ceiling'>{_e(warning[0].upper() + warning[1:])}.</p>" if warning else "")
            + ("" if base is not None else "<p class='note' id='no-baseline'>This result has no concept position "
               "counts (saved before they were counted), so no position-only baseline.</p>")
            + "<p class='note'>IoU ceiling: the highest IoU a mask of the threshold's size can reach with the "
              "concept, min(mask, area) / max(mask, area). Position-only baseline: the IoU of the best fixed mask "
              "of that size (the same pixels in every image), chosen from where the concept usually is; a unit "
              "below it knows no more than that.</p>"
            + _table(["concept", "area (fraction of pixels)", "IoU ceiling", "position-only baseline"], rows,
                     "concepts"))


def _layer_section(d, layer, min_iou, strips):
    from gandissect_widgets.engine.baselines import describe_comparison
    ids, ious = d.unit_label_ids(layer), d.unit_ious(layer)
    base, ceil = (d.unit_baselines(layer) if d.has_position_baseline else None), d.unit_ceilings(layer)
    iou = d.iou(layer)
    interp = d.interpretable(layer, min_iou)
    order = descending(ious)  # as the page's own sort: IoU (all its digits), then unit
    cards = []
    for u in order:
        u = int(u)
        label = d.labels[int(ids[u])]
        others = [c for c in descending(iou[u]) if c > 0 and c != ids[u] and iou[u, c] > 0][:3]
        also = ", ".join(f"{d.labels[c]} {iou[u, c]:.3f}" for c in others)
        pic = ""
        if u in strips:  # small generator outputs are shown enlarged (crisp pixels)
            uri, h, w = strips[u]
            scale = max(1, min(3, 128 // max((h - 2) // 2, 1)))  # two rows of samples, 2 px apart
            pic = (f"<img class='strip' src='{uri}' width='{w * scale}' height='{h * scale}' "
                   f"alt='top samples of {_e(layer)} unit {u}: its mask (top row), the segmenter&#39;s "
                   f"{_e(label)} (bottom row)'>")
        cards.append(
            f"<div class='card{' interp' if interp[u] else ''}' data-unit='{u}' data-iou='{float(ious[u])!r}' "
            f"data-concept='{_e(label)}' data-interpretable='{int(interp[u])}'>"
            f"<div class='head'><b>unit {u}</b> <span class='concept'>{_e(label)}</span> "
            f"<span class='iou'>IoU {ious[u]:.3f}</span></div>"
            f"<div class='vs'>{_e(describe_comparison(None if base is None else base[u], ceil[u]))}</div>{pic}"
            f"<div class='also'>{('also: ' + _e(also)) if also else '&nbsp;'}</div></div>")
    gid = f"cards-{layer}"
    bar = (f"<div class='sorter' data-target='{_e(gid)}'>sort by "
           f"<button type='button' data-sort='iou' class='active'>IoU</button>"
           f"<button type='button' data-sort='concept'>concept</button>"
           f"<button type='button' data-sort='unit'>unit</button>"
           f"<label><input type='checkbox' class='only-interp'> interpretable only</label></div>")
    n = len(ids)
    return (f"<section class='layer' id='layer-{_e(layer)}'><h2>{_e(layer)}: "
            f"{int(interp.sum())}/{n} interpretable units</h2>"
            f"<p class='note'>Each card: the unit's top-activating dissection samples, darkened outside its mask "
            f"(activation above its top-{_num(100 * (1 - float(d.settings.get('quantile', 0.99))), 'g')}% "
            f"threshold), its best concept and IoU.</p>"
            + bar + f"<div class='cards' id='{_e(gid)}'>" + "".join(cards) + "</div></section>")


def _ace_html(doc):
    from gandissect_widgets.report.figures import ace_ranking_figure, removal_curve_figure
    a = doc["ace"]
    p = a.get("presence", {})
    parts = [_table(["layer", "concept", "units", "samples", "presence: original / ablated / inserted",
                     "ACE [95% CI]", "removal ratio [95% CI]"],
                    [[_e(a["layer"]), _e(a["concept"]), _e(", ".join(str(u) for u in a["units"])),
                      _e(a.get("n_samples", "")),
                      f"{_num(p.get('original'))} / {_num(p.get('ablated'))} / {_num(p.get('inserted'))}",
                      f"{_num(a['ace'])} {_ci(a.get('ace_ci'))}",
                      f"{_num(a['removal_ratio'], '.3f')} {_ci(a.get('removal_ci'), '.3f')}"]])]
    figs = []
    curve = doc.get("removal_curve")
    if curve:
        figs.append(_img(_figure_uri(removal_curve_figure(curve)), "removal curve"))
        head = (["units ablated"] + [f"{n} ranking" for n in curve["curves"]]
                + (["random"] if curve.get("random_mean") else []))
        rows = [[_e(k)] + [_num(ys[i], ".3f") for ys in curve["curves"].values()]
                + ([f"{_num(curve['random_mean'][i], '.3f')} ± {_num(curve['random_std'][i], '.3f')}"]
                   if curve.get("random_mean") else []) for i, k in enumerate(curve["ks"])]
        parts.append("<h4>Removal ratio by number of units ablated</h4>" + _table(head, rows))
    if doc.get("unit_ace"):
        figs.append(_img(_figure_uri(ace_ranking_figure(doc["unit_ace"], a["concept"], a["layer"])),
                         "single-unit ACE ranking"))
    return "".join(parts) + "<div class='figs'>" + "".join(figs) + "</div>"


def _context_html(doc):
    from gandissect_widgets.report.figures import context_table_figure
    rows = [[_e(r["context"]), _e(r["count"]), _num(r["added_fraction"]), _num(r.get("ci95"))] for r in doc["table"]]
    s = doc.get("settings", {})
    n = len(doc["units"])
    head = (f"<p>{n} {_e(doc['concept'])} unit{'s' if n != 1 else ''} of {_e(doc['layer'])} inserted "
            f"one cell at a time "
            f"({_e(s.get('n_samples', '?'))} samples, {_e(s.get('locations') or 'all')} cells each); added pixels "
            f"(fraction of the image) by the label at the cell's centre.</p>")
    fig = ""
    if any(r["count"] >= 5 for r in doc["table"]):
        fig = _img(_figure_uri(context_table_figure([doc], min_count=5)), "contextual insertion table")
    table = _table(["context", "insertions", "mean added", "95% half-width"], rows)
    return head + "<div class='figs'>" + table + fig + "</div>"


def _artifacts_html(doc):
    from gandissect_widgets.engine.artifacts import ArtifactResult
    from gandissect_widgets.report.figures import artifacts_figure
    before = np.asarray(doc["fd_before"], dtype=float)
    after = np.asarray(doc["fd_after"], dtype=float)
    res = ArtifactResult(doc["layer"], before, after, np.asarray(doc["ranking"], dtype=int), doc.get("removal") or {},
                         doc.get("settings") or {})
    top = [[_e(u), _num(before[u]), _num(after[u]), _num(before[u] - after[u])] for u in res.ranking[:10]]
    parts = ["<h4>Top artifact units</h4>" + _table(["unit", "distance before", "after ablation", "improvement"], top)]
    rem = res.removal
    if rem and rem.get("ks"):
        rows = [[_e(k), _num(rem["fd_original"]), _num(t), f"{_num(r)} ± {_num(sd)}"]
                for k, t, r, sd in zip(rem["ks"], rem["fd_top"], rem["fd_random"], rem["fd_random_std"])]
        parts.append("<h4>Ablating the top units on ordinary samples</h4>"
                     + _table(["units", "distance, original", "top artifact units ablated",
                               "random units ablated"], rows))
    return "".join(parts) + _img(_figure_uri(artifacts_figure(res)), "artifact scores")


def _optimize_html(doc):
    from gandissect_widgets.report.figures import alpha_figure
    topk = ", ".join(f"top {k}: {_num(v)}" for k, v in (doc.get("topk_ace") or {}).items())
    s = doc.get("settings", {})
    return (_table(["layer", "concept", "held-out ACE (hard)", "held-out ACE (soft)", "ACE of top-k units",
                    "top units"],
                   [[_e(doc["layer"]), _e(doc["concept"]), _num(doc["heldout_ace"]), _num(doc["heldout_ace_soft"]),
                     _e(topk), _e(", ".join(str(u) for u in doc["ranking"][:10]))]])
            + f"<p class='note'>{_e(s.get('steps', '?'))} steps, {_e(s.get('n_train', '?'))} training and "
              f"{_e(s.get('n_test', '?'))} held-out samples.</p>"
            + _img(_figure_uri(alpha_figure(doc["alpha"], doc["concept"], doc["layer"])), "learned alpha"))


_CAUSAL = {"ace": ("Average causal effect and removal curve", _ace_html),
           "context": ("Contextual insertion", _context_html),
           "artifacts": ("Artifact units", _artifacts_html),
           "optimize": ("Optimised intervention", _optimize_html)}


def _causal_section(results):
    if not results:
        return ""
    out = ["<section id='causal'><h2>Causal results</h2>"]
    for kind, rel, doc in results:
        title, fn = _CAUSAL[kind]
        out.append(f"<div class='causal' data-kind='{kind}'><h3>{_e(title)} <span class='path'>{_e(rel)}</span></h3>")
        try:
            if isinstance(doc, Exception):
                raise doc
            out.append(fn(doc))
        except Exception as e:
            out.append(f"<p class='notice'>Could not read {_e(rel)}: {_e(type(e).__name__)}: {_e(e)}</p>")
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


# -- the page ------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em} h4{font-size:.95em;margin:.8em 0 .3em} .path{font-weight:normal;color:#888;font-size:.85em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} .notice{background:#fff4d6;border:1px solid #e8c46a;padding:.6em .9em;border-radius:4px}
.note{color:#555;font-size:13px} img.fig{max-width:100%;margin:.4em 1em .4em 0;vertical-align:top}
.figs{display:flex;flex-wrap:wrap;align-items:flex-start;gap:1em}
.sorter{margin:.5em 0;font-size:13px} .sorter button{margin:0 .2em;padding:2px 10px;border:1px solid #aaa;background:#fafafa;
border-radius:3px;cursor:pointer} .sorter button.active{background:#2a6fdb;color:#fff;border-color:#2a6fdb}
.sorter label{margin-left:1.2em}
.cards{display:flex;flex-wrap:wrap;gap:8px} .card{border:1px solid #ddd;border-radius:4px;padding:4px;font-size:12px;background:#fff}
.card.interp{border-color:#7aa7e8} .card .head{margin-bottom:3px} .card .concept{color:#2a6fdb}
.card .iou{color:#666;float:right;margin-left:1em} .card .also,.card .vs{color:#888;font-size:11px;margin-top:2px}
img.strip{display:block;image-rendering:pixelated;image-rendering:crisp-edges}
.hidden{display:none} dl.settings{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:13px}
dl.settings dt{color:#666} dl.settings dd{margin:0;font-family:monospace}
"""

_JS = """
(function () {
  function num(card, key) { return parseFloat(card.dataset[key]); }
  var orders = {
    iou: function (a, b) { return num(b, 'iou') - num(a, 'iou') || num(a, 'unit') - num(b, 'unit'); },
    unit: function (a, b) { return num(a, 'unit') - num(b, 'unit'); },
    concept: function (a, b) {
      return a.dataset.concept.localeCompare(b.dataset.concept) || num(b, 'iou') - num(a, 'iou') ||
             num(a, 'unit') - num(b, 'unit');
    }
  };
  document.querySelectorAll('.sorter').forEach(function (bar) {
    var grid = document.getElementById(bar.dataset.target);
    bar.addEventListener('click', function (ev) {
      var button = ev.target.closest('button[data-sort]');
      if (!button) { return; }
      var cards = Array.prototype.slice.call(grid.children);
      cards.sort(orders[button.dataset.sort]);
      cards.forEach(function (c) { grid.appendChild(c); });
      bar.querySelectorAll('button').forEach(function (b) { b.classList.toggle('active', b === button); });
      grid.dataset.sortedBy = button.dataset.sort;
    });
    var only = bar.querySelector('input.only-interp');
    only.addEventListener('change', function () {
      Array.prototype.forEach.call(grid.children, function (c) {
        c.classList.toggle('hidden', only.checked && c.dataset.interpretable !== '1');
      });
    });
  });
})();
"""


def build_report(directory, out=None, generator=None, segmenter=None, checkpoint=None, segmenter_checkpoint=None,
                 device=None, samples_per_unit: int = 4, pictures: bool = True, min_iou: float | None = None,
                 progress: bool = False, trust_pickle: bool = False, top_units: int = 20,
                 all_units: bool = False) -> str:
    """Write the HTML report of the dissection in ``directory`` (atomically) and return its path.

    out: the HTML file (default ``directory/report.html``).  generator/segmenter (+ checkpoints):
    the models that draw the unit pictures (default: those dissect.json records, with their
    checkpoints); ``trust_pickle`` is passed to loaders that take it; ``pictures=False`` leaves the
    pictures out.  Pictures are drawn for the interpretable units and the ``top_units`` best by IoU
    of each layer (a page of every unit of 4 large layers weighs tens of MB); ``all_units=True``
    draws every unit.  min_iou: the interpretability cut-off (default: dissect.json's)."""
    return _build(directory, out, generator, segmenter, checkpoint, segmenter_checkpoint, device, samples_per_unit,
                  pictures, min_iou, progress, trust_pickle, top_units, all_units)["path"]


def _build(directory, out, generator, segmenter, checkpoint, segmenter_checkpoint, device, samples_per_unit,
           pictures, min_iou, progress, trust_pickle, top_units, all_units) -> dict:
    """build_report's work; returns {"path", "bytes", "drawn", "units", "notes"}."""
    from gandissect_widgets.engine.io import atomic_write_bytes
    from gandissect_widgets.engine.results import DEFAULT_MIN_IOU, Dissection
    d = Dissection.load(directory)
    if min_iou is None:
        with open(os.path.join(directory, "dissect.json")) as f:
            min_iou = float(json.load(f).get("min_iou", DEFAULT_MIN_IOU))
    out = out or os.path.join(directory, "report.html")
    if samples_per_unit < 1:
        raise ValueError(f"samples_per_unit must be >= 1, got {samples_per_unit}")
    if top_units < 0:
        raise ValueError(f"top_units must be >= 0, got {top_units}")
    notes, strips = [], {layer: {} for layer in d.layers}
    n_units = sum(int(d.array(layer, "shape")[0]) for layer in d.layers)
    if pictures:
        import torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        G, S, notes = _load_models(d, directory, generator, segmenter, checkpoint, segmenter_checkpoint, device,
                                   trust_pickle)
        if G is not None:
            from gandissect_widgets.engine.session import Session
            session = Session(G, S, device=device, dissection=d)
            for layer in d.layers:
                units = drawn_units(d, layer, min_iou, top_units, all_units)
                if progress:
                    print(f"report: drawing {len(units)} units of {layer}", file=sys.stderr)
                strips[layer] = {u: (_array_uri(a), a.shape[0], a.shape[1]) for u, a in
                                 _unit_strips(session, layer, units, samples_per_unit).items()}
            drawn = sum(len(v) for v in strips.values())
            if drawn < n_units:
                notes.append(f"Pictures of {drawn} of {n_units} units: the interpretable ones and the top "
                             f"{top_units} by IoU of each layer (--all-units, or all_units=True, draws every unit).")
    else:
        notes.append("No pictures: the report was made with --no-pictures.")
    results = find_results(directory)
    s = d.settings
    keys = ["generator", "segmenter", "n_samples", "seed", "quantile", "topk", "generator_fingerprint",
            "segmenter_fingerprint", "engine_version"]
    settings = "".join(f"<dt>{_e(k)}</dt><dd>{_e(s[k])}</dd>" for k in keys if k in s)
    settings += f"<dt>min_iou</dt><dd>{_e(min_iou)}</dd>"
    nav = " · ".join(["<a href='#summary'>summary</a>"] + [f"<a href='#layer-{_e(l)}'>{_e(l)}</a>" for l in d.layers]
                     + (["<a href='#causal'>causal results</a>"] if results else []))
    body = [f"<h1>GAN dissection: {_e(s.get('generator', '?'))} vs {_e(s.get('segmenter', '?'))}</h1>",
            f"<p class='note'>{_e(os.path.abspath(directory))} · {nav}</p>",
            f"<dl class='settings'>{settings}</dl>"]
    body += [f"<p class='notice' id='no-pictures'>{_e(n)}</p>" if n.startswith("No pictures")
             else f"<p class='notice'>{_e(n)}</p>" for n in notes]
    body.append(_summary_section(d, min_iou))
    body += [_layer_section(d, layer, min_iou, strips[layer]) for layer in d.layers]
    body.append(_causal_section(results))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>GAN dissection report: {_e(s.get('generator', '?'))}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}<script>{_JS}</script></body></html>")
    data = page.encode("utf-8")
    atomic_write_bytes(out, data)
    return {"path": out, "bytes": len(data), "drawn": sum(len(v) for v in strips.values()), "units": n_units,
            "notes": notes}


# -- command line --------------------------------------------------------------------------------
def add_parser(sub):
    """The ``report`` subcommand's arguments (called by ``gandissect_widgets.cli.build_parser``)."""
    p = sub.add_parser("report", help="an offline HTML report of a dissection directory and the causal results in it")
    p.add_argument("dir", help="a directory written by `gandissect dissect` (ace/context/artifacts/optimize JSON "
                               "files in it or below it are included)")
    p.add_argument("--out", default=None, help="the HTML file to write (default: DIR/report.html)")
    p.add_argument("--generator", default=None,
                   help="generator for the unit pictures: a registered name, a plug-in's name or an import path "
                        "package.module:factory (default: the one dissect.json records, with its checkpoint)")
    p.add_argument("--checkpoint", default=None, help="local weights file for the generator")
    p.add_argument("--segmenter", default=None,
                   help="segmenter for the unit masks (default: the one dissect.json records)")
    p.add_argument("--segmenter-checkpoint", default=None, help="local weights for the segmenter")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint that holds pickled Python objects in full (it runs code stored in the "
                        "file: only for files you know)")
    p.add_argument("--samples-per-unit", type=int, default=4, help="top samples shown per unit (default 4)")
    p.add_argument("--top-units", type=int, default=20,
                   help="pictures for the interpretable units and the TOP_UNITS best by IoU of each layer (default 20)")
    p.add_argument("--all-units", action="store_true", help="pictures for every unit (a larger page)")
    p.add_argument("--no-pictures", action="store_true", help="leave out the unit pictures (no model needed)")
    p.add_argument("--quiet", action="store_true")
    return p


def cmd_report(a):
    from gandissect_widgets.cli import _fmt_bytes
    r = _build(a.dir, a.out, a.generator, a.segmenter, a.checkpoint, a.segmenter_checkpoint, a.device,
               a.samples_per_unit, not a.no_pictures, None, not a.quiet, a.trust_pickle, a.top_units, a.all_units)
    for note in r["notes"]:
        if note.startswith("No pictures: could not"):
            print(f"report: {note}", file=sys.stderr)
    print(f"wrote {r['path']} ({_fmt_bytes(r['bytes'])}; pictures of {r['drawn']} of {r['units']} units)")
