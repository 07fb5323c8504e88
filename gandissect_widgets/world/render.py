"""Procedural outdoor scenes with exact per-pixel labels: the SceneWorld renderer.

    images, labels = render(16, seed=0)          # uint8 (16,64,64,3), uint8 (16,64,64)
    x = to_tensor(images)                        # float32 (16,3,64,64) in [-1,1]
    LABELS[labels[0, 40, 10]]                    # e.g. 'grass'

Scene ``i`` (global index ``start + i``) depends only on ``(seed, start + i, size)``: the
first k scenes are the same for any n >= k, and ``render(5, start=10)`` equals
``render(15)[10:15]``.

Context rules a model of this world can learn (and tests check):
- the horizon splits sky (above) from ground (below); sky, cloud, sun and mountain lie above
  it, grass, water and road below it;
- windows and doors lie inside the rectangle of their building's wall, the roof sits on top
  of the wall;
- trees (crown and trunk, both labelled ``tree``) stand with the trunk base on grass or road,
  never in water;
- buildings and trees nearer the bottom of the image are larger (perspective) and are drawn
  in front of farther ones.
"""
import numpy

__all__ = ['LABELS', 'LABEL_COLORS', 'render', 'to_tensor', 'colorize']

LABELS = ['unlabeled', 'sky', 'cloud', 'sun', 'mountain', 'grass', 'water', 'tree',
          'building', 'roof', 'window', 'door', 'road']
_L = {name: i for i, name in enumerate(LABELS)}

# A fixed colour per label, for visualising label maps (uint8 RGB, shape (len(LABELS), 3)).
LABEL_COLORS = numpy.array([
    (0, 0, 0), (120, 170, 255), (235, 235, 235), (255, 220, 0), (120, 90, 140),
    (60, 180, 60), (0, 60, 200), (0, 100, 0), (200, 120, 60), (170, 20, 20),
    (255, 255, 120), (90, 40, 10), (110, 110, 110)], dtype=numpy.uint8)

# Materials: what a pixel is painted with; each maps to one label. Per-scene palettes give
# each material its colour; walls and roofs have one material per building slot.
(_SKY, _CLOUD, _SUN, _MOUNTAIN, _SNOW, _GRASS, _WATER, _ROAD, _ROADLINE, _TRUNK, _CROWN,
 _WALL0, _WALL1, _WALL2, _ROOF0, _ROOF1, _ROOF2, _WINDOW, _LITWINDOW, _DOOR) = range(20)
_NMAT = 20
_MAT_LABEL = numpy.array([
    _L['sky'], _L['cloud'], _L['sun'], _L['mountain'], _L['mountain'], _L['grass'],
    _L['water'], _L['road'], _L['road'], _L['tree'], _L['tree'],
    _L['building'], _L['building'], _L['building'], _L['roof'], _L['roof'], _L['roof'],
    _L['window'], _L['window'], _L['door']], dtype=numpy.uint8)

_MAX_BUILDINGS = 3
_MAX_TREES = 5
# Tree size relative to the first world's (whose trees, a few pixels across, the GAN drew as
# blurs that no unit specialised in). The shipped models are trained on this default.
TREE_SCALE = 1.6
_MAX_CLOUDS = 4
_LOWRES = 9  # side of the low-frequency noise grid


def render(n, seed=0, size=64, start=0, return_instances=False, tree_scale=TREE_SCALE):
    """Render ``n`` scenes.

    Args:
        n: number of scenes.
        seed: world seed; scene ``start + i`` depends only on (seed, start + i, size).
        size: side of the square images in pixels (default 64, the GAN's resolution).
        start: global index of the first scene.
        return_instances: also return an int16 instance map (n,size,size): 0 for
            background, ``1 + k`` for every pixel of building k (wall, roof, windows,
            door), ``10 + j`` for tree j. Used by the tests to check context rules.
        tree_scale: size of trees (trunk and crown) relative to the first world's (1.0).

    Returns:
        ``(images, labels)``: uint8 (n,size,size,3) RGB and uint8 (n,size,size) indices
        into ``LABELS``; plus ``instances`` when ``return_instances``.
    """
    n, size, start, seed = int(n), int(size), int(start), int(seed)
    if n < 0 or start < 0 or seed < 0:
        raise ValueError(f'render: n, start and seed must be >= 0, got n={n}, '
                         f'start={start}, seed={seed}')
    if size < 16:
        raise ValueError(f'render: size must be at least 16 pixels, got {size}')
    tree_scale = float(tree_scale)
    if not 0.25 <= tree_scale <= 4:
        raise ValueError(f'render: tree_scale must be in [0.25, 4], got {tree_scale}')
    images = numpy.empty((n, size, size, 3), dtype=numpy.uint8)
    labels = numpy.empty((n, size, size), dtype=numpy.uint8)
    instances = numpy.zeros((n, size, size), dtype=numpy.int16) if return_instances else None
    grid = _Grid(size)
    for i in range(n):
        rng = numpy.random.Generator(numpy.random.PCG64([seed, start + i, size]))
        inst = instances[i] if return_instances else None
        images[i], labels[i] = _render_one(rng, grid, inst, tree_scale)
    if return_instances:
        return images, labels, instances
    return images, labels


def to_tensor(images):
    """uint8 (N,H,W,3) images (numpy or torch) -> float32 torch tensor (N,3,H,W) in [-1,1]."""
    import torch
    x = torch.as_tensor(numpy.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f'to_tensor: expected uint8 images of shape (N,H,W,3), '
                         f'got shape {tuple(x.shape)}')
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def colorize(labels):
    """Label maps (..., H, W) -> uint8 RGB (..., H, W, 3) using ``LABEL_COLORS``."""
    return LABEL_COLORS[numpy.asarray(labels)]


class _Grid:
    """Pixel-centre coordinates in [0,1] and a bilinear upsampling matrix for one size."""

    def __init__(self, size):
        self.size = size
        c = (numpy.arange(size, dtype=numpy.float32) + 0.5) / size
        self.y = c[:, None]
        self.x = c[None, :]
        # (size, _LOWRES) bilinear interpolation weights, so that A @ g @ A.T upsamples g.
        pos = c * (_LOWRES - 1)
        lo = numpy.minimum(pos.astype(int), _LOWRES - 2)
        frac = pos - lo
        a = numpy.zeros((size, _LOWRES), dtype=numpy.float32)
        a[numpy.arange(size), lo] = 1 - frac
        a[numpy.arange(size), lo + 1] = frac
        self.up = a


def _px(v, size):
    """Normalised coordinate -> integer pixel edge."""
    return int(round(v * size))


def _render_one(rng, g, inst, tree_scale):
    S = g.size
    u = rng.random
    mat = numpy.empty((S, S), dtype=numpy.uint8)
    shade = numpy.ones((S, S), dtype=numpy.float32)
    pal = numpy.zeros((_NMAT, 3), dtype=numpy.float32)

    dusk = u() < 0.3
    horizon = 0.38 + 0.27 * u()
    hrow = _px(horizon, S)            # rows < hrow are above the horizon
    light = 0.6 + 0.15 * u() if dusk else 0.85 + 0.25 * u()
    warm = numpy.array([1.08, 0.95, 0.82], numpy.float32) if dusk else numpy.ones(3, numpy.float32)

    # ---- sky
    if dusk:
        top = numpy.array([0.15 + 0.2 * u(), 0.1 + 0.1 * u(), 0.3 + 0.25 * u()])
        bottom = numpy.array([0.9 + 0.1 * u(), 0.45 + 0.25 * u(), 0.25 + 0.2 * u()])
    else:
        top = numpy.array([0.15 + 0.15 * u(), 0.35 + 0.2 * u(), 0.75 + 0.2 * u()])
        bottom = numpy.array([0.6 + 0.2 * u(), 0.75 + 0.15 * u(), 0.9 + 0.1 * u()])
    t = numpy.clip(g.y / max(horizon, 1e-3), 0, 1)
    sky = (top * (1 - t) + bottom * t).astype(numpy.float32)          # (S,3)
    mat[:hrow] = _SKY
    mat[hrow:] = _GRASS

    # ---- sun (behind clouds and mountains)
    if u() < 0.5:
        r = 0.045 + 0.04 * u()
        cy = 0.07 + (horizon - 0.12 - r - 0.07) * u() if not dusk else horizon - r - 0.02 - 0.15 * u()
        cx = 0.1 + 0.8 * u()
        d = ((g.x - cx) ** 2 + (g.y - cy) ** 2) < r * r
        d[hrow:] = False
        mat[d] = _SUN
        pal[_SUN] = (1.0, 0.95, 0.6) if not dusk else (1.0, 0.55 + 0.25 * u(), 0.2)

    # ---- clouds: unions of ellipses above the horizon
    nclouds = int(u() * (_MAX_CLOUDS + 1))
    grey = 0.8 + 0.2 * u()
    pal[_CLOUD] = (grey, grey, min(1.0, grey + 0.05)) if not dusk else (0.95, 0.7, 0.65)
    for _ in range(nclouds):
        cw = 0.08 + 0.1 * u()
        ch = 0.03 + 0.025 * u()
        cx = u()
        cy = 0.05 + max(0.0, horizon - 0.14) * u()
        r0, r1 = max(0, int((cy - 1.7 * ch) * S)), min(hrow - 1, int((cy + ch) * S) + 2)
        if r1 <= r0:
            continue
        ys = g.y[r0:r1]
        m = numpy.zeros((r1 - r0, S), dtype=bool)
        for b in range(3):
            bx = cx + (b - 1) * cw * 0.8 + 0.02 * (u() - 0.5)
            by = cy - (ch * 0.6 if b == 1 else 0.0)
            m |= ((g.x - bx) / cw) ** 2 + ((ys - by) / ch) ** 2 < 1
        mat[r0:r1][m] = _CLOUD
        shade[r0:r1][m] = numpy.broadcast_to(
            1.0 - 0.25 * numpy.clip((ys - cy) / (2 * ch) + 0.2, 0, 1), m.shape)[m]

    # ---- mountains: a ridge line above the horizon, two tones
    if u() < 0.5:
        xs = g.x[0]
        ridge = numpy.zeros(S, numpy.float32)
        for _ in range(1 + int(u() * 3)):
            px, ph, pw = u(), 0.06 + 0.16 * u(), 0.15 + 0.3 * u()
            ridge = numpy.maximum(ridge, ph * (1 - numpy.abs(xs - px) / pw))
        ridge += 0.01 * numpy.sin(xs * (20 + 20 * u()) + 6 * u())
        ridge = numpy.minimum(ridge, horizon - 0.02)
        top_y = horizon - ridge                                              # (S,)
        m = (g.y >= top_y[None, :]) & (g.y < horizon)
        mat[m] = _MOUNTAIN
        base = numpy.array([0.35 + 0.15 * u(), 0.35 + 0.1 * u(), 0.45 + 0.15 * u()])
        pal[_MOUNTAIN] = base * (0.7 if dusk else 1.0)
        pal[_SNOW] = (0.92, 0.92, 0.97) if not dusk else (0.9, 0.75, 0.8)
        if u() < 0.5:  # snow caps on high ridges
            snow = m & (g.y < (top_y + 0.03)[None, :]) & (ridge > 0.12)[None, :]
            mat[snow] = _SNOW
        # lit left slopes, shaded right slopes
        slope = numpy.gradient(top_y)
        shade[m] = numpy.broadcast_to(numpy.where(slope > 0, 0.8, 1.05)[None, :], (S, S))[m]

    # ---- grass
    gh = 0.25 + 0.1 * u()
    pal[_GRASS] = _hsv(gh if u() < 0.8 else 0.14 + 0.05 * u(), 0.5 + 0.3 * u(), 0.55 + 0.2 * u())
    depth = numpy.clip((g.y - horizon) / max(1 - horizon, 1e-3), 0, 1)   # 0 at horizon, 1 bottom
    shade[hrow:] = (0.85 + 0.25 * depth[hrow:]).repeat(S, 1)

    # ---- water: lake (ellipse) or river (band widening towards the viewer)
    wkind = u()
    if wkind < 0.25:
        cx, cy = 0.15 + 0.7 * u(), horizon + (1 - horizon) * (0.3 + 0.4 * u())
        rx, ry = 0.18 + 0.25 * u(), 0.05 + 0.08 * u()
        m = ((g.x - cx) / rx) ** 2 + ((g.y - cy) / ry) ** 2 < 1
        m[:hrow + 1] = False
        mat[m] = _WATER
    elif wkind < 0.4:
        x0, x1 = 0.2 + 0.6 * u(), 0.1 + 0.8 * u()
        w0, w1 = 0.02, 0.12 + 0.15 * u()
        centre = x0 + (x1 - x0) * depth + 0.04 * numpy.sin(depth * 9 + 6 * u())
        half = (w0 + (w1 - w0) * depth) / 2
        m = numpy.abs(g.x - centre) < half
        m[:hrow + 1] = False
        mat[m] = _WATER
    if wkind < 0.4:
        pal[_WATER] = 0.25 * bottom + numpy.array([0.08, 0.25, 0.55]) * (1.3 if dusk else 1.0)
        wm = mat == _WATER
        shade[wm] = (0.9 + 0.12 * numpy.sin(g.y * S * 1.3)).repeat(S, 1)[wm]

    # ---- road: perspective trapezoid from the bottom edge towards the horizon
    if u() < 0.4:
        top_x, bot_x = 0.2 + 0.6 * u(), 0.1 + 0.8 * u()
        top_w, bot_w = 0.02 + 0.02 * u(), 0.2 + 0.25 * u()
        end = horizon + 0.03 + 0.3 * u() * (1 - horizon)
        tt = numpy.clip((g.y - end) / max(1 - end, 1e-3), 0, 1)
        centre = top_x + (bot_x - top_x) * tt
        half = (top_w + (bot_w - top_w) * tt) / 2
        m = (numpy.abs(g.x - centre) < half) & (g.y >= end)
        mat[m] = _ROAD
        v = 0.35 + 0.25 * u()
        pal[_ROAD] = (v, v, v * 1.02)
        pal[_ROADLINE] = (0.9, 0.85, 0.5)
        if u() < 0.5:  # dashed centre line
            line = m & (numpy.abs(g.x - centre) < half * 0.12) & (numpy.sin(g.y * 40) > 0)
            mat[line] = _ROADLINE
        shade[m] = 1.0

    # ---- standing objects: buildings and trees, painted far (small base y) to near
    objects = []
    nb = _pick(u(), (0.3, 0.3, 0.25, 0.15))
    for k in range(nb):
        objects.append((horizon + 0.02 + (0.95 - horizon) * u(), 0, k))
    nt = _pick(u(), (0.25, 0.2, 0.2, 0.15, 0.1, 0.1))
    for j in range(nt):
        objects.append((horizon + 0.01 + (0.97 - horizon) * u(), 1, j))
    objects.sort()
    crown_hsv = (0.25 + 0.12 * u(), 0.55 + 0.3 * u(), 0.28 + 0.12 * u())
    pal[_CROWN] = _hsv(*crown_hsv)
    pal[_TRUNK] = (0.35 + 0.1 * u(), 0.22 + 0.05 * u(), 0.1)
    pal[_WINDOW] = (0.15 + 0.1 * u(), 0.2 + 0.1 * u(), 0.35 + 0.15 * u())
    pal[_LITWINDOW] = (1.0, 0.85, 0.4)
    pal[_DOOR] = (0.3 + 0.15 * u(), 0.15 + 0.1 * u(), 0.08)
    lit = dusk and u() < 0.7
    for base, kind, k in objects:
        scale = 0.45 + 0.85 * (base - horizon) / max(1 - horizon, 1e-3)
        if kind == 0:
            _building(rng, g, mat, shade, pal, inst, base, scale, k, lit)
        else:
            _tree(rng, g, mat, shade, inst, base, scale * tree_scale, k, hrow)

    # ---- compose colours
    pal[_MOUNTAIN:] *= light * warm
    img = pal[mat]                                                     # (S,S,3)
    skym = mat == _SKY
    img[skym] = numpy.broadcast_to(sky[:, None, :], (S, S, 3))[skym]
    # shading, low-frequency texture and per-pixel noise, stronger on natural materials
    low = g.up @ rng.standard_normal((_LOWRES, _LOWRES), dtype=numpy.float32) @ g.up.T
    noise = rng.standard_normal((S, S), dtype=numpy.float32)
    amp = _TEXTURE[mat]
    img *= shade[..., None]
    img += ((0.05 * low + 0.035 * noise) * amp + 0.008)[..., None]
    numpy.clip(img, 0, 1, out=img)
    return (img * 255).astype(numpy.uint8), _MAT_LABEL[mat]


# Texture amplitude per material.
_TEXTURE = numpy.array([0.2, 0.3, 0.0, 0.8, 0.3, 1.3, 0.6, 0.5, 0.3, 0.8, 1.4,
                        0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.3, 0.3, 0.5], dtype=numpy.float32)


def _pick(v, probs):
    c = 0.0
    for i, p in enumerate(probs):
        c += p
        if v < c:
            return i
    return len(probs) - 1


def _hsv(h, s, v):
    import colorsys
    return colorsys.hsv_to_rgb(h % 1.0, s, v)


_WALL_COLORS = [(0.85, 0.8, 0.65), (0.7, 0.35, 0.25), (0.9, 0.9, 0.88), (0.6, 0.6, 0.62),
                (0.8, 0.65, 0.4), (0.55, 0.65, 0.75)]
_ROOF_COLORS = [(0.55, 0.15, 0.1), (0.3, 0.25, 0.25), (0.45, 0.3, 0.15), (0.2, 0.3, 0.4)]


def _building(rng, g, mat, shade, pal, inst, base, scale, k, lit):
    S = g.size
    u = rng.random
    w = scale * (0.24 + 0.2 * u())
    h = scale * (0.2 + 0.18 * u())
    cx = 0.05 + 0.9 * u()
    x0, x1 = _px(cx - w / 2, S), _px(cx + w / 2, S)
    y1 = _px(base, S)
    y0 = y1 - max(4, _px(h, S))
    x1 = max(x1, x0 + 4)
    wall = _WALL0 + k
    roof = _ROOF0 + k
    c = numpy.array(_WALL_COLORS[int(u() * len(_WALL_COLORS))]) * (0.9 + 0.2 * u())
    pal[wall] = numpy.clip(c, 0, 1)
    pal[roof] = numpy.array(_ROOF_COLORS[int(u() * len(_ROOF_COLORS))]) * (0.85 + 0.3 * u())
    cx0, cx1, cy0, cy1 = max(x0, 0), min(x1, S), max(y0, 0), min(y1, S)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    mat[cy0:cy1, cx0:cx1] = wall
    sh = shade[cy0:cy1, cx0:cx1]
    sh[:] = 1.0
    if u() < 0.5:  # a darker side wall on one end
        side = max(1, (x1 - x0) // 4)
        if u() < 0.5:
            sh[:, max(0, x1 - side - cx0):] = 0.78
        else:
            sh[:, :max(0, x0 + side - cx0)] = 0.78
    if inst is not None:
        inst[cy0:cy1, cx0:cx1] = 1 + k
    # roof on top of the wall: gable (triangle) or flat slab, slightly overhanging
    rh = max(2, _px(scale * (0.05 + 0.08 * u()), S))
    over = 1 if (x1 - x0) >= 6 else 0
    gable = u() < 0.65
    rows = numpy.arange(y0 - rh, y0)
    if gable:
        # width shrinks linearly to the apex
        frac = (rows - (y0 - rh) + 1) / rh
        half = (x1 - x0 + 2 * over) / 2 * frac
    else:
        rh = max(1, rh // 2)
        rows = numpy.arange(y0 - rh, y0)
        half = numpy.full(len(rows), (x1 - x0 + 2 * over) / 2)
    mid = (x0 + x1) / 2
    cols = numpy.arange(S)[None, :] + 0.5
    rm = numpy.abs(cols - mid) <= half[:, None]
    ok = (rows >= 0) & (rows < S)
    rows, rm = rows[ok], rm[ok]
    if len(rows):
        sub = mat[rows]
        sub[rm] = roof
        mat[rows] = sub
        ss = shade[rows]
        ss[rm] = 1.0
        shade[rows] = ss
        if inst is not None:
            si = inst[rows]
            si[rm] = 1 + k
            inst[rows] = si
    # door at the bottom, windows in a grid above it, all inside the wall with a margin
    W, H = x1 - x0, y1 - y0
    door = u() < 0.75 and W >= 5 and H >= 5
    top_limit = y1 - 1
    if door:
        dw = max(1, int(round(W * (0.18 + 0.1 * u()))))
        dh = max(2, int(round(H * (0.35 + 0.15 * u()))))
        dx0 = x0 + 1 + int(u() * (W - 2 - dw + 1))
        dy0 = y1 - dh
        _fill(mat, inst, dy0, y1, dx0, dx0 + dw, _DOOR, k)
        top_limit = dy0 - 1
    if W >= 5 and u() < 0.9:
        ncols = max(1, min(4, int(W / (3 + 3 * u()))))
        avail = top_limit - (y0 + 1)
        nrows = max(0, min(3, int(avail / (3 + 2 * u()))))
        cw = W / ncols
        chh = avail / max(nrows, 1)
        ww = min(W - 2, max(1, int(cw * (0.4 + 0.2 * u()))))
        wh = max(1, int(chh * (0.45 + 0.25 * u())))
        wmat = _LITWINDOW if lit and u() < 0.8 else _WINDOW
        for r in range(nrows):
            wy0 = y0 + 1 + int(r * chh + (chh - wh) / 2)
            for cidx in range(ncols):
                wx0 = x0 + int(cidx * cw + (cw - ww) / 2 + 0.5)
                wx0 = min(max(wx0, x0 + 1), x1 - 1 - ww)
                if door and wx0 < dx0 + dw + 1 and wx0 + ww > dx0 - 1 and wy0 + wh > dy0 - 1:
                    continue
                _fill(mat, inst, wy0, min(wy0 + wh, y1 - 1), wx0, wx0 + ww, wmat, k)


def _fill(mat, inst, y0, y1, x0, x1, m, k):
    S = mat.shape[0]
    y0, y1, x0, x1 = max(y0, 0), min(y1, S), max(x0, 0), min(x1, S)
    if y1 > y0 and x1 > x0:
        mat[y0:y1, x0:x1] = m
        if inst is not None:
            inst[y0:y1, x0:x1] = 1 + k


def _tree(rng, g, mat, shade, inst, base, scale, j, hrow):
    S = g.size
    u = rng.random
    bx = 0.03 + 0.94 * u()
    brow = _px(base, S)                      # trunk occupies rows < brow
    if brow >= S:
        brow = S - 1
    bcol = min(S - 1, int(bx * S))
    tw = max(1, _px(scale * (0.02 + 0.015 * u()), S))
    th = max(2, _px(scale * (0.05 + 0.05 * u()), S))
    tx0 = bcol - tw // 2
    # trees stand on grass or road, never in water: skip the tree otherwise
    ground = mat[brow, max(tx0, 0):min(tx0 + tw, S)]
    if not numpy.isin(ground, (_GRASS, _ROAD, _ROADLINE)).all():
        return
    ty0 = brow - th
    pine = u() < 0.35
    r = scale * (0.065 + 0.055 * u())
    cyc = (ty0 + 0.5) / S - (r * 0.7 if not pine else 0)
    cxc = (bcol + 0.5) / S
    ys, xs = g.y, g.x
    if pine:
        height = r * 3.2
        top = (ty0 + 1) / S - height
        frac = numpy.clip((ys - top) / height, 0, 1)
        m = (numpy.abs(xs - cxc) < r * 0.9 * frac) & (ys >= top) & (ys <= (ty0 + 1) / S)
        lightdir = (xs - cxc) / (r + 1e-6)
    else:
        m = ((xs - cxc) / r) ** 2 + ((ys - cyc) / (r * 0.9)) ** 2 < 1
        for _ in range(2):
            ox, oy, rr = (u() - 0.5) * r * 1.2, (u() - 0.6) * r, r * (0.5 + 0.3 * u())
            m |= ((xs - cxc - ox) / rr) ** 2 + ((ys - cyc - oy) / rr) ** 2 < 1
        lightdir = ((xs - cxc) + (ys - cyc)) / (r + 1e-6)
    m &= ys < (brow - 1) / S                # the crown ends above the trunk's base
    y0c, y1c = max(ty0, 0), brow
    x0c, x1c = max(tx0, 0), min(tx0 + tw, S)
    if y1c > y0c and x1c > x0c:
        mat[y0c:y1c, x0c:x1c] = _TRUNK
        shade[y0c:y1c, x0c:x1c] = 1.0
        if inst is not None:
            inst[y0c:y1c, x0c:x1c] = 10 + j
    mat[m] = _CROWN
    shade[m] = numpy.broadcast_to(numpy.clip(1.05 - 0.25 * lightdir, 0.7, 1.3), (S, S))[m]
    if inst is not None:
        inst[m] = 10 + j
