"""The one upsampling of activation maps to the segmentation grid (DESIGN §3).

Thresholds, IoU, top-k and every visualisation go through this module so that a mask drawn on
an image is exactly the mask that was counted.  It is bilinear with ``align_corners=False``
(half-pixel centres, edges clamped), i.e. ``F.interpolate(r, size, mode="bilinear",
align_corners=False)`` up to rounding, computed as two two-tap passes: along the width, then
along the height.  Every output value is ``h[i0] * w0 + h[i1] * w1`` of the same operands whichever
function computes it, so the sparse readers below agree with ``upsample`` bit for bit:

- ``upsample(r, size)``: the whole map.
- ``upsample_columns(r, size, low)``: the columns of interpolation cells that may hold pixels
  above a per-unit floor, found without computing the others (a bilinear value never exceeds
  the largest of the four sources it blends), which is what a top-1% dissection needs: a few
  percent of the pixels.  ``upsample_above(r, size, low)``: those pixels alone.
- ``upsample_max(r, size)``: each map's maximum, read at the corner pixels of the interpolation
  cells (a bilinear function on a grid peaks at a corner of each cell).
- ``upsample_at(r, size, rows, cols)``: values on a chosen sub-grid of rows and columns.
- ``upsample_pixels(r, size, pixels)``: values at chosen pixels, different for each sample.

Two conventions of the published code (``convention=``, every function): ``"iclr"`` (the default,
above: what the ICLR code's ``grid_sample`` grid with ``padding_mode='border'`` computes) and
``"pnas"`` (the PNAS code's ``upsample.upsampler``: the same grid, ``align_corners=True`` with
``padding_mode='zeros'``): the same half-pixel sampling positions, but a position past the
outermost source centres blends toward 0 instead of being clamped, i.e. bilinear over the map with
a ring of zeros around it, which is how it is computed here (the zeros are sources, so every bound
above holds).  A map already at the target size is returned as it is under both.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gandissect_widgets.engine import devices

__all__ = ["upsample", "upsample_above", "upsample_columns", "Columns", "upsample_max", "upsample_at",
           "upsample_pixels", "pool_mask", "CONVENTIONS", "check_convention", "source_bounds"]

CONVENTIONS = ("iclr", "pnas")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"upsample must be one of {', '.join(map(repr, CONVENTIONS))}, got {convention!r} "
                         f"('iclr': half-pixel bilinear with clamped edges, the default; 'pnas': zeros outside)")
    return convention


def _padded(r, size, convention):
    """``r`` as the interpolation reads it: with a ring of zeros under "pnas" (unless already at
    ``size``, which both conventions leave as it is); and whether it was padded."""
    if check_convention(convention) == "pnas" and tuple(r.shape[-2:]) != tuple(size):
        return F.pad(r, (1, 1, 1, 1)), True
    return r, False


def source_bounds(raw_max, raw_min, convention: str = "iclr"):
    """Bounds of a map's upsampled values from its own (max, min): a blend stays between its
    sources, which under "pnas" include the zeros outside."""
    if check_convention(convention) == "pnas":
        return raw_max.clamp(min=0), raw_min.clamp(max=0)
    return raw_max, raw_min


@functools.lru_cache(maxsize=128)
def _taps(n_in: int, n_out: int, device: str, dtype: torch.dtype, pad: bool = False):
    """1-D linear interpolation with half-pixel centres, edges clamped: for every output index,
    the source indices (i0, i1) and weights (w0, w1).  ``pad``: ``n_in`` sources are the map and
    a zero on either side ("pnas"): the same positions, shifted by one, never clamped."""
    if pad:
        n = n_in - 2
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n / n_out) + 0.5   # in (0, n + 1)
        i0 = src.floor().long()
        i1 = i0 + 1
        w1 = src - i0.double()
        dev = torch.device(device)
        return i0.to(dev), i1.to(dev), (1 - w1).to(dev, dtype), w1.to(dev, dtype)
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
    return (not devices.on_host(r.device) or torch.get_float32_matmul_precision() != "highest"
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


def _along_width(r, W, select, cols=None, pad=False):
    """(..., h, w) -> (..., h, W) (or the chosen output columns)."""
    i0, i1, w0, w1 = _taps(r.shape[-1], W, str(r.device), r.dtype, pad)
    if cols is not None:
        i0, i1, w0, w1 = i0[cols], i1[cols], w0[cols], w1[cols]
    return _pick(r, i0, -1, select) * w0 + _pick(r, i1, -1, select) * w1


def _along_height(x, H, select, rows=None, pad=False):
    """(..., h, W) -> (..., H, W) (or the chosen output rows)."""
    i0, i1, w0, w1 = _taps(x.shape[-2], H, str(x.device), x.dtype, pad)
    if rows is not None:
        i0, i1, w0, w1 = i0[rows], i1[rows], w0[rows], w1[rows]
    return _pick(x, i0, -2, select) * w0[:, None] + _pick(x, i1, -2, select) * w1[:, None]


def _size(size):
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise ValueError(f"upsampling needs a positive size, got {size}")
    return H, W


def upsample(r: torch.Tensor, size, convention: str = "iclr") -> torch.Tensor:
    """(N,C,h,w) -> (N,C,H,W) bilinear, align_corners=False (``convention``: see the module
    docstring); (C,h,w) -> (C,H,W)."""
    H, W = _size(size)
    if r.dim() == 3:
        return upsample(r[None], (H, W), convention)[0]
    check_convention(convention)
    if tuple(r.shape[-2:]) == (H, W):
        return r
    r, pad = _padded(_float(r), (H, W), convention)
    select = _selects(r)
    return _along_height(_along_width(r, W, select, pad=pad), H, select, pad=pad)


def upsample_at(r: torch.Tensor, size, rows=None, cols=None, convention: str = "iclr") -> torch.Tensor:
    """``upsample(r, size)[..., rows, :][..., cols]`` without computing the other pixels."""
    H, W = _size(size)
    r, pad = _padded(_float(r), (H, W), convention)
    dev = r.device
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev)
    cols = None if cols is None else torch.as_tensor(cols, dtype=torch.long, device=dev)
    select = _selects(r)
    return _along_height(_along_width(r, W, select, cols, pad), H, select, rows, pad)


def upsample_pixels(r: torch.Tensor, size, pixels: torch.Tensor, convention: str = "iclr") -> torch.Tensor:
    """(N,C,h,w), flat pixel indices (N,S) of the (H,W) grid -> (N,C,S): the upsampled values
    of every channel at each sample's own pixels, from their four sources only."""
    H, W = _size(size)
    r, pad = _padded(_float(r), (H, W), convention)
    N, C, h, w = r.shape
    dev = r.device
    S = pixels.shape[1]
    pixels = pixels.to(dev).long().reshape(-1)
    y, x = pixels // W, pixels % W
    i0, i1, w0, w1 = (t.index_select(0, y)[:, None] for t in _taps(h, H, str(dev), r.dtype, pad))
    j0, j1, v0, v1 = (t.index_select(0, x)[:, None] for t in _taps(w, W, str(dev), r.dtype, pad))
    rows = r.permute(0, 2, 3, 1).reshape(N * h * w, C)          # channels last: a source is one row
    first = torch.arange(N, device=dev).repeat_interleave(S)[:, None] * (h * w)

    def source(row, col):
        return rows.index_select(0, (first + row * w + col).view(-1))                        # (N*S, C)

    # as in _along_width, then _along_height: the same products and sums, so the same bits
    top = source(i0, j0) * v0 + source(i0, j1) * v1
    bottom = source(i1, j0) * v0 + source(i1, j1) * v1
    return (top * w0 + bottom * w1).view(N, S, C).transpose(1, 2)


def upsample_max(r: torch.Tensor, size, convention: str = "iclr") -> torch.Tensor:
    """(N,C,h,w) -> (N,C): the maximum of each upsampled map, from the corner pixels of the
    interpolation tiles only (equal to ``upsample(r, size).amax((2, 3))`` up to rounding)."""
    H, W = _size(size)
    r, pad = _padded(_float(r), (H, W), convention)
    rows, cols = (_corners(n, size, pad) for n, size in ((r.shape[-2], H), (r.shape[-1], W)))
    select = _selects(r)
    return _along_height(_along_width(r, W, select, cols, pad), H, select, rows, pad).amax((-2, -1))


@functools.lru_cache(maxsize=128)
def _tiles(n_in: int, n_out: int, pad: bool = False):
    """Output indices cut into runs that blend the same two sources with weights of one kind
    (the copies of a clamped edge, whose second weight is 0, apart from the blends), each of at
    most ceil(n_out / n_in) indices: the runs' sources (G,), (G,) and their indices padded with
    -1 to a rectangle (G, P).  For an integer scale every inner run has the same weights."""
    i0, i1, _, w1 = _taps(n_in, n_out, "cpu", torch.float64, pad)
    most = max(1, -(-n_out // (n_in - 2 if pad else n_in)))
    tiles, run = [], [0]
    for o in range(1, n_out):
        if i0[o] == i0[o - 1] and i1[o] == i1[o - 1] and (w1[o] == 0) == (w1[o - 1] == 0) and len(run) < most:
            run.append(o)
        else:
            tiles.append(run)
            run = [o]
    tiles.append(run)
    P = max(len(t) for t in tiles)
    members = torch.tensor([t + [-1] * (P - len(t)) for t in tiles], dtype=torch.long)
    first = members[:, 0]
    return i0[first], i1[first], members


def _corners(n_in: int, n_out: int, pad: bool = False) -> list:
    """The first and last output index of every tile: where a bilinear map peaks along an axis."""
    _, _, members = _tiles(n_in, n_out, pad)
    last = members.max(1).values
    return sorted(set(members[:, 0].tolist()) | set(last.tolist()))


_MAX_RUNS = 8  # row-tile patterns broadcast one run at a time; more than this are gathered


@functools.lru_cache(maxsize=128)
def _column_tables(h: int, w: int, H: int, W: int, device: str, dtype: torch.dtype, pad: bool = False) -> dict:
    """Everything ``upsample_columns`` looks up, for the tiles of the (H,W) grid (row tile g x
    column tile k, G x K of them, P x Q pixels at most)."""
    ra0, ra1, rmem = _tiles(h, H, pad)
    ca0, ca1, cmem = _tiles(w, W, pad)
    _, _, rw0, rw1 = _taps(h, H, "cpu", dtype, pad)
    _, _, cw0, cw1 = _taps(w, W, "cpu", dtype, pad)
    G, P = rmem.shape
    K, Q = cmem.shape
    inside = rmem >= 0
    RW0 = torch.where(inside, rw0[rmem.clamp(min=0)], torch.zeros((), dtype=dtype))  # (G,P)
    RW1 = torch.where(inside, rw1[rmem.clamp(min=0)], torch.zeros((), dtype=dtype))
    nan = torch.tensor(float("nan"), dtype=dtype)  # padded columns never pass a comparison
    src = (ra0[:, None] * w + ca0[None, :]).reshape(-1)                        # top-left source of tile g*K+k
    right = (ca1 - ca0)[None, :].expand(G, K).reshape(-1)
    down = ((ra1 - ra0) * w)[:, None].expand(G, K).reshape(-1)
    t = dict(G=G, K=K, P=P, Q=Q, shift_q=(Q.bit_length() - 1) if Q & (Q - 1) == 0 else None, tile_src=src,
             # per tile: its four sources; its row tile, first pixel and column tile
             tile_corners=torch.stack([src, src + right, src + down, src + down + right], 1),
             tile_rows=torch.stack([torch.arange(G).repeat_interleave(K),
                                    (rmem[:, 0, None] * W + cmem[None, :, 0]).reshape(-1),
                                    torch.arange(K).repeat(G)], 1),
             col_weights=torch.where((cmem >= 0).repeat(1, 2), torch.cat([cw0[cmem.clamp(min=0)], cw1[cmem.clamp(min=0)]], 1),
                                     nan))  # (K, 2Q)
    # consecutive row tiles with the same weights form a run, interpolated by broadcasting
    runs, g0 = [], 0
    for g in range(1, G + 1):
        if g == G or not (torch.equal(RW0[g], RW0[g0]) and torch.equal(RW1[g], RW1[g0]) and torch.equal(inside[g], inside[g0])):
            n = int(inside[g0].sum())
            runs.append((g0, n, RW0[g0, :n, None].clone(), RW1[g0, :n, None].clone()))
            g0 = g
    if len(runs) <= _MAX_RUNS:
        t["runs"] = runs
        t["run_firsts"] = torch.tensor([run[0] for run in runs] + [G])  # each run's first row tile, then G
    else:  # per column weights, and where a column is shorter than P
        t["runs"] = None
        t["rw0"], t["rw1"], t["padded"] = RW0.t().contiguous(), RW1.t().contiguous(), (~inside).t().contiguous()
    dev = torch.device(device)

    def move(x):
        if torch.is_tensor(x):
            return x.to(dev)
        if isinstance(x, list):
            return [tuple(move(y) for y in item) for item in x]
        return x

    return {k: move(v) for k, v in t.items()}


class Columns(NamedTuple):
    """Vertical runs of upsampled pixels, one per column of an interpolation tile, that hold
    every pixel above a floor (``upsample_columns``).  Mc columns of at most P pixels:

    values (P, Mc): slot p of column i is pixel ``pixels[i] + p * stride`` of the (N, H, W) grid,
        equal bit for bit to ``upsample``; -inf in slots past a short column.
    maps, units (Mc,): the map ``n * C + c`` and the channel c of each column.
    finite: whether the maps were free of inf and NaN (values then are too, but for -inf slots).
    """
    values: torch.Tensor
    maps: torch.Tensor
    units: torch.Tensor
    pixels: torch.Tensor
    stride: int
    finite: bool


def _margin(r, raw, raw_min):
    """A blend may round above its largest source by a few units in the last place of the
    sources: per channel, a margin that covers it; and whether ``r`` is all finite."""
    finite = bool(torch.isfinite(raw).all()) and bool(torch.isfinite(raw_min).all())
    if finite:
        mag = torch.maximum(raw.amax(0), raw_min.amin(0).neg())
    else:
        mag = r.nan_to_num(0.0, 0.0, 0.0).abs().amax((0, 2, 3))
    return mag * 1e-6, finite


def upsample_columns(r: torch.Tensor, size, low: torch.Tensor, raw: torch.Tensor | None = None,
                     raw_min: torch.Tensor | None = None, convention: str = "iclr") -> Columns:
    """The columns of interpolation tiles of ``upsample(r, size)`` that may hold values above
    ``low[c]`` (C,), with every value in them (see ``Columns``); every pixel above the floor
    lies in exactly one column.  ``raw``, ``raw_min``: ``r.amax((2, 3))``, ``r.amin((2, 3))``
    if the caller has them.

    Found without interpolating the rest: a bilinear value never exceeds the largest of the
    sources it blends (up to rounding, covered by a margin), so maps, then tiles, then columns
    whose sources stay below the floor are skipped; on a top-1% floor a small fraction remains.
    """
    H, W = _size(size)
    r = _float(r)
    N, C, h, w = r.shape
    dev = r.device
    raw = r.amax((2, 3)) if (raw is None and r.numel()) else raw
    raw_min = r.amin((2, 3)) if (raw_min is None and r.numel()) else raw_min
    r, pad = _padded(r, (H, W), convention)
    if pad:  # the zeros outside are sources too
        h, w = h + 2, w + 2
        if r.numel():
            raw, raw_min = source_bounds(raw, raw_min, convention)
    T = _column_tables(h, w, H, W, str(dev), r.dtype, pad)
    G, K, P, Q = T["G"], T["K"], T["P"], T["Q"]
    if r.numel() == 0:
        none = torch.zeros(0, dtype=torch.long, device=dev)
        return Columns(torch.zeros(P, 0, dtype=r.dtype, device=dev), none, none, none, W, True)
    margin, finite = _margin(r, raw, raw_min)
    if not finite:  # a NaN spoils only the pixels that blend it, not its whole map
        raw = r.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf).amax((2, 3))
    if not pad and (h, w) == (H, W):  # upsample leaves the map as it is: every pixel is a column of one
        pix = torch.nonzero((r.reshape(N, C, h * w) > low.to(dev, r.dtype)[None, :, None]).view(-1)).squeeze(1)
        maps = pix // (h * w)
        return Columns(r.reshape(1, -1).index_select(1, pix), maps, maps % C, maps // C * (h * w) + pix % (h * w), W, finite)
    floor = low.to(dev, r.dtype) - margin
    maps = torch.nonzero((raw > floor).view(-1)).squeeze(1)                   # n * C + c
    Km = maps.numel()
    map_unit, map_pixel = maps % C, maps // C * (H * W)                      # its channel, its first pixel
    floor_m = floor.index_select(0, map_unit)
    # maps last, so that every gather below moves whole rows
    rm = r.reshape(N * C, h * w).index_select(0, maps).t().contiguous().view(h, w, Km)
    # the largest source of every cell (pair of rows x pair of columns), then of every tile
    rows = torch.cat([torch.maximum(rm[:-1], rm[1:]), rm[-1:]], 0) if h > 1 else rm
    cells = torch.cat([torch.maximum(rows[:, :-1], rows[:, 1:]), rows[:, -1:]], 1) if w > 1 else rows
    bound = cells.view(h * w, Km).index_select(0, T["tile_src"])            # (G*K, Km), g-major
    tile = torch.nonzero((bound > floor_m[None]).view(-1)).squeeze(1)
    gk = tile // Km
    km = tile - gk * Km
    M = tile.numel()
    corners = (T["tile_corners"].index_select(0, gk) * Km).add_(km[:, None])
    c = rm.view(-1).index_select(0, corners.view(-1)).view(M, 4, 1)
    info = T["tile_rows"].index_select(0, gk)                                   # row tile, first pixel, column tile
    wx = T["col_weights"].index_select(0, info[:, 2])
    wx0, wx1 = wx[:, :Q], wx[:, Q:]
    # as in _along_width, then _along_height: the same products and sums, so the same bits
    hh = torch.empty(2, M, Q, dtype=r.dtype, device=dev)
    torch.add(c[:, 0] * wx0, c[:, 1] * wx1, out=hh[0])
    torch.add(c[:, 2] * wx0, c[:, 3] * wx1, out=hh[1])
    col = torch.nonzero((torch.maximum(hh[0], hh[1]) > floor_m.index_select(0, km)[:, None]).view(-1)).squeeze(1)
    m = col >> T["shift_q"] if T["shift_q"] is not None else col // Q
    q = col - m * Q
    a, b = hh[0].view(-1).index_select(0, col), hh[1].view(-1).index_select(0, col)
    tile_map = km.index_select(0, m)                                             # per column, its map's row
    pixels = (info[:, 1] + map_pixel.index_select(0, km)).index_select(0, m).add_(q)
    Mc = col.numel()
    if T["runs"] is not None:
        values = torch.empty(P, Mc, dtype=r.dtype, device=dev)
        # tiles, hence columns, come by row tile: each run of row tiles is a range of columns
        starts = torch.searchsorted(m, torch.searchsorted(info[:, 0].contiguous(), T["run_firsts"])).tolist()
        for (_, n, w0, w1), s, e in zip(T["runs"], starts, starts[1:]):
            if e > s:
                torch.mul(a[s:e], w0, out=values[:n, s:e]).add_(b[s:e] * w1)
                values[n:, s:e] = -math.inf
    else:
        gm = info[:, 0].index_select(0, m)
        values = a * T["rw0"].index_select(1, gm)
        values += b * T["rw1"].index_select(1, gm)
        values.masked_fill_(T["padded"].index_select(1, gm), -math.inf)
    return Columns(values, maps.index_select(0, tile_map), map_unit.index_select(0, tile_map), pixels, W, finite)


def upsample_above(r: torch.Tensor, size, low: torch.Tensor, convention: str = "iclr"):
    """The pixels of ``upsample(r, size)`` (N,C,H,W) whose value exceeds ``low[c]`` (C,).

    Returns ``(n, c, pixel, value)``: sample, channel, flat pixel index ``y * W + x`` and the
    value, equal bit for bit to ``upsample(r, size)[n, c].flatten()[pixel]``; in no particular
    order (``upsample_columns`` without the pixels at or below the floor).
    """
    H, W = _size(size)
    cols = upsample_columns(r, size, low, convention=convention)
    j = torch.nonzero((cols.values > low.to(cols.values)[cols.units][None]).view(-1)).squeeze(1)
    Mc = cols.maps.numel()
    p, i = j // Mc, j % Mc
    pixel = cols.pixels.index_select(0, i) + p * cols.stride
    return pixel // (H * W), cols.units.index_select(0, i), pixel % (H * W), cols.values.view(-1).index_select(0, j)


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
