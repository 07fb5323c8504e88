"""SceneWorld renderer: determinism, shapes, and the context rules of its scenes."""
import numpy
import pytest
import torch

from gandissect_widgets.world.render import LABELS, LABEL_COLORS, colorize, render, to_tensor

L = {name: i for i, name in enumerate(LABELS)}
SKYLIKE = [L['sky'], L['cloud'], L['sun'], L['mountain']]
GROUNDLIKE = [L['grass'], L['water'], L['road']]
N_RULES = 300


@pytest.fixture(scope='module')
def scenes():
    return render(N_RULES, seed=7, return_instances=True)


def test_label_set():
    assert LABELS[0] == 'unlabeled'
    for name in ['sky', 'cloud', 'sun', 'mountain', 'grass', 'water', 'tree', 'building',
                 'roof', 'window', 'door', 'road']:
        assert name in LABELS
    assert len(LABELS) == 13
    assert LABEL_COLORS.shape == (len(LABELS), 3)


@pytest.mark.parametrize('size', [64, 32, 96])
def test_shapes_and_dtypes(size):
    images, labels = render(3, seed=1, size=size)
    assert images.shape == (3, size, size, 3) and images.dtype == numpy.uint8
    assert labels.shape == (3, size, size) and labels.dtype == numpy.uint8
    assert labels.max() < len(LABELS)
    assert colorize(labels).shape == (3, size, size, 3)


def test_empty_and_bad_arguments():
    images, labels = render(0)
    assert images.shape == (0, 64, 64, 3) and labels.shape == (0, 64, 64)
    with pytest.raises(ValueError, match='n, start and seed'):
        render(-1)
    with pytest.raises(ValueError, match='size'):
        render(1, size=8)
    with pytest.raises(ValueError, match='tree_scale'):
        render(1, tree_scale=0)


def test_tree_scale_grows_trees_only():
    """The world parameter the shipped models were trained on: the same scenes, larger trees."""
    from gandissect_widgets.world.render import TREE_SCALE
    _, small = render(200, seed=4, tree_scale=1.0)
    _, default = render(200, seed=4)
    _, large = render(200, seed=4, tree_scale=TREE_SCALE)
    assert TREE_SCALE > 1 and numpy.array_equal(default, large)
    tree = L['tree']
    assert (large == tree).mean() > 2 * (small == tree).mean()
    # the rest of the world is untouched: where neither has a tree, the labels agree
    neither = (small != tree) & (large != tree)
    assert (small[neither] == large[neither]).mean() > 0.97


def test_determinism_prefix_and_offset():
    a_img, a_lab = render(6, seed=3)
    b_img, b_lab = render(6, seed=3)
    assert numpy.array_equal(a_img, b_img) and numpy.array_equal(a_lab, b_lab)
    # prefix property: the first k scenes are the same for any n
    c_img, c_lab = render(2, seed=3)
    assert numpy.array_equal(c_img, a_img[:2]) and numpy.array_equal(c_lab, a_lab[:2])
    # start offset
    d_img, d_lab = render(3, seed=3, start=2)
    assert numpy.array_equal(d_img, a_img[2:5]) and numpy.array_equal(d_lab, a_lab[2:5])
    full_img, _ = render(15)
    off_img, _ = render(5, start=10)
    assert numpy.array_equal(off_img, full_img[10:15])
    # other seeds give other scenes
    e_img, _ = render(6, seed=4)
    assert not numpy.array_equal(e_img, a_img)


def test_to_tensor():
    images, _ = render(2)
    x = to_tensor(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, :, 5, 7], torch.tensor(images[0, 5, 7] / 127.5 - 1,
                                                      dtype=torch.float32))
    with pytest.raises(ValueError, match=r'\(N,H,W,3\)'):
        to_tensor(images[0])


def test_horizon_separates_sky_from_ground(scenes):
    """Sky, cloud, sun and mountain lie strictly above every grass/water/road pixel."""
    _, labels, _ = scenes
    for lab in labels:
        sky_rows = numpy.nonzero(numpy.isin(lab, SKYLIKE).any(1))[0]
        ground_rows = numpy.nonzero(numpy.isin(lab, GROUNDLIKE).any(1))[0]
        assert len(sky_rows) and len(ground_rows)
        assert sky_rows.max() < ground_rows.min()


def test_windows_doors_roofs_belong_to_buildings(scenes):
    """Every window, door and roof pixel belongs to a building instance; on buildings that
    nothing stands in front of, windows and doors lie inside the wall rectangle and the roof
    sits directly on top of the wall, at most one pixel wider on each side."""
    _, labels, inst = scenes
    checked = 0
    for lab, ins in zip(labels, inst):
        parts = numpy.isin(lab, [L['window'], L['door'], L['roof'], L['building']])
        assert ((ins[parts] >= 1) & (ins[parts] <= 3)).all()
        assert (parts == ((ins >= 1) & (ins <= 3))).all()
        for k in numpy.unique(ins[parts]):
            own = ins == k
            rows, cols = numpy.nonzero(own)
            box = (slice(max(rows.min() - 1, 0), rows.max() + 2),
                   slice(max(cols.min() - 1, 0), cols.max() + 2))
            if ((ins[box] != k) & (ins[box] != 0)).any():
                continue  # something in front of (or next to, or behind) this building
            wall = own & (lab == L['building'])
            rows, cols = numpy.nonzero(wall | (own & (lab == L['door'])))
            if not len(rows):
                continue
            r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
            # the wall is a full rectangle (with windows and door in it)
            body = own[r0:r1 + 1, c0:c1 + 1] & (lab[r0:r1 + 1, c0:c1 + 1] != L['roof'])
            assert body.all()
            for name in ('window', 'door'):
                yy, xx = numpy.nonzero(own & (lab == L[name]))
                if len(yy):
                    checked += 1
                    assert yy.min() >= r0 and yy.max() <= r1 and xx.min() >= c0 and xx.max() <= c1
            yy, xx = numpy.nonzero(own & (lab == L['roof']))
            if len(yy) and r0 > 0:
                assert yy.max() == r0 - 1, 'roof directly above the wall'
                assert xx.min() >= c0 - 1 and xx.max() <= c1 + 1
            # windows never touch the wall's outline
            win = own & (lab == L['window'])
            if win.any():
                assert not win[r0].any() and not win[r1].any()
                assert c0 == 0 or not win[:, c0].any()   # (unless cut by the image edge)
                assert c1 == lab.shape[1] - 1 or not win[:, c1].any()
    assert checked > 100


def test_trees_stand_on_the_ground(scenes):
    """Below the lowest row of every unoccluded tree (its trunk base): grass or road."""
    _, labels, inst = scenes
    allowed = [L['grass'], L['road']]
    ntrees = 0
    for lab, ins in zip(labels, inst):
        for j in numpy.unique(ins[ins >= 10]):
            tree = ins == j
            assert (lab[tree] == L['tree']).all()
            rows, cols = numpy.nonzero(tree)
            box = (slice(max(rows.min() - 1, 0), rows.max() + 2),
                   slice(max(cols.min() - 1, 0), cols.max() + 2))
            if ((ins[box] != j) & (ins[box] != 0)).any():
                continue  # partly hidden behind something in front
            bottom = rows.max()
            if bottom + 1 >= lab.shape[0]:
                continue
            ntrees += 1
            below = lab[bottom + 1][tree[bottom]]
            assert numpy.isin(below, allowed).all(), [LABELS[b] for b in below]
    assert ntrees > 100


def test_label_frequencies():
    _, labels = render(400, seed=11)
    present = numpy.stack([(labels == i).any((1, 2)) for i in range(len(LABELS))], 1).mean(0)
    frac = {LABELS[i]: present[i] for i in range(len(LABELS))}
    assert frac['unlabeled'] == 0
    assert frac['sky'] == 1 and frac['grass'] == 1
    for name in ('window', 'door', 'tree', 'building', 'roof'):
        assert frac[name] > 1 / 3, (name, frac[name])
    for name in ('cloud', 'sun', 'mountain', 'water', 'road'):
        assert 0.2 < frac[name] < 0.95, (name, frac[name])
    pixels = numpy.bincount(labels.ravel(), minlength=len(LABELS)) / labels.size
    assert 0.25 < pixels[L['sky']] < 0.6 and 0.2 < pixels[L['grass']] < 0.6
