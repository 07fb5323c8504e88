"""The one upsampling of activation maps to the segmentation grid (DESIGN §3).

Thresholds, IoU, top-k and every visualisation go through this module so that a mask drawn on
an image is exactly the mask that was counted.  It is bilinear with ``align_corners=False``
(half-pixel centres, edges clamped), i.e. ``F.interpolate(r, size, mode="bilinear",
align_corners=False)`` up to rounding, computed as two two-tap passes: along the width, then
along the height.  Every output value is ``h[i0] * w0 + h[i1] * w1`` of the same operands whichever
function computes it, so the sparse readers below agree with ``upsample`` bit for bit:

- ``upsample(r, size)``: the whole map.
- ``upsample_above(r, size, low)``: only the pixels above a per-unit floor, found without
  computing the others (a bilinear value never exceeds the largest of the four sources it
  blends), which is what a top-1% dissection needs: a few percent of the pixels.
- ``upsample_max(r, size)``: each map's maximum, read at the corner pixels of the interpolation
  cells (a bilinear function on a grid peaks at a corner of each cell).
- ``upsample_at(r, size, rows, cols)``: values on a chosen sub-grid of rows and columns.
- ``upsample_pixels(r, size, pixels)``: values at chosen pixels, different for each sample.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["upsample", "upsample_above", "upsample_max", "upsample_at", "upsample_pixels", "pool_mask"]


@functools.lru_cache(maxsize=128)
def _taps(n_in: int, n_out: int, device: str, dtype: torch.dtype):
    """1-D linear interpolation with half-pixel centres, edges clamped: for every output index,
    the source indices (i0, i1) and weights (w0, w1)."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0.double()
    w1 = torch.where(i1 == i0, torch.zeros_like(w1), w1)
    dev = torch.device(device)
    return i0.to(dev), i1.to(dev), (1 - w1).to(dev, dtype), w1.to(dev, dtype)


@functools.lru_cache(maxsize=128)
def _cells(n_in: int, n_out: int, device: str):
    """Output indices grouped into cells that blend the same two sources: the first index of
    each cell (G,), and the cell's indices padded with -1 to a rectangle (G, P)."""
    i0, i1, _, _ = _taps(n_in, n_out, "cpu", torch.float64)
    new = torch.ones(n_out, dtype=torch.bool)
    new[1:] = (i0[1:] != i0[:-1]) | (i1[1:] != i1[:-1])
    first = torch.nonzero(new).squeeze(1)
    last = torch.cat([first[1:] - 1, torch.tensor([n_out - 1])])
    P = int((last - first).max()) + 1
    members = first[:, None] + torch.arange(P)[None]
    members = torch.where(members <= last[:, None], members, torch.full_like(members, -1))
    dev = torch.device(device)
    return first.to(dev), last.to(dev), members.to(dev)


@functools.lru_cache(maxsize=128)
def _one_hot(index: tuple, n_in: int, device: str, dtype: torch.dtype):
    """(n_in, len(index)) matrix whose column o picks source index[o]."""
    m = torch.zeros(n_in, len(index), dtype=dtype)
    m[torch.tensor(index), torch.arange(len(index))] = 1
    return m.to(device)


def _selects(r) -> bool:
    """Whether ``_pick`` must select rather than multiply for maps computed from ``r``: off the
    CPU, where float32 products may round (``torch.set_float32_matmul_precision``), or where
    ``r`` holds inf or NaN (a product would spread it over the whole row)."""
    return (r.device.type != "cpu" or torch.get_float32_matmul_precision() != "highest"
            or not bool(torch.isfinite(r).all()))


def _pick(x, index, dim, select):
    """``x.index_select(dim, index)`` for dim -1 or -2.  On the CPU, where selecting along the
    last axis is slow, as a product with a one-hot matrix: exact, every output is one value
    times 1 plus zeros (unless ``select``, see ``_selects``)."""
    if select:
        return x.index_select(dim, index)
    m = _one_hot(tuple(index.tolist()), x.shape[dim], str(x.device), x.dtype)
    return x @ m if dim == -1 else (m.t() @ x)


def _float(r):
    return r if r.dtype in (torch.float32, torch.float64) else r.float()


def _along_width(r, W, select, cols=None):
    """(..., h, w) -> (..., h, W) (or the chosen output columns)."""
    i0, i1, w0, w1 = _taps(r.shape[-1], W, str(r.device), r.dtype)
    if cols is not None:
        i0, i1, w0, w1 = i0[cols], i1[cols], w0[cols], w1[cols]
    return _pick(r, i0, -1, select) * w0 + _pick(r, i1, -1, select) * w1


def _along_height(x, H, select, rows=None):
    """(..., h, W) -> (..., H, W) (or the chosen output rows)."""
    i0, i1, w0, w1 = _taps(x.shape[-2], H, str(x.device), x.dtype)
    if rows is not None:
        i0, i1, w0, w1 = i0[rows], i1[rows], w0[rows], w1[rows]
    return _pick(x, i0, -2, select) * w0[:, None] + _pick(x, i1, -2, select) * w1[:, None]


def _size(size):
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise ValueError(f"upsampling needs a positive size, got {size}")
    return H, W


def upsample(r: torch.Tensor, size) -> torch.Tensor:
    """(N,C,h,w) -> (N,C,H,W) bilinear, align_corners=False; (C,h,w) -> (C,H,W)."""
    H, W = _size(size)
    if r.dim() == 3:
        return upsample(r[None], (H, W))[0]
    if tuple(r.shape[-2:]) == (H, W):
        return r
    r = _float(r)
    select = _selects(r)
    return _along_height(_along_width(r, W, select), H, select)


def upsample_at(r: torch.Tensor, size, rows=None, cols=None) -> torch.Tensor:
    """``upsample(r, size)[..., rows, :][..., cols]`` without computing the other pixels."""
    H, W = _size(size)
    r = _float(r)
    dev = r.device
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev)
    cols = None if cols is None else torch.as_tensor(cols, dtype=torch.long, device=dev)
    select = _selects(r)
    return _along_height(_along_width(r, W, select, cols), H, select, rows)


def upsample_pixels(r: torch.Tensor, size, pixels: torch.Tensor) -> torch.Tensor:
    """(N,C,h,w), flat pixel indices (N,S) of the (H,W) grid -> (N,C,S): the upsampled values
    of every channel at each sample's own pixels."""
    H, W = _size(size)
    r = _float(r)
    N, C, h, _ = r.shape
    x = _along_width(r, W, _selects(r)).reshape(N, C, h * W)
    i0, i1, w0, w1 = _taps(h, H, str(r.device), r.dtype)
    pixels = pixels.to(r.device).long()
    y, col = pixels // W, pixels % W
    a = x.gather(2, (i0[y] * W + col)[:, None].expand(-1, C, -1))
    b = x.gather(2, (i1[y] * W + col)[:, None].expand(-1, C, -1))
    return a * w0[y][:, None] + b * w1[y][:, None]


def upsample_max(r: torch.Tensor, size) -> torch.Tensor:
    """(N,C,h,w) -> (N,C): the maximum of each upsampled map, from the corner pixels of the
    interpolation cells only (equal to ``upsample(r, size).amax((2, 3))`` up to rounding)."""
    H, W = _size(size)
    r = _float(r)
    dev = str(r.device)
    rf, rl, _ = _cells(r.shape[-2], H, dev)
    cf, cl, _ = _cells(r.shape[-1], W, dev)
    rows = torch.unique(torch.cat([rf, rl]))
    cols = torch.unique(torch.cat([cf, cl]))
    select = _selects(r)
    return _along_height(_along_width(r, W, select, cols), H, select, rows).amax((-2, -1))


@functools.lru_cache(maxsize=128)
def _cell_tables(h: int, w: int, H: int, W: int, device: str, dtype: torch.dtype):
    """For the cells of the (H,W) grid (row cell g x column cell k): their source rows and
    columns, the weights of their rows (G,P) and columns (K,Q), NaN where a cell is padded (so
    padding never passes a comparison), and the flat pixel of each cell's slot (G*K, P*Q)."""
    rfirst, _, rmem = _cells(h, H, "cpu")
    cfirst, _, cmem = _cells(w, W, "cpu")
    ri0, ri1, rw0, rw1 = _taps(h, H, "cpu", dtype)
    ci0, ci1, cw0, cw1 = _taps(w, W, "cpu", dtype)
    nan = torch.tensor(float("nan"), dtype=dtype)

    def weights(mem, w):
        return torch.where(mem >= 0, w[mem.clamp(min=0)], nan)

    pix = rmem.clamp(min=0)[:, None, :, None] * W + cmem.clamp(min=0)[None, :, None, :]
    G, P, K, Q = rmem.shape + cmem.shape
    dev = torch.device(device)
    out = (ri0[rfirst], ri1[rfirst], ci0[cfirst], ci1[cfirst], weights(rmem, rw0), weights(rmem, rw1),
           weights(cmem, cw0), weights(cmem, cw1), pix.reshape(G * K, P * Q))
    return tuple(t.to(dev) for t in out)


def upsample_above(r: torch.Tensor, size, low: torch.Tensor):
    """The pixels of ``upsample(r, size)`` (N,C,H,W) whose value exceeds ``low[c]`` (C,).

    Returns ``(n, c, pixel, value)``: sample, channel, flat pixel index ``y * W + x`` and the
    value, equal bit for bit to ``upsample(r, size)[n, c].flatten()[pixel]``; in no particular
    order.  The output grid is cut into cells that blend the same four sources; a cell is
    interpolated only if the largest of its four sources exceeds the floor (a bilinear value is
    a convex combination of them), which for a top-1% floor is a small fraction of the cells.
    """
    H, W = _size(size)
    r = _float(r)
    N, C, h, w = r.shape
    a0, a1, b0, b1, rw0, rw1, cw0, cw1, pix = _cell_tables(h, w, H, W, str(r.device), r.dtype)
    G, P = rw0.shape
    K, Q = cw0.shape
    low = low.to(r.device, r.dtype)
    select = _selects(r)
    rows = (_pick(r, a0, -2, select), _pick(r, a1, -2, select))
    corners = torch.stack([_pick(x, b, -1, select) for x in rows for b in (b0, b1)], -1)  # (N,C,G,K,4)
    # the margin covers the rounding of a blend (a few units in the last place of the sources)
    bound = corners.amax(-1) + corners.abs().amax(-1) * 1e-6
    cell = torch.nonzero((bound > low.view(1, C, 1, 1)).view(-1)).squeeze(1)
    cs = corners.view(-1, 4)[cell]                                            # (M,4)
    gk = cell % (G * K)
    c = (cell // (G * K)) % C
    n = cell // (G * K * C)
    g, k = gk // K, gk % K
    wx0, wx1 = cw0[k], cw1[k]                                                 # (M,Q)
    # as in _along_width, then _along_height: the same products and sums, so the same bits
    h0 = cs[:, 0:1] * wx0 + cs[:, 1:2] * wx1
    h1 = cs[:, 2:3] * wx0 + cs[:, 3:4] * wx1
    v = h0[:, None, :] * rw0[g][:, :, None] + h1[:, None, :] * rw1[g][:, :, None]  # (M,P,Q)
    j = torch.nonzero((v > low[c].view(-1, 1, 1)).view(-1)).squeeze(1)
    m, pq = j // (P * Q), j % (P * Q)
    return n[m], c[m], pix[gk[m], pq], v.view(-1)[j]


def pool_mask(mask: torch.Tensor, size, mode: str = "max") -> torch.Tensor:
    """An image-resolution region (H,W) or (N,1,H,W) in [0,1] pooled to a layer grid (h,w).

    ``max`` marks every layer cell the region touches (GANPaint's default); ``mean`` gives the
    fraction of the cell covered.
    """
    m = torch.as_tensor(mask)
    squeeze = m.dim() == 2
    if squeeze:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    m = m.float()
    if mode == "max":
        out = F.adaptive_max_pool2d(m, tuple(size))
    elif mode == "mean":
        out = F.adaptive_avg_pool2d(m, tuple(size))
    else:
        raise ValueError(f"mask pooling must be 'max' or 'mean', got {mode!r}")
    return out[0, 0] if squeeze else out
