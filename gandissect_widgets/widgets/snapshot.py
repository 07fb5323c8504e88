"""A static picture of a view: its images laid out as the boxes lay them out.

Widgets render only where a live kernel or saved widget state is at hand; a notebook exported
without either (nbconvert, GitHub, a reader without the extension) falls back to the other
formats of the output.  Every view therefore puts a PNG of itself beside the widget in its
display bundle, and ``View.snapshot()`` freezes the current state into a cell on demand.
Its pictures are drawn with the text a reader needs beside them: captions, unit labels and IoUs,
which units are switched (pressed toggles are drawn inverted), the controls' values.
"""
from __future__ import annotations

import html
import io
import re

import ipywidgets as W
from PIL import Image, ImageDraw, ImageFont

__all__ = ["compose", "snapshot_png"]

GAP = 6
MAX_WIDTH = 1400  # a row of boxes wraps beyond this many pixels
TEXT_WIDTH = 900  # text lines wrap beyond this many pixels
FONT_SIZE = 13
INK, PAPER = (20, 20, 20), (255, 255, 255)


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def plain_text(markup: str) -> str:
    """What an HTML widget reads as: tags dropped, entities decoded, blanks folded."""
    text = re.sub(r"<style.*?</style>|<script.*?</script>", " ", str(markup), flags=re.S | re.I)
    text = re.sub(r"<br\s*/?>|</p>|</tr>|</div>", "\n", text, flags=re.I)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def text_image(text: str, pressed: bool = False, boxed: bool = False):
    """``text`` drawn in lines (wrapped at TEXT_WIDTH); ``boxed``: framed like a button,
    ``pressed``: inverted, like a pressed toggle.  None for empty text."""
    text = text.strip()
    if not text:
        return None
    for glyph, plain in (("→", "->"), ("…", "..."), ("×", "x"), ("−", "-")):  # not in the default font
        text = text.replace(glyph, plain)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = []
    for para in text.splitlines():
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if line and probe.textlength(trial, font=font) > TEXT_WIDTH:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    pad = 4 if boxed else 1
    width = int(max(probe.textlength(l, font=font) for l in lines)) + 2 * pad
    step = FONT_SIZE + 4
    out = Image.new("RGB", (width, step * len(lines) + 2 * pad), INK if pressed else PAPER)
    draw = ImageDraw.Draw(out)
    for i, l in enumerate(lines):
        draw.text((pad, pad + i * step), l, fill=PAPER if pressed else INK, font=font)
    if boxed:
        draw.rectangle([0, 0, out.width - 1, out.height - 1], outline=(150, 150, 150))
    return out


def _control_text(w) -> str:
    """'description: value' of a control, as its readout shows it (choices by their labels)."""
    value = getattr(w, "label", None) if hasattr(w, "options") else w.value
    if isinstance(value, tuple):
        value = ", ".join(map(str, value))
    if isinstance(value, float):
        value = f"{value:g}"
    desc = getattr(w, "description", "")
    return f"{desc}: {value}" if desc else str(value)


def _decode(png: bytes):
    """The picture on white (transparent parts, such as the gaps of strips and the background
    of charts, show the paper)."""
    try:
        img = Image.open(io.BytesIO(png)).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, PAPER + (255,)), img).convert("RGB")
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


def compose(widget, pictures_only: bool = False):
    """PIL image of what ``widget`` shows: its visible pictures and texts (HBox and GridBox side
    by side, other boxes stacked), or None when nothing is there."""
    if getattr(widget, "layout", None) is not None and widget.layout.display == "none":
        return None
    if "gd-for-dark" in getattr(widget, "_dom_classes", ()):
        return None  # a chart's dark-theme copy (base.Chart): the picture is drawn for paper
    custom = getattr(widget, "snapshot_compose", None)
    if custom is not None:  # a box that lays its parts out itself (the ablation panel's samples)
        return custom(pictures_only)
    if isinstance(widget, W.Image):
        return _decode(widget.value) if widget.value else None
    if isinstance(widget, W.Box):
        parts = [compose(c, pictures_only) for c in widget.children]
        parts = [p for p in parts if p is not None]
        return _row(parts) if isinstance(widget, (W.HBox, W.GridBox)) else _column(parts)
    if pictures_only:
        return None
    if isinstance(widget, (W.HTML, W.Label, W.HTMLMath)):
        return text_image(plain_text(widget.value))
    if isinstance(widget, W.ToggleButton):
        return text_image(widget.description, pressed=bool(widget.value), boxed=True)
    if isinstance(widget, W.Button):
        return text_image(widget.description, pressed=widget.button_style == "primary", boxed=True)
    if isinstance(widget, (W.ValueWidget,)) and not isinstance(widget, (W.FloatProgress, W.IntProgress)):
        return text_image(_control_text(widget))
    return None


def snapshot_png(widget) -> bytes | None:
    if compose(widget, pictures_only=True) is None:
        return None  # nothing rendered yet: no picture to show
    img = compose(widget)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
