"""Model-state tests of the widgets (no browser): construct, drive, assert session and bytes."""
import hashlib
import os

import numpy as np
import pytest

import gandissect_widgets as gw
from gandissect_widgets.widgets import AblationPanel, IouRanking, LayerSummary, PaintWidget, UnitBrowser, dashboard
from gandissect_widgets.widgets.worker import LatestWins


def h(b):
    """A digest of image bytes, or of a list of image widgets' bytes (a panel's columns)."""
    if isinstance(b, list):
        return hashlib.sha256(b"".join(bytes(w.value) for w in b)).hexdigest()
    return hashlib.sha256(bytes(b)).hexdigest()


@pytest.fixture(scope="module")
def session():
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), samples=range(6))
    s.dissect(["layer1", "layer2"], n_samples=200, progress=False)
    s.update(concept="red", layer="layer1")
    return s


@pytest.fixture(autouse=True)
def reset(session):
    session.update(selection=(), mode="ablate", concept="red", layer="layer1", samples=range(6), unit=None, strength=1)
    yield


def test_session_state_and_observers(session):
    seen = []
    fn = session.observe(lambda n, o, v: seen.append((n, v)), names=["selection"])
    session.update(selection=[3, 1, 3])
    assert session.selection == (1, 3) and seen == [("selection", (1, 3))]
    session.update(selection=[1, 3])  # unchanged: no notification
    assert len(seen) == 1
    session.unobserve(fn)
    with pytest.raises(ValueError, match="out of range"):
        session.update(selection=[99])
    with pytest.raises(ValueError, match="unknown session state"):
        session.update(colour="red")
    with pytest.raises(KeyError, match="unknown concept"):
        session.update(concept="purple")
    with pytest.raises(gw.UnknownLayerError):
        session.update(layer="layer9")
    assert session.selection == (1, 3)


def test_unit_browser_sort_filter_click(session):
    b = UnitBrowser(session, per_page=6)
    assert b.wait()
    assert len(b.visible_cards()) == 6 and b.last_error is None
    assert b.order()[:4] == sorted(b.order()[:4], key=lambda u: -session.dissection.unit_ious("layer1")[u])
    b.filter.value = "green"
    assert b.wait() and b.order()[0] == 1
    b.interp_only.value = True
    assert b.wait() and b.order() == [1]
    assert len(b.visible_cards()) == 1
    b.interp_only.value = False
    b.sort.value = "unit"
    b.filter.value = "(all concepts)"
    assert b.wait() and b.order() == list(range(16))
    b.click(2)
    assert b.wait() and session.unit == 2
    assert "unit 2" in b.detail_title.value and "blue" in b.detail_title.value
    assert b.detail_samples.value[:4] == b"\x89PNG" and len(b.detail_iou.value) > 1000
    # a card's picture shows the unit's mask: pixels outside are darkened
    first = b.visible_cards()[0].children[0].value
    assert first[:4] == b"\x89PNG"


def test_ranking_selects_and_sends(session):
    r = IouRanking(session)
    r.concept.value = "blue"
    assert session.concept == "blue"
    r.topk.value = 3
    assert r.chosen()[0] == 2 and len(r.chosen()) == 3
    second = r.ranked()[1]
    r.units.value = (2, second)  # clicking in the list
    chart = bytes(r.chart.value)
    r.send_selection()
    assert session.selection == tuple(sorted((2, second))) and session.concept == "blue"
    r.units.value = (2,)
    assert h(r.chart.value) != h(chart)  # the highlighted bars changed
    r.metric.value = "ACE"
    assert r.last_error is not None and "compute ACE" in str(r.last_error)
    r.run_ace()
    assert r.wait(120) and r.last_error is None
    assert ("layer1", "blue") in session.ace and r.metric.value == "ACE"
    assert r.ranked()[0] == 2


def test_ablation_toggles_change_images_only_when_they_should(session):
    a = AblationPanel(session)
    assert a.wait()
    orig, edited = h(a.originals), h(a.editeds)
    assert orig == edited  # nothing switched
    a.toggle(0)  # the red unit
    assert a.wait() and session.selection == (0,)
    assert h(a.editeds) != edited and h(a.originals) == orig
    assert "1.00% → 0.00%" in a.stats.value
    after_red = h(a.editeds)
    a.toggle(9)  # a random unit: no effect on the image
    assert a.wait() and session.selection == (0, 9)
    assert h(a.editeds) == after_red
    a.toggle(0)
    a.toggle(9)
    assert a.wait() and h(a.editeds) == edited
    session.update(mode="insert", selection=[0])
    assert a.wait() and a.mode.value == "insert"
    assert "→ 9" in a.stats.value  # red everywhere (but the other concepts' cells)
    a.samples.value = "2, 4"
    assert a.wait() and session.samples == (2, 4)
    a.samples.value = "oops"
    assert a.last_error is not None and "cannot read sample indices" in str(a.last_error)
    a.switch_top(2)
    assert a.wait() and session.selection == tuple(sorted(session.top_units("layer1", "red", 2)))


def test_latest_request_wins():
    import threading
    import time
    done = []
    w = LatestWins()
    gate = threading.Event()
    w.submit(lambda: gate.wait(5) or "first", done.append)
    time.sleep(0.05)
    for i in range(5):
        w.submit(lambda i=i: f"job{i}", done.append)
    gate.set()
    assert w.wait(10)
    assert done == ["job4"]  # the first finished after newer requests: dropped; jobs 0-3 never ran
    errors = []
    w2 = LatestWins(on_error=lambda e, t: errors.append(e))
    w2.submit(lambda: 1 / 0)
    assert w2.wait(10) and isinstance(errors[0], ZeroDivisionError)


def test_paint_strokes_undo_reset_export(session, tmp_path):
    p = PaintWidget(session, sample=1, scale=4)
    assert p.wait()
    base = h(p.result.value)
    p.concept.value = "green"
    p.mode.value = "draw"
    p.brush.value = 6
    for ev, (x, y) in (("down", (40, 40)), ("move", (60, 44)), ("move", (80, 50)), ("up", (80, 50))):
        getattr(p, f"mouse_{ev}")(x, y)
    assert p.wait() and len(p.strokes) == 1 and p.last_error is None
    assert p.strokes[0].mask.sum() > 0
    drawn = h(p.result.value)
    assert drawn != base
    p.mode.value = "erase"
    p.mouse_down(40, 40)
    p.mouse_up(40, 40)
    assert p.wait() and len(p.strokes) == 2
    p.undo()
    assert p.wait() and h(p.result.value) == drawn
    out = p.export(str(tmp_path / "paint.png"))
    assert open(out, "rb").read()[:4] == b"\x89PNG"
    assert p.mask_rgba()[..., 3].any()
    p.repaint()  # what a newly connected client gets
    p.reset()
    assert p.wait() and h(p.result.value) == base and not p.strokes


def test_layer_summary_and_dashboard(session):
    other = gw.dissect(gw.load_generator("planted", concepts=2), gw.load_segmenter("planted", concepts=4),
                       ["layer1"], n_samples=100, progress=False)
    l = LayerSummary(session, other=other, names=("four", "two"))
    assert l.left.value[:4] == b"\x89PNG" and l.right.value[:4] == b"\x89PNG"
    assert "four" in l.table.value and "two" in l.table.value
    before = h(l.left.value)
    l.min_iou.value = 0.99
    assert h(l.left.value) != before
    tab = dashboard(session)
    assert len(tab.children) == 5


def test_views_need_a_dissection():
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"))
    with pytest.raises(ValueError, match="needs a dissection"):
        UnitBrowser(s)


def _as_array(png):
    import io
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def find_picture(big, small):
    """(y, x) where the picture ``small`` stands, pixel for pixel, inside ``big``; None if nowhere."""
    pack = lambda a: (a[..., 0].astype(np.uint32) << 16) | (a[..., 1].astype(np.uint32) << 8) | a[..., 2]
    B, S = pack(np.asarray(big)), pack(np.asarray(small))
    (H, W), (h, w) = B.shape, S.shape
    needle = S[0].tobytes()
    for y in range(H - h + 1):
        row, at = B[y].tobytes(), 0
        while (i := row.find(needle, at)) != -1:
            x = i // 4
            if i % 4 == 0 and x <= W - w and np.array_equal(B[y:y + h, x:x + w], S):
                return y, x
            at = i + 1
    return None


def test_static_picture_beside_every_widget(session):
    """Readers without widgets (nbconvert, GitHub) get a PNG of the view, with the labels a
    reader needs; snapshot() freezes the current state, and follows the edits."""
    import base64
    from gandissect_widgets.widgets.snapshot import text_image
    a = AblationPanel(session)
    bundle = a._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == a.model_id
    pic = _as_array(base64.b64decode(bundle["image/png"]))
    for img in a.originals + a.editeds:
        assert find_picture(pic, _as_array(img.value)) is not None
    for word in ("original", "edited", "difference"):
        assert find_picture(pic, np.asarray(text_image(word))) is not None
    a.toggle(0)
    after = _as_array(a.snapshot().data)
    assert find_picture(after, _as_array(a.editeds[0].value)) is not None
    # the switched unit reads as pressed, the others as not
    assert find_picture(after, np.asarray(text_image("0", pressed=True, boxed=True))) is not None
    assert find_picture(after, np.asarray(text_image("0", pressed=False, boxed=True))) is None
    b = UnitBrowser(session, per_page=6)
    assert b.wait()
    grid = _as_array(b.snapshot_png())
    card = b.visible_cards()[0]
    assert find_picture(grid, _as_array(card.children[0].value)) is not None
    label = card.children[1].description
    assert "IoU" in label and find_picture(grid, np.asarray(text_image(label, boxed=True))) is not None
    p = PaintWidget(session, sample=1, scale=4)
    assert "image/png" in p._repr_mimebundle_()
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"))
    s.dissect(["layer1"], n_samples=50, progress=False)
    empty = LayerSummary(s)
    assert empty.snapshot_png() is not None


def test_insertion_strength_is_shared_and_rerenders_only_insertions(session):
    a = AblationPanel(session)
    a.toggle(0)
    assert a.wait()
    ablated = h(a.editeds)
    a.strength.value = 3.0  # ablation ignores it
    assert session.strength == 3.0 and a.wait() and h(a.editeds) == ablated
    session.update(mode="insert", strength=1)
    assert a.wait()
    once = h(a.editeds)
    assert "insert (x1)" in a.stats.value
    p = PaintWidget(session, sample=1, scale=4)
    assert p.strength.value == 1.0
    p.concept.value = "red"
    p.mouse_down(10, 10)
    p.mouse_up(30, 30)
    assert p.wait()
    painted = h(p.result.value)
    p.strength.value = 0.5  # from the paint widget: the ablation panel follows
    assert a.wait() and p.wait()
    assert a.strength.value == 0.5 and "insert (x0.5)" in a.stats.value
    assert h(a.editeds) != once and h(p.result.value) != painted
    iv = session.intervention("layer1", [0], "insert", "red")
    torch_values = session.insertion_values("layer1", "red")[[0]] * 0.5
    assert np.allclose(np.asarray(iv.values), np.asarray(torch_values))
    for bad in (0, -1, "lots", 1000):
        with pytest.raises(ValueError, match="strength"):
            session.update(strength=bad)
