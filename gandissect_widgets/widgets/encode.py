"""The one place where pictures become bytes for the browser (PNG or JPEG, optionally enlarged)."""
from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

__all__ = ["encode_image", "figure_png", "figure_pngs", "enlarge", "THEMES"]


def enlarge(arr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement: small generator outputs stay crisp on screen."""
    if scale <= 1:
        return arr
    return np.repeat(np.repeat(arr, scale, axis=0), scale, axis=1)


def encode_image(arr: np.ndarray, fmt: str = "png", scale: int = 1, quality: int = 90) -> bytes:
    """(H,W,3) or (H,W,4) uint8 -> PNG/JPEG bytes."""
    arr = np.ascontiguousarray(enlarge(np.asarray(arr, dtype=np.uint8), scale))
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


# Figures are made and drawn one at a time: views draw their charts in threads of their own, and
# matplotlib's text layout is not thread-safe (its mathtext parser, for log-scale tick labels, shares
# a cache: two threads parsing at once fail with "Unknown symbol: \\mathdefault" or a ParseException),
# and making a figure lays text out too.  Reentrant: ``drawn`` holds it over both.
_DRAWING = threading.RLock()


def drawing():
    """The lock that figures are made and drawn under (reentrant), for code that makes several."""
    return _DRAWING


def drawn(make_figure, *args, **kwargs) -> tuple[bytes, bytes]:
    """``figure_pngs(make_figure(*args, **kwargs))``, the figure made and drawn under one lock
    (what a view calls from its threads)."""
    with _DRAWING:
        return figure_pngs(make_figure(*args, **kwargs))


def figure_png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    with _DRAWING:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# The ink of charts in JupyterLab's light and dark themes (its --jp-ui-font-color1 for text,
# --jp-ui-font-color2 for axes and ticks, --jp-layout-color1 and --jp-border-color1 for legend
# boxes); the background is transparent, so the cell's own colour shows through.
THEMES = {
    "light": dict(text=(0, 0, 0, 0.87), axes=(0, 0, 0, 0.54), legend="#ffffff", edge="#bdbdbd"),
    "dark": dict(text=(1, 1, 1, 0.87), axes=(1, 1, 1, 0.54), legend="#212121", edge="#616161"),
}


def _ink(color) -> bool:
    """Is ``color`` a chart's default ink (black or a dark grey), not a data colour?"""
    from matplotlib.colors import to_rgba
    r, g, b, _ = to_rgba(color)
    return max(r, g, b) < 0.35 and max(r, g, b) - min(r, g, b) < 0.05


def theme_figure(fig, theme: str):
    """Recolour ``fig``'s text, axes, ticks and legend boxes for a JupyterLab theme (``THEMES``),
    its background transparent; what the data is drawn in is left as it is, so that a colour means
    the same in both themes."""
    from matplotlib.text import Text
    ink = THEMES[theme]
    fig.patch.set_facecolor("none")
    for ax in fig.axes:
        ax.set_facecolor("none")
        for spine in ax.spines.values():
            spine.set_edgecolor(ink["axes"])
        ax.tick_params(which="both", color=ink["axes"], labelcolor=ink["text"])
        legend = ax.get_legend()
        if legend is not None:
            frame = legend.get_frame()  # opaque: what it covers does not show through its text
            frame.set_alpha(1.0)
            frame.set_facecolor(ink["legend"])
            frame.set_edgecolor(ink["edge"])
    for text in fig.findobj(Text):
        if getattr(text, "_gd_ink", False) or _ink(text.get_color()):
            text._gd_ink = True  # drawn in ink: ink again in the other theme
            text.set_color(ink["text"])
    return fig


def figure_pngs(fig, dpi: int = 90) -> tuple[bytes, bytes]:
    """(light, dark): ``fig`` as PNGs for JupyterLab's light and dark themes (``theme_figure``):
    the same data colours on a transparent background, text and axes in each theme's ink.  Both
    have the same size and layout (colours do not move anything): one tight box for both."""
    from matplotlib import rcParams
    out = []
    with _DRAWING:
        theme_figure(fig, "light")
        fig.draw_without_rendering()
        box = fig.get_tightbbox().padded(rcParams["savefig.pad_inches"])
        for theme in ("light", "dark"):
            theme_figure(fig, theme)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi, bbox_inches=box, facecolor="none", edgecolor="none")
            out.append(buf.getvalue())
    return tuple(out)
