"""Matplotlib figures of dissection and causal results, and ``save_figure``, the one way to write them.

Figures are ``PngFigure`` objects (matplotlib Figures, not pyplot state): safe in threads and CLIs,
and shown by Jupyter as a PNG whether or not pyplot was imported, whatever the backend.
"""
from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from gandissect_widgets.engine.imaging import HEATMAP_STOPS
from gandissect_widgets.engine.io import atomic_write_bytes
from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU, descending

__all__ = ["save_figure", "removal_curve_figure", "ace_ranking_figure", "alpha_figure", "context_figure",
           "artifacts_figure", "interpretable_units_figure", "interpretable_units_figures"]


class PngFigure(Figure):
    """A Figure that IPython shows as a PNG in any kernel, backend and nbconvert output (a plain Figure
    made without pyplot prints ``<Figure size ...>`` until pyplot is imported).  White, even under a
    dark style: light themes read it, and a CSS invert makes a clean dark chart of it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("facecolor", "white")
        super().__init__(*args, **kwargs)

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight", facecolor=self.get_facecolor())
        return buf.getvalue()


def save_figure(fig, path, formats=("png", "pdf"), dpi=150):
    """Write ``fig`` as ``path.<fmt>`` for each format, atomically; returns the paths written.

    A ``path`` ending in an image format matplotlib writes (``.png``, ``.svg``, ...) is written
    in that format alone; any other dot is part of the name (``gallery_main.5`` ->
    ``gallery_main.5.png`` and ``.pdf``)."""
    base, ext = os.path.splitext(os.fspath(path))
    if ext[1:].lower() in fig.canvas.get_supported_filetypes():
        formats = (ext[1:].lower(),)
    else:
        base = os.fspath(path)
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight",
                    metadata={"CreationDate": None} if fmt == "pdf" else None)
        atomic_write_bytes(f"{base}.{fmt}", buf.getvalue())
        out.append(f"{base}.{fmt}")
    return out


def removal_curve_figure(curve: dict):
    """Removal ratio vs number of units ablated: each ranking, and random units (mean ± std)."""
    fig = PngFigure(figsize=(5, 3.6))
    ax = fig.subplots()
    ks = curve["ks"]
    for name, ys in curve["curves"].items():
        ax.plot(ks, ys, marker="o", label=f"{name} ranking")
    if curve.get("random_mean"):
        m, s = np.array(curve["random_mean"]), np.array(curve["random_std"])
        ax.plot(ks, m, marker="o", color="gray", label=f"random ({len(curve['random_draws'])} draws)")
        ax.fill_between(ks, m - s, m + s, color="gray", alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("units ablated")
    ax.set_ylabel(f"fraction of {curve['concept']} pixels removed")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
    ax.set_title(f"Removing {curve['concept']} at {curve['layer']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _ranked_bars(values, top, color, ylabel, title, ylim=None):
    values = np.asarray(values)
    order = descending(values)[:top]
    fig = PngFigure(figsize=(max(4, 0.22 * len(order) + 1), 3))
    ax = fig.subplots()
    ax.bar(range(len(order)), values[order], color=color)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(u) for u in order], rotation=90, fontsize=7)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("unit")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def ace_ranking_figure(ace, concept: str, layer: str, top: int = 30):
    return _ranked_bars(ace, top, "tab:green", "single-unit ACE", f"{concept}: units of {layer} by causal effect")


def alpha_figure(alpha, concept: str, layer: str, top: int = 40):
    return _ranked_bars(alpha, top, "tab:purple", "learned alpha", f"Optimised intervention for {concept} at {layer}",
                        ylim=(0, 1.02))


def context_figure(result, min_count: int = 5):
    rows = result.table(min_count)
    fig = PngFigure(figsize=(5, 0.32 * max(3, len(rows)) + 1))
    ax = fig.subplots()
    names = [r[0] for r in rows][::-1]
    vals = np.array([r[2] for r in rows])[::-1]
    err = np.array([r[3] for r in rows])[::-1]
    ax.barh(names, vals, xerr=np.nan_to_num(err), color="tab:orange")
    for i, r in enumerate(rows[::-1]):
        ax.text(0, i, f" n={r[1]}", va="center", fontsize=7)
    ax.set_xlabel(f"{result.concept} pixels added (fraction of image)")
    ax.set_title(f"Inserting {result.concept} at {result.layer}, by what is there")
    fig.tight_layout()
    return fig


def artifacts_figure(result, top: int = 20):
    """Left: the top units' artifact scores with their bootstrap intervals; right: the distance of
    ordinary samples after ablating the top-k units and k random units (intervals as error bars),
    beside the unedited generator's and, when measured, a baseline generator's (bands)."""
    score = result.score
    order = result.ranking[:top]
    fig = PngFigure(figsize=(9.5, 3.4))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    ci = getattr(result, "score_ci", None)
    yerr = None
    if ci is not None and len(order):
        lo, hi = ci[order, 0], ci[order, 1]
        yerr = np.abs(np.stack([score[order] - lo, hi - score[order]]))
    ax.bar(range(len(order)), score[order], color="tab:red", yerr=yerr, ecolor="0.3", capsize=2,
           error_kw={"lw": 0.8})
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(u) for u in order], rotation=90, fontsize=7)
    ax.set_ylabel("distance improvement")
    ax.set_xlabel("unit")
    level = result.settings.get("level", 0.95) if result.settings else 0.95
    ax.set_title(f"Artifact scores at {result.layer}" + (f" ({level:.0%} intervals)" if yerr is not None else ""))
    ax = axes[1]
    rem = result.removal
    if rem and rem.get("ks"):
        ks = np.array(rem["ks"])

        def band(value, interval, color, label):
            ax.axhline(value, color=color, lw=1, label=label)
            if interval is not None and np.all(np.isfinite(interval)):
                ax.axhspan(interval[0], interval[1], color=color, alpha=0.12, lw=0)

        def points(values, intervals, color, label, shift):
            values = np.asarray(values, dtype=float)
            err = None
            if intervals is not None:
                iv = np.asarray(intervals, dtype=float)
                err = np.abs(np.stack([values - iv[:, 0], iv[:, 1] - values]))
            ax.errorbar(ks + shift, values, yerr=err, marker="o", ms=4, capsize=3, color=color, label=label)
        band(rem["fd_original"], rem.get("fd_original_ci"), "k", "unedited")
        if "fd_baseline" in rem:
            band(rem["fd_baseline"], rem.get("fd_baseline_ci"), "tab:green", "baseline generator")
        step = 0.02 * max(1, ks.max() - ks.min())
        points(rem["fd_top"], rem.get("fd_top_ci"), "tab:red", "top artifact units", -step)
        if "fd_random_ci" in rem:
            points(rem["fd_random"], rem["fd_random_ci"], "gray", "random units", step)
        else:
            ax.errorbar(ks + step, rem["fd_random"], yerr=rem.get("fd_random_std"), marker="o", ms=4, capsize=3,
                        color="gray", label="random units (± sd)")
        ax.set_xticks(ks)
        ax.set_xlabel("units ablated")
        ax.set_ylabel("Fréchet distance")
        ax.set_title(f"{rem.get('n_eval', '?')} fresh samples", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _concept_colors(*dissections):
    """{concept: colour} by the concept's position in the label lists (the first dissection's, then any
    new labels of the others): one concept, one colour, in every panel, whatever the min IoU and the
    concepts shown."""
    labels = list(dict.fromkeys(c for d in dissections for c in d.labels[1:]))
    cmap, n = (colormaps["tab10"], 10) if len(labels) <= 10 else (colormaps["tab20"], 20)
    return {c: cmap(i % n) for i, c in enumerate(labels)}


def _units_top(*counts):
    """y-axis top for stacked unit counts: the tallest stack of any of the [per-layer counts], a margin, >= 1."""
    return 1.08 * max([sum(cc.values()) for c in counts for cc in c] + [1])


def _stacked_units(ax, layers, counts, colors):
    """Stack each layer's interpretable units by concept in label order; returns the concepts drawn."""
    bottom = np.zeros(len(layers))
    drawn = [c for c in colors if any(cc.get(c) for cc in counts)]
    for c in drawn:
        vals = np.array([cc.get(c, 0) for cc in counts])
        ax.bar(layers, vals, bottom=bottom, label=c, color=colors[c])
        bottom += vals
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def interpretable_units_figure(dissection, layers=None, min_iou: float = DEFAULT_MIN_IOU, ax=None, ymax=None, colors=None):
    """Stacked bars: interpretable units per concept for each layer.

    ymax: the y-axis top (to compare figures, see ``interpretable_units_figures``); colors: a
    {concept: colour} map shared with other charts (default: by this dissection's label order)."""
    layers = layers or dissection.layers
    counts = [dissection.concept_counts(l, min_iou) for l in layers]
    own = ax is None
    if own:  # else draw into the given axes
        fig = PngFigure(figsize=(max(4, 0.8 * len(layers) + 2), 3.5))
        ax = fig.subplots()
    if _stacked_units(ax, layers, counts, colors or _concept_colors(dissection)):
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_ylim(0, _units_top(counts) if ymax is None else ymax)
    ax.set_ylabel(f"interpretable units (IoU > {min_iou})")
    if own:
        fig.tight_layout()
        return fig
    return ax.figure


def interpretable_units_figures(dissections, min_iou: float = DEFAULT_MIN_IOU):
    """One ``interpretable_units_figure`` per dissection, on one y range and one concept colour map,
    so that a model with few interpretable units looks it beside one with many."""
    dissections = list(dissections)
    top = _units_top(*([d.concept_counts(l, min_iou) for l in d.layers] for d in dissections))
    colors = _concept_colors(*dissections)
    return [interpretable_units_figure(d, min_iou=min_iou, ymax=top, colors=colors) for d in dissections]


def unit_iou_figure(dissection, layer: str, unit: int, top: int = 10, min_iou: float = DEFAULT_MIN_IOU):
    """A unit's IoU with its best concepts (horizontal bars); the dashed line is the ``min_iou`` cut-off."""
    iou = dissection.iou(layer)[unit]
    order = [c for c in descending(iou) if c > 0][:top]
    fig = PngFigure(figsize=(3.4, 0.22 * len(order) + 0.9))
    ax = fig.subplots()
    ax.barh([dissection.labels[c] for c in order][::-1], iou[order][::-1], color="tab:blue")
    ax.axvline(min_iou, color="gray", lw=0.8, ls="--", label=f"interpretable (IoU > {min_iou:g})")
    ax.legend(fontsize=6, loc="lower right")
    ax.set_xlabel("IoU")
    ax.set_title(f"{layer} unit {unit}", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def unit_histogram_figure(values, threshold: float, unit: int, bins: int = 50):
    """Histogram of a unit's (upsampled) activations with its threshold marked."""
    fig = PngFigure(figsize=(3.4, 2.2))
    ax = fig.subplots()
    ax.hist(np.asarray(values).ravel(), bins=bins, color="tab:gray", log=True)
    ax.axvline(threshold, color="tab:red", lw=1, label="threshold")
    ax.set_xlabel("activation")
    ax.set_ylabel("pixels")
    ax.set_title(f"unit {unit}: activations on its top samples", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def ranking_figure(scores, units_shown, selected, concept: str, metric: str):
    """Bars of a ranking (units in rank order), the selected ones highlighted."""
    scores = np.asarray(scores)
    fig = PngFigure(figsize=(max(4, 0.2 * len(units_shown) + 1), 2.6))
    ax = fig.subplots()
    colors = ["tab:orange" if u in selected else "tab:blue" for u in units_shown]
    ax.bar(range(len(units_shown)), scores[list(units_shown)], color=colors)
    ax.set_xticks(range(len(units_shown)))
    ax.set_xticklabels([str(u) for u in units_shown], rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_xlabel("unit (selected in orange)")
    ax.legend(handles=[Patch(color="tab:orange", label="selected"), Patch(color="tab:blue", label="not selected")],
              fontsize=6, loc="upper right")
    ax.set_title(f"units by {metric} for {concept}", fontsize=9)
    fig.tight_layout()
    return fig


# -- pictures and comparisons: the figure notebooks and the HTML report ------------------------

def image_grid_figure(rows, row_labels=None, col_labels=None, title=None, cell: float = 1.05,
                      label_width: float = 1.5):
    """Rows of pictures, one axes per picture (no ticks), labels on the left and on top.

    rows: a list of (N,H,W,3) uint8 arrays (or lists of (H,W,3)); rows may differ in length."""
    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("image_grid_figure needs at least one row with one picture")
    ncols = max(len(r) for r in rows)
    left = label_width if row_labels is not None else 0.1
    top = (0.45 if title else 0.05) + (0.3 if col_labels is not None else 0)
    fig = PngFigure(figsize=(left + cell * ncols, top + cell * len(rows) + 0.05))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(r):
                ax.imshow(np.asarray(r[j]), interpolation="nearest")
            else:
                ax.set_facecolor("none")
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    if col_labels is not None:
        for j, text in enumerate(col_labels[:ncols]):
            axes[0, j].set_title(text, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    W, H = fig.get_size_inches()
    fig.subplots_adjust(left=left / W, right=1 - 0.05 / W, bottom=0.05 / H, top=1 - top / H,
                        wspace=0.04, hspace=0.06)
    return fig


def unit_gallery_figure(gallery: dict, dissection, layer: str, rows, title=None, dim: float = 0.35):
    """Top-activating samples of units, darkened outside each unit's mask (its top-1% region), and
    under each unit the same samples darkened outside the segmenter's mask of the concept (outlined
    in another colour), so that a reader sees how far the unit's region is the concept's.

    gallery: ``Session.unit_gallery(layer, units, k)`` (entries without ``labels`` show the unit
    row alone); rows: [(concept, unit)] in display order, each labelled with the unit's IoU."""
    from gandissect_widgets.engine.imaging import overlay_mask
    iou = dissection.iou(layer)
    pics, labels = [], []
    for concept, unit in rows:
        entry = gallery[int(unit)]
        images, masks, _ = entry
        c = dissection.concept_index(concept)
        pics.append(overlay_mask(images, masks, dim=dim))
        labels.append(f"{concept}\n{layer} unit {int(unit)}\nIoU {iou[int(unit), c]:.3f}")
        if hasattr(entry, "concept_mask"):
            pics.append(overlay_mask(images, entry.concept_mask(c), dim=dim, color=CONCEPT_OUTLINE))
            labels.append(f"segmenter's\n{concept}")
    k = max(len(p) for p in pics)
    return image_grid_figure(pics, labels, [f"top sample {i + 1}" for i in range(k)],
                             title or f"Top units at {layer}: unit's top-1% mask (yellow), concept's mask below (blue)")


CONCEPT_OUTLINE = (0, 200, 255)  # the segmenter's concept masks; units' masks are outlined in yellow


def compare_dissections_figure(dissections: dict, layers=None, min_iou: float = DEFAULT_MIN_IOU):
    """Two (or more) dissections side by side: interpretable units per concept for each layer
    (stacked bars, one panel per dissection, shared y axis and concept colours), and each layer's
    units sorted by their best IoU (last panel; the dashed line is ``min_iou``).

    dissections: {name: Dissection}; layers: a list for all of them, or {name: [layers]}."""
    names = list(dissections)
    if not names:
        raise ValueError("compare_dissections_figure needs at least one dissection")
    lay = {n: list((layers.get(n) if isinstance(layers, dict) else layers) or dissections[n].layers) for n in names}
    counts = {n: [dissections[n].concept_counts(l, min_iou) for l in lay[n]] for n in names}
    colors = _concept_colors(*dissections.values())
    width = sum(max(2.2, 0.6 * len(lay[n]) + 1) for n in names) + 3.6
    fig = PngFigure(figsize=(width, 3.6))
    axes = fig.subplots(1, len(names) + 1, gridspec_kw={"width_ratios": [max(2.2, 0.6 * len(lay[n]) + 1)
                                                                         for n in names] + [3.2]})
    top = _units_top(*counts.values())
    drawn = set()
    for ax, n in zip(axes, names):
        drawn.update(_stacked_units(ax, lay[n], counts[n], colors))
        ax.set_ylim(0, top)
        ax.set_title(n, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel(f"interpretable units (IoU > {min_iou})", fontsize=8)
    handles = [Patch(color=colors[c], label=c) for c in colors if c in drawn]
    if handles:
        axes[len(names) - 1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax = axes[-1]
    styles = ["-", "--", ":", "-."]
    for i, n in enumerate(names):
        for j, l in enumerate(lay[n]):
            ious = dissections[n].unit_ious(l)
            ious = ious[descending(ious)]
            x = (np.arange(len(ious)) + 0.5) / len(ious)
            ax.plot(x, ious, styles[i % len(styles)], color=colormaps["viridis"](j / max(1, len(lay[n]) - 1)),
                    lw=1.2, label=f"{n}: {l}")
    ax.axhline(min_iou, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("fraction of the layer's units (by rank)", fontsize=8)
    ax.set_ylabel("best IoU", fontsize=8)
    ax.set_title("units sorted by best IoU", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, ncol=1 if sum(len(v) for v in lay.values()) <= 6 else 2, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def context_table_figure(results, min_count: int = 5):
    """The contextual-insertion table as a heat map: rows are what the image had where the units were
    inserted, columns the inserted concepts; each cell shows the mean fraction of image pixels of the
    concept added, ± the 95% half-width, and the number of insertions.

    results: ``ContextResult`` objects or their ``to_json()`` dicts (as in ``context.json``)."""
    docs = [r.to_json() if hasattr(r, "to_json") else r for r in results]
    if not docs:
        raise ValueError("context_table_figure needs at least one contextual-insertion result")
    cols = [f"{d['concept']}\n({d['layer']}, {len(d['units'])} unit{'s' if len(d['units']) != 1 else ''})"
            for d in docs]
    tables = [{row["context"]: row for row in d["table"] if row["count"] >= min_count} for d in docs]
    contexts = sorted({c for t in tables for c in t},
                      key=lambda c: -max(t[c]["added_fraction"] if c in t else -np.inf for t in tables))
    vals = np.full((len(contexts), len(docs)), np.nan)
    for j, t in enumerate(tables):
        for i, c in enumerate(contexts):
            if c in t:
                vals[i, j] = t[c]["added_fraction"]
    fig = PngFigure(figsize=(1.9 * len(docs) + 1.6, 0.42 * max(3, len(contexts)) + 1.2))
    ax = fig.subplots()
    finite = vals[np.isfinite(vals)]
    vmax = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu_r" if (finite < 0).any() else "Oranges",
              vmin=-vmax if (finite < 0).any() else 0, vmax=vmax, aspect="auto")
    for j, t in enumerate(tables):
        for i, c in enumerate(contexts):
            if c in t:
                row = t[c]
                half = row.get("ci95")
                pm = f" ± {half:.3f}" if half is not None and np.isfinite(half) else ""
                dark = abs(row["added_fraction"]) > 0.6 * vmax
                ax.text(j, i, f"{row['added_fraction']:+.3f}{pm}\nn={row['count']}", ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
            else:
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="gray")
    ax.set_xticks(range(len(docs)))
    ax.set_xticklabels(cols, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(contexts)))
    ax.set_yticklabels(contexts, fontsize=8)
    ax.set_ylabel("what was there (label at the cell's centre)", fontsize=8)
    ax.set_title("fraction of image pixels of the concept added by inserting its units in one cell",
                 fontsize=8, pad=28)
    fig.tight_layout()
    return fig


# -- colour bars: keys to the pictures the engine draws (engine.imaging) -------------------------

def _colorbar_figure(cmap, vmin: float, vmax: float, label: str):
    """A small horizontal colour bar, ticked at its ends."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    fig = PngFigure(figsize=(3.2, 0.8))
    ax = fig.subplots()
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=ax, orientation="horizontal")
    bar.set_ticks([vmin, vmax], labels=[f"{vmin:.4g}", f"{vmax:.4g}"])
    bar.set_label(label, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _heatmap_cmap():
    from matplotlib.colors import LinearSegmentedColormap
    return LinearSegmentedColormap.from_list("gandissect_heatmap", np.asarray(HEATMAP_STOPS) / 255.0)


def heatmap_colorbar_figure(vmin: float, vmax: float, label: str = "activation"):
    """Key to ``imaging.heatmap(values, vmin, vmax)``: the same ramp from vmin to vmax (a flat
    range spans 1 above vmin, as heatmap maps it)."""
    vmin = float(vmin)
    vmax = float(vmax) if vmax > vmin else vmin + 1.0
    return _colorbar_figure(_heatmap_cmap(), vmin, vmax, label)


def difference_colorbar_figure(gain: float = 2.0):
    """Key to ``imaging.difference(a, b, gain)``: grey = mean |a - b| per channel x gain, so white
    is a mean difference of 255 / gain (0-255 pixel units) or more."""
    if not gain > 0:
        raise ValueError(f"gain must be positive, got {gain}")
    return _colorbar_figure(colormaps["gray"], 0.0, 255.0 / gain, "mean |difference| per channel (0-255)")


__all__ += ["unit_iou_figure", "unit_histogram_figure", "ranking_figure",
            "heatmap_colorbar_figure", "difference_colorbar_figure"]
__all__ += ["image_grid_figure", "unit_gallery_figure", "compare_dissections_figure", "context_table_figure"]
