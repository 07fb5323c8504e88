"""The one place where pictures become bytes for the browser (PNG or JPEG, optionally enlarged)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["encode_image", "figure_png", "enlarge"]


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


def figure_png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
