"""Model-state tests of the widgets (no browser): construct, drive, assert session and bytes."""
import hashlib

import numpy as np
import pytest

import gandissect_widgets as gw
from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU
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
    assert r.wait() and r.highlighted == {2, second}
    chart = bytes(r.chart.value)
    r.send_selection()
    assert session.selection == tuple(sorted((2, second))) and session.concept == "blue"
    r.units.value = (2,)
    assert r.wait() and h(r.chart.value) != h(chart)  # the highlighted bars changed
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
    assert l.wait()
    assert l.ylims[0] == l.ylims[1]  # one y range for both models
    assert l.left.value[:4] == b"\x89PNG" and l.right.value[:4] == b"\x89PNG"
    assert "four" in l.table.value and "two" in l.table.value
    before = h(l.left.value)
    l.min_iou.value = 0.99
    assert l.wait() and h(l.left.value) != before
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


def test_unit_browser_on_a_session_with_a_unit_selected_draws_cards_and_detail(session):
    """The detail runs in its own lane: a click right after the constructor (or a session whose
    unit is already chosen) no longer drops the cards' job."""
    session.update(unit=2)
    b = UnitBrowser(session, per_page=6)
    b.click(3)
    assert b.wait()
    assert len(b.visible_cards()) == 6 and all(c.children[0].value[:4] == b"\x89PNG" for c in b.visible_cards())
    assert b.last_error is None, b.last_error
    assert "unit 3" in b.detail_title.value and b.detail_samples.value[:4] == b"\x89PNG"


def _rgba(png):
    import io
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).astype(int)


def test_pictures_suit_the_light_and_the_dark_theme(session):
    """Strips and grids have transparent gaps (the view's background shows between scenes, in
    any theme: no white seams); every chart and key comes as a light and a dark theme's PNG of
    one layout on a transparent background, their data in the very same colours (a concept's, a
    key's ramp), only the ink of text and axes differing: dark on light, light on dark."""
    from gandissect_widgets.widgets.base import Chart
    b = UnitBrowser(session, per_page=3)
    assert b.wait()
    b.click(0)
    a, r, l = AblationPanel(session), IouRanking(session), LayerSummary(session)
    for v in (b, a, r, l):
        assert v.wait() and v.last_error is None
    card = _rgba(b.visible_cards()[0].children[0].value)
    w = card.shape[1]
    gaps = [x for x in range(w) if (card[:, x, 3] == 0).all()]
    assert gaps and all((card[:, x, 3] == 255).all() for x in range(w) if x not in gaps)
    assert len(gaps) == 3 * 2 * b.scale  # 4 samples, 2 pixel gaps, enlarged
    for grid in (b.detail_samples, b.detail_heat):
        g = _rgba(grid.value)
        assert (g[..., 3] == 0).any() and not (g[..., 3] == 0).all(axis=0).all()
    charts = {"iou": b.detail_iou, "histogram": b.detail_hist, "heat-map key": b.detail_key,
              "difference key": a.scale_bar, "ranking": r.chart, "summary": l.left}
    for name, chart in charts.items():
        assert isinstance(chart, Chart), name
        light, dark = _rgba(chart.light.value), _rgba(chart.dark.value)
        assert chart.value == chart.light.value
        assert light.shape == dark.shape, name
        assert (light[..., 3] == 0).mean() > 0.3 and (dark[..., 3] == 0).mean() > 0.3, name  # transparent
        spread = lambda x: x[..., :3].max(-1) - x[..., :3].min(-1)
        colour = (light[..., 3] == 255) & ((spread(light) > 60) | (name == "difference key"))  # its ramp is grey
        assert colour.sum() > 50, name
        # pixel for pixel the same colours, but where a line of ink (an axis, a bar's outline) blends in
        assert (dark[colour] == light[colour]).all(-1).mean() > 0.9, f"{name}: its colours differ between the themes"
        main = lambda img: {tuple(c): n for c, n in zip(*np.unique(img[colour], axis=0, return_counts=True)) if n >= 200}
        assert main(dark) == main(light), name
        for img, ink in ((light, lambda v: v < 60), (dark, lambda v: v > 190)):
            drawn = (img[..., 3] > 30) & (img[..., 3] < 255) & (spread(img) < 16)  # text and axes over nothing
            assert drawn.sum() > 100 and ink(np.median(img[drawn][:, 0])), name
    assert "gd-key" in b.detail_key.dark._dom_classes and "gd-for-dark" in b.detail_key.dark._dom_classes


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


# -- what a user meets: progress, cancel, stroke modes, reuse, hostile labels ---------------------

def test_first_insertion_shows_progress_and_computes_every_concept_once():
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), samples=range(4))
    s.dissect(["layer1", "layer2"], n_samples=100, progress=False)
    s.update(concept="red", layer="layer1", selection=[0])
    a = AblationPanel(s)
    assert a.wait()
    seen = []
    show = a._progress
    a._progress = lambda task, done, total, desc: (seen.append((done, total, desc, a.progress_line.layout.display)),
                                                   show(task, done, total, desc))
    assert not s.insertion_ready("layer1")
    before = h(a.editeds)
    s.update(mode="insert")
    assert a.wait() and a.last_error is None
    assert h(a.editeds) != before
    assert seen and seen[-1][0] == seen[-1][1] and "insertion values" in seen[0][2]
    assert "layer1" in seen[0][2] and "layer2" in seen[0][2]  # every dissected layer in the same pass
    assert a.progress_line.layout.display == "none"  # gone once done
    assert s.insertion_ready("layer1") and s.insertion_ready("layer2")
    # another concept, another layer: no second pass
    seen.clear()
    s.update(concept="green")
    s.update(layer="layer2", selection=[1])
    assert a.wait() and a.last_error is None and not seen


def test_insertion_values_of_all_concepts_match_one_concept_at_a_time():
    import torch
    from gandissect_widgets.engine.interventions import InsertionValues
    G, S = gw.load_generator("planted"), gw.load_segmenter("planted")
    iv = InsertionValues(G, S, n_samples=20, seed=0, batch_size=6)
    steps = []
    iv.prepare(["layer1", "layer2"], progress=lambda d, t, desc: steps.append((d, t)))
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    z = G.sample_z(20, 0)
    with gw.TraceDict(G, ["layer1", "layer2"]) as tr:
        x = G(z)
    seg = S(x)
    for layer in ("layer1", "layer2"):
        r = tr[layer].output
        for c, name in enumerate(S.labels):
            present = (seg == c).float()[:, None]
            w = torch.nn.functional.adaptive_avg_pool2d(present, r.shape[-2:])
            if c == 0 or w.sum() == 0:
                if c > 0:
                    with pytest.raises(ValueError, match="never appears"):
                        iv(layer, name)
                continue
            torch.testing.assert_close(iv(layer, name), (r * w).sum((0, 2, 3)) / w.sum(), rtol=1e-5, atol=1e-6)


def test_cancel_stops_long_work_and_keeps_nothing():
    import threading
    from gandissect_widgets.engine.progress import Cancelled
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), samples=range(4))
    s.dissect(["layer1"], n_samples=100, progress=False)
    s.update(concept="blue", layer="layer1")
    r = IouRanking(s)
    started = threading.Event()
    show = r._progress
    r._progress = lambda task, done, total, desc: (started.set(), show(task, done, total, desc))
    unit_ace = s.unit_ace

    def slow(*args, progress=None, **kw):  # a step that takes its time, as every unit of a big layer does
        def report(done, total, desc):
            progress(done, total, desc)
            started.wait(5)
            threading.Event().wait(0.05)
        return unit_ace(*args, progress=report, **kw)
    s.unit_ace = slow
    r.run_ace("full")
    assert started.wait(30)
    r.cancel_button.click()
    assert r.wait(60)
    assert ("layer1", "blue") not in s.ace and r.last_error is None
    assert "cancelled" in r.status.value and r.progress_line.layout.display == "none"
    with pytest.raises(Cancelled):  # the engine side: a callback that raises stops it
        unit_ace("layer1", "blue", n_samples=4, progress=lambda d, t, desc: (_ for _ in ()).throw(Cancelled(desc)))
    s.unit_ace = unit_ace
    r.run_ace("quick")
    assert r.wait(60) and ("layer1", "blue") in s.ace and r.metric.value == "ACE"
    assert r.highlighted == frozenset(r.chosen()) and r.chosen()  # still highlighted after switching


def test_each_stroke_keeps_the_mode_concept_and_layer_it_started_with(session):
    p = PaintWidget(session, sample=2, scale=4)
    assert p.wait()
    p.mode.click("draw")
    p.concept.value = "green"
    p.mouse_down(20, 20)
    p.mode.click("erase")  # changed while the stroke is drawn: the stroke keeps "draw"
    p.concept.value = "blue"
    p.layer.value = "layer2"
    p.mouse_move(30, 30)
    p.mouse_up(30, 30)
    assert p.wait() and p.last_error is None
    st = p.strokes[-1]
    assert (st.mode, st.concept, st.layer) == ("draw", "green", "layer1")
    assert session.concept == "red"  # the brush's concept is the paint widget's own
    p.reset()
    # five blocks of ten rapid strokes, switching mode between blocks, as a user clicks them
    clicked = []
    for block in range(5):
        mode = "draw" if block % 2 == 0 else "erase"
        p.mode.click(mode)
        for i in range(10):
            x, y = 8 + 12 * i, 10 + 20 * block
            p.mouse_down(x, y)
            p.mouse_move(x + 4, y + 2)
            p.mouse_up(x + 4, y + 2)
            clicked.append(mode)
    assert p.wait(120) and p.last_error is None
    assert [st.mode for st in p.strokes] == clicked
    fresh = session.images([p.sample.value], p.interventions())[0]
    assert np.array_equal(p._image, fresh)
    assert h(p.result.value) == h(p.picture.value)


def test_views_reuse_their_widgets():
    import ipywidgets
    from ipywidgets.widgets.widget import _instances
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), samples=range(4))
    s.dissect(["layer1", "layer2"], n_samples=100, progress=False)
    s.update(concept="red", layer="layer1")
    views = [UnitBrowser(s, per_page=4), IouRanking(s), AblationPanel(s), PaintWidget(s), LayerSummary(s)]
    for v in views:
        assert v.wait()

    def churn(i):
        s.update(concept=s.concepts()[i % 5], layer=("layer1", "layer2")[i % 2], selection=[i % 7, (3 * i) % 11])
        views[0].page.value = i % 4
        if i % 10 == 0:  # the detail and the summary's charts cost most: fewer of those
            views[0].click(i % 16)
            views[4].min_iou.value = 0.01 * (i % 9)
        for v in views:
            assert v.wait()
    for i in range(10):
        churn(i)
    count = len(_instances)
    for i in range(100):  # refreshes of every view (pages, concepts, layers, selections, details, charts)
        churn(i)
    assert len(_instances) <= count, f"{len(_instances) - count} widgets more after 100 refreshes"
    assert isinstance(views[0], ipywidgets.VBox)


def test_hostile_labels_reach_no_view_as_html():
    import ipywidgets
    from gandissect_widgets.segmenters.planted import PlantedSegmenter

    class Hostile(PlantedSegmenter):
        def __init__(self):
            super().__init__(4)
            self.labels = ["-", "<img src=x onerror=alert(1)>", "<b>red</b>", "green&amp;", "blue", "yellow"]
    s = gw.Session(gw.load_generator("planted"), Hostile(), samples=range(4))
    s.dissect(["layer1"], n_samples=60, progress=False)
    s.update(concept="<b>red</b>", layer="layer1", selection=[0])
    views = [UnitBrowser(s, per_page=4), IouRanking(s), AblationPanel(s), PaintWidget(s), LayerSummary(s)]
    views[0].click(0)
    views[0].click(int(np.argmax(s.dissection.iou("layer1")[:, 1])))
    for v in views:
        assert v.wait() and v.last_error is None

    def html_of(w):
        if isinstance(w, ipywidgets.Box):
            return "".join(html_of(c) for c in w.children)
        return w.value if isinstance(w, (ipywidgets.HTML, ipywidgets.HTMLMath)) else ""
    markup = "".join(html_of(v) for v in views)
    assert "<img" not in markup and "<b>red</b>" not in markup
    assert "&lt;b&gt;red&lt;/b&gt;" in markup  # shown, as text


def test_two_threads_changing_the_session_leave_every_view_consistent():
    import threading
    from tiny import TinyGenerator, TinySegmenter
    s = gw.Session(TinyGenerator(), TinySegmenter(), samples=range(3))
    s.dissect(["layer1", "layer2"], n_samples=60, progress=False)  # layer1: 6 units, layer2: 5
    s.update(concept="c1", layer="layer1", selection=[5], unit=5)
    s.update(layer="layer2")  # a selection belongs to its layer: switching clears it
    assert s.selection == () and s.unit is None
    s.update(layer="layer1", selection=[5], unit=5)
    with pytest.raises(ValueError, match="out of range"):
        s.update(layer="layer2", selection=[5])  # validated against the new layer
    assert s.layer == "layer1" and s.selection == (5,)  # nothing of a refused update is applied
    views = [UnitBrowser(s, per_page=4), IouRanking(s), AblationPanel(s), LayerSummary(s)]
    errors = []

    def changes(seed):
        rng = np.random.RandomState(seed)
        for _ in range(300):
            layer = ("layer1", "layer2")[rng.randint(2)]
            n = s.n_units(layer)
            try:
                pick = rng.randint(4)
                if pick == 0:
                    s.update(layer=layer, selection=rng.choice(n, 3, replace=False).tolist())
                elif pick == 1:
                    s.update(concept=s.concepts()[rng.randint(4)], mode=("ablate", "insert")[rng.randint(2)])
                elif pick == 2:
                    s.update(samples=rng.choice(8, 2, replace=False).tolist())
                else:
                    s.update(layer=layer, unit=int(rng.randint(n)))
            except ValueError as e:  # a unit of the other thread's layer: refused whole, never applied
                if "out of range" not in str(e):
                    errors.append(e)
            except Exception as e:  # noqa: BLE001 - anything else is a bug
                errors.append(e)
    threads = [threading.Thread(target=changes, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    for v in views:
        assert v.wait(120)
    assert all(u < s.n_units(s.layer) for u in s.selection)
    s.update(selection=[0], mode="ablate")  # a toggle after the storm works
    for v in views:
        assert v.wait(120)
        assert v.last_error is None, (type(v).__name__, v.last_error)
    assert views[2].unit_toggles()[0].value is True


def test_views_rank_and_cut_off_as_the_engine_does(session):
    """The browser's sorts, its "interpretable only" filter, the ranking's order (NaN ACE left out)
    and the summary's default cut-off are the engine's (readout.descending, DEFAULT_MIN_IOU)."""
    d = session.dissection
    ious, names = d.unit_ious("layer2"), d.unit_labels("layer2")
    b = UnitBrowser(session, per_page=6)
    b.layer.value = "layer2"
    b.sort.value = "concept"
    assert b.wait() and b.order() == sorted(range(len(ious)), key=lambda u: (names[u], -ious[u], u))
    b.sort.value = "iou"
    assert b.wait() and b.order() == sorted(range(len(ious)), key=lambda u: (-ious[u], u))
    b.interp_only.value = True
    assert b.wait() and b.order() == [u for u in sorted(range(len(ious)), key=lambda u: (-ious[u], u))
                                      if ious[u] > DEFAULT_MIN_IOU]
    assert 0 < len(b.order()) < len(ious)
    r = IouRanking(session)
    r.layer.value = "layer2"
    ace = np.linspace(0.1, 0.4, len(ious))[::-1].copy()
    ace[[0, 5]] = np.nan
    ace[3] = ace[4]  # a tie: by unit
    session.ace[("layer2", r.concept.value)] = ace
    try:
        r.metric.value = "ACE"
        assert r.wait() and r.last_error is None
        assert r.ranked() == sorted(set(range(len(ace))) - {0, 5}, key=lambda u: (-ace[u], u))
    finally:
        session.ace.pop(("layer2", r.concept.value))
        r.metric.value = "IoU"
    assert LayerSummary(session).min_iou.value == DEFAULT_MIN_IOU
