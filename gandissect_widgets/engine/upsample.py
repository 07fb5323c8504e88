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

__all__ = ["upsample", "upsample_above", "upsample_above_grouped", "upsample_max", "upsample_at", "upsample_pixels", "pool_mask"]


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
    of every channel at each sample's own pixels, from their four sources only."""
    H, W = _size(size)
    r = _float(r)
    N, C, h, w = r.shape
    dev = r.device
    pixels = pixels.to(dev).long()
    y, x = pixels // W, pixels % W
    i0, i1, w0, w1 = (t[y] for t in _taps(h, H, str(dev), r.dtype))
    j0, j1, v0, v1 = (t[x] for t in _taps(w, W, str(dev), r.dtype))
    v0, v1 = v0[:, None], v1[:, None]
    flat = r.reshape(N, C, h * w)

    def source(row, col):
        return flat.gather(2, (row * w + col)[:, None].expand(-1, C, -1))

    # as in _along_width, then _along_height: the same products and sums, so the same bits
    top = source(i0, j0) * v0 + source(i0, j1) * v1
    bottom = source(i1, j0) * v0 + source(i1, j1) * v1
    return top * w0[:, None] + bottom * w1[:, None]


def upsample_max(r: torch.Tensor, size) -> torch.Tensor:
    """(N,C,h,w) -> (N,C): the maximum of each upsampled map, from the corner pixels of the
    interpolation tiles only (equal to ``upsample(r, size).amax((2, 3))`` up to rounding)."""
    H, W = _size(size)
    r = _float(r)
    rows, cols = (_corners(n, size) for n, size in ((r.shape[-2], H), (r.shape[-1], W)))
    select = _selects(r)
    return _along_height(_along_width(r, W, select, cols), H, select, rows).amax((-2, -1))


@functools.lru_cache(maxsize=128)
def _tiles(n_in: int, n_out: int):
    """Output indices cut into tiles that blend the same two sources and hold at most
    ceil(n_out / n_in) indices (a cell longer than that, at a clamped edge, is cut in two):
    the tiles' sources (G,), (G,) and their indices padded with -1 to a rectangle (G, P)."""
    i0, i1, _, _ = _taps(n_in, n_out, "cpu", torch.float64)
    most = max(1, -(-n_out // n_in))
    tiles, run = [], [0]
    for o in range(1, n_out):
        if i0[o] == i0[o - 1] and i1[o] == i1[o - 1] and len(run) < most:
            run.append(o)
        else:
            tiles.append(run)
            run = [o]
    tiles.append(run)
    P = max(len(t) for t in tiles)
    members = torch.tensor([t + [-1] * (P - len(t)) for t in tiles], dtype=torch.long)
    first = members[:, 0]
    return i0[first], i1[first], members


def _corners(n_in: int, n_out: int) -> list:
    """The first and last output index of every tile: where a bilinear map peaks along an axis."""
    _, _, members = _tiles(n_in, n_out)
    last = members.max(1).values
    return sorted(set(members[:, 0].tolist()) | set(last.tolist()))


@functools.lru_cache(maxsize=128)
def _tile_tables(h: int, w: int, H: int, W: int, device: str, dtype: torch.dtype):
    """For the tiles of the (H,W) grid (row tile g x column tile k): their source rows and
    columns, the weights of their rows (G,P) and columns (K,Q), NaN where a tile is padded (so
    padding never passes a comparison), and the flat pixel of each tile's slot (G*K, P*Q)."""
    ra0, ra1, rmem = _tiles(h, H)
    ca0, ca1, cmem = _tiles(w, W)
    _, _, rw0, rw1 = _taps(h, H, "cpu", dtype)
    _, _, cw0, cw1 = _taps(w, W, "cpu", dtype)
    nan = torch.tensor(float("nan"), dtype=dtype)

    def weights(mem, wt):
        return torch.where(mem >= 0, wt[mem.clamp(min=0)], nan)

    pix = rmem.clamp(min=0)[:, None, :, None] * W + cmem.clamp(min=0)[None, :, None, :]
    G, P, K, Q = rmem.shape + cmem.shape
    dev = torch.device(device)
    out = (ra0, ra1, ca0, ca1, weights(rmem, rw0), weights(rmem, rw1), weights(cmem, cw0),
           weights(cmem, cw1), pix.reshape(G * K, P * Q))
    return tuple(t.to(dev) for t in out)


def upsample_above(r: torch.Tensor, size, low: torch.Tensor):
    """The pixels of ``upsample(r, size)`` (N,C,H,W) whose value exceeds ``low[c]`` (C,).

    Returns ``(n, c, pixel, value)``: sample, channel, flat pixel index ``y * W + x`` and the
    value, equal bit for bit to ``upsample(r, size)[n, c].flatten()[pixel]``; in no particular
    order.  The output grid is cut into tiles that blend the same four sources; a tile is
    interpolated only if the largest of its four sources exceeds the floor (a bilinear value is
    a convex combination of them), which for a top-1% floor is a small fraction of the tiles.
    """
    n, c, m, pix, v = upsample_above_grouped(r, size, low)
    return n[m], c[m], pix, v


def upsample_above_grouped(r: torch.Tensor, size, low: torch.Tensor):
    """``upsample_above`` grouped by tile, for callers that work per tile: ``(n, c, m, pixel,
    value)`` where pixel i lies in tile ``m[i]``, of sample ``n[m[i]]`` and channel ``c[m[i]]``."""
    H, W = _size(size)
    r = _float(r)
    N, C, h, w = r.shape
    if r.numel() == 0:
        none = torch.zeros(0, dtype=torch.long, device=r.device)
        return none, none, none, none, torch.zeros(0, dtype=r.dtype, device=r.device)
    a0, a1, b0, b1, rw0, rw1, cw0, cw1, pix = _tile_tables(h, w, H, W, str(r.device), r.dtype)
    G, P = rw0.shape
    K, Q = cw0.shape
    low = low.to(r.device, r.dtype)
    select = _selects(r)
    rows = torch.maximum(_pick(r, a0, -2, select), _pick(r, a1, -2, select))        # (N,C,G,w)
    bound = torch.maximum(_pick(rows, b0, -1, select), _pick(rows, b1, -1, select))  # (N,C,G,K)
    # a blend may round above its largest source by a few units in the last place of the
    # sources: lower the floor by a margin that covers it
    if select:
        mag = r.abs()
        mag = torch.where(torch.isfinite(mag), mag, torch.zeros((), dtype=mag.dtype, device=mag.device)).amax((0, 2, 3))
    else:
        mag = torch.maximum(r.amax((0, 2, 3)), r.amin((0, 2, 3)).neg_())
    floor = low - mag * 1e-6
    tile = torch.nonzero((bound > floor.view(1, C, 1, 1)).view(-1)).squeeze(1)
    nc = tile // (G * K)
    gk = tile - nc * (G * K)
    c = nc % C
    g = gk // K
    k = gk - g * K
    flat = r.reshape(-1)

    def pick(table, i):
        return table.index_select(0, i)

    top, bottom = nc * (h * w) + pick(a0, g) * w, nc * (h * w) + pick(a1, g) * w
    left, right = pick(b0, k), pick(b1, k)
    c00, c01 = pick(flat, top + left)[:, None], pick(flat, top + right)[:, None]
    c10, c11 = pick(flat, bottom + left)[:, None], pick(flat, bottom + right)[:, None]
    wx0, wx1 = pick(cw0, k), pick(cw1, k)                                     # (M,Q)
    # as in _along_width, then _along_height: the same products and sums, so the same bits
    h0 = c00 * wx0 + c01 * wx1
    h1 = c10 * wx0 + c11 * wx1
    v = h0[:, None, :] * pick(rw0, g)[:, :, None]
    v += h1[:, None, :] * pick(rw1, g)[:, :, None]                          # (M,P,Q)
    j = torch.nonzero((v > pick(low, c).view(-1, 1, 1)).view(-1)).squeeze(1)
    PQ = P * Q
    m = j >> (PQ.bit_length() - 1) if PQ & (PQ - 1) == 0 else j // PQ
    # slot j of tile m is slot j - m*P*Q of its tile pattern gk[m]
    shift = (gk - torch.arange(gk.numel(), device=gk.device)) * PQ
    return nc // C, c, m, pix.view(-1).index_select(0, pick(shift, m).add_(j)), v.view(-1).index_select(0, j)


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
