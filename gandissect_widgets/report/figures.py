"""Matplotlib figures of dissection and causal results, and ``save_figure``, the one way to write them.

Figures are ``matplotlib.figure.Figure`` objects, not pyplot state: safe in threads and CLIs,
and shown by Jupyter like any figure.
"""
from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from gandissect_widgets.engine.io import atomic_write_bytes

__all__ = ["save_figure", "removal_curve_figure", "ace_ranking_figure", "alpha_figure", "context_figure",
           "artifacts_figure", "interpretable_units_figure"]


def save_figure(fig, path, formats=("png", "pdf"), dpi=150):
    """Write ``fig`` as ``path.<fmt>`` for each format, atomically; returns the paths written."""
    base, ext = os.path.splitext(os.fspath(path))
    if ext.lstrip(".") in ("png", "pdf", "svg"):
        formats = (ext.lstrip("."),)
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
    fig = Figure(figsize=(5, 3.6))
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


def ace_ranking_figure(ace, concept: str, layer: str, top: int = 30):
    ace = np.asarray(ace)
    order = np.lexsort((np.arange(len(ace)), -ace))[:top]
    fig = Figure(figsize=(max(4, 0.22 * len(order) + 1), 3))
    ax = fig.subplots()
    ax.bar(range(len(order)), ace[order], color="tab:green")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(u) for u in order], rotation=90, fontsize=7)
    ax.set_xlabel("unit")
    ax.set_ylabel("single-unit ACE")
    ax.set_title(f"{concept}: units of {layer} by causal effect")
    fig.tight_layout()
    return fig


def alpha_figure(alpha, concept: str, layer: str, top: int = 40):
    alpha = np.asarray(alpha)
    order = np.lexsort((np.arange(len(alpha)), -alpha))[:top]
    fig = Figure(figsize=(max(4, 0.2 * len(order) + 1), 3))
    ax = fig.subplots()
    ax.bar(range(len(order)), alpha[order], color="tab:purple")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(u) for u in order], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("learned alpha")
    ax.set_xlabel("unit")
    ax.set_title(f"Optimised intervention for {concept} at {layer}")
    fig.tight_layout()
    return fig


def context_figure(result, min_count: int = 5):
    rows = result.table(min_count)
    fig = Figure(figsize=(5, 0.32 * max(3, len(rows)) + 1))
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
    score = result.score
    order = result.ranking[:top]
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    ax = axes[0]
    ax.bar(range(len(order)), score[order], color="tab:red")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([str(u) for u in order], rotation=90, fontsize=7)
    ax.set_ylabel("distance improvement")
    ax.set_xlabel("unit")
    ax.set_title(f"Artifact scores at {result.layer}")
    ax = axes[1]
    rem = result.removal
    if rem and rem.get("ks"):
        ks = rem["ks"]
        ax.axhline(rem["fd_original"], color="k", lw=1, label="original")
        ax.plot(ks, rem["fd_top"], marker="o", color="tab:red", label="top artifact units")
        m, s = np.array(rem["fd_random"]), np.array(rem["fd_random_std"])
        ax.errorbar(ks, m, yerr=s, marker="o", color="gray", label="random units")
        ax.set_xlabel("units ablated")
        ax.set_ylabel("Fréchet distance")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def interpretable_units_figure(dissection, layers=None, min_iou: float = 0.04, ax=None):
    """Stacked bars: interpretable units per concept for each layer."""
    layers = layers or dissection.layers
    counts = [dissection.concept_counts(l, min_iou) for l in layers]
    concepts = sorted({c for cc in counts for c in cc}, key=lambda c: -sum(cc.get(c, 0) for cc in counts))
    own = ax is None
    if own:  # else draw into the given axes
        fig = Figure(figsize=(max(4, 0.8 * len(layers) + 2), 3.5))
        ax = fig.subplots()
    bottom = np.zeros(len(layers))
    cmap = colormaps["tab20"]
    for i, c in enumerate(concepts):
        vals = np.array([cc.get(c, 0) for cc in counts])
        ax.bar(layers, vals, bottom=bottom, label=c, color=cmap(i % 20))
        bottom += vals
    ax.set_ylabel(f"interpretable units (IoU > {min_iou})")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    if own:
        fig.tight_layout()
        return fig
    return ax.figure


def unit_iou_figure(dissection, layer: str, unit: int, top: int = 10):
    """A unit's IoU with its best concepts (horizontal bars)."""
    iou = dissection.iou(layer)[unit]
    order = [c for c in np.argsort(-iou, kind="stable") if c > 0][:top]
    fig = Figure(figsize=(3.4, 0.22 * len(order) + 0.9))
    ax = fig.subplots()
    ax.barh([dissection.labels[c] for c in order][::-1], iou[order][::-1], color="tab:blue")
    ax.axvline(0.04, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("IoU")
    ax.set_title(f"{layer} unit {unit}", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def unit_histogram_figure(values, threshold: float, unit: int, bins: int = 50):
    """Histogram of a unit's (upsampled) activations with its threshold marked."""
    fig = Figure(figsize=(3.4, 2.2))
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
    fig = Figure(figsize=(max(4, 0.2 * len(units_shown) + 1), 2.6))
    ax = fig.subplots()
    colors = ["tab:orange" if u in selected else "tab:blue" for u in units_shown]
    ax.bar(range(len(units_shown)), scores[list(units_shown)], color=colors)
    ax.set_xticks(range(len(units_shown)))
    ax.set_xticklabels([str(u) for u in units_shown], rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_xlabel("unit (selected in orange)")
    ax.set_title(f"units by {metric} for {concept}", fontsize=9)
    fig.tight_layout()
    return fig
