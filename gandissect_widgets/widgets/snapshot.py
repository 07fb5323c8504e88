"""A static picture of a view: its images laid out as the boxes lay them out.

Widgets render only where a live kernel or saved widget state is at hand; a notebook exported
without either (nbconvert, GitHub, a reader without the extension) falls back to the other
formats of the output.  Every view therefore puts a PNG of itself beside the widget in its
display bundle, and ``View.snapshot()`` freezes the current state into a cell on demand.
Text (labels, buttons) is not drawn: the pictures are what carries the result.
"""
from __future__ import annotations

import io

import ipywidgets as W
from PIL import Image

__all__ = ["compose", "snapshot_png"]

GAP = 6
MAX_WIDTH = 1400  # a row of boxes wraps beyond this many pixels


def _decode(png: bytes):
    try:
        return Image.open(io.BytesIO(png)).convert("RGB")
    except Exception:  # an empty or foreign value: nothing to draw
        return None


def _row(parts):
    """Side by side, wrapping into several rows past MAX_WIDTH."""
    rows, cur, width = [], [], 0
    for p in parts:
        if cur and width + GAP + p.width > MAX_WIDTH:
            rows.append(cur)
            cur, width = [], 0
        width += (GAP if cur else 0) + p.width
        cur.append(p)
    if cur:
        rows.append(cur)
    return _column([_join(r, horizontal=True) for r in rows])


def _column(parts):
    return _join(parts, horizontal=False)


def _join(parts, horizontal):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if horizontal:
        size = (sum(p.width for p in parts) + GAP * (len(parts) - 1), max(p.height for p in parts))
    else:
        size = (max(p.width for p in parts), sum(p.height for p in parts) + GAP * (len(parts) - 1))
    out = Image.new("RGB", size, (255, 255, 255))
    at = 0
    for p in parts:
        out.paste(p, (at, 0) if horizontal else (0, at))
        at += (p.width if horizontal else p.height) + GAP
    return out


def compose(widget):
    """PIL image of the visible ``W.Image`` descendants of ``widget`` (HBox and GridBox side by
    side, other boxes stacked), or None when there is no picture yet."""
    if isinstance(widget, W.Image):
        return _decode(widget.value) if widget.value else None
    if isinstance(widget, W.Box):
        if widget.layout is not None and widget.layout.display == "none":
            return None
        parts = [compose(c) for c in widget.children]
        parts = [p for p in parts if p is not None]
        return _row(parts) if isinstance(widget, (W.HBox, W.GridBox)) else _column(parts)
    return None


def snapshot_png(widget) -> bytes | None:
    img = compose(widget)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
