"""Galleries show the segmenter's concept mask beside the unit's; figure names keep their dots."""
import os

import numpy as np
import pytest

import gandissect_widgets as gw
from gandissect_widgets.report.figures import CONCEPT_OUTLINE, image_grid_figure, save_figure, unit_gallery_figure


@pytest.fixture(scope="module")
def session():
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), device="cpu")
    s.dissect(["layer1"], n_samples=64, batch_size=16, progress=False)
    return s


def test_save_figure_treats_only_image_formats_as_extensions(tmp_path):
    a = image_grid_figure([np.zeros((1, 4, 4, 3), np.uint8)])
    b = image_grid_figure([np.full((1, 4, 4, 3), 255, np.uint8)])
    first = save_figure(a, tmp_path / "gallery_main.5")
    second = save_figure(b, tmp_path / "gallery_main.6")
    assert first == [str(tmp_path / "gallery_main.5.png"), str(tmp_path / "gallery_main.5.pdf")]
    assert second == [str(tmp_path / "gallery_main.6.png"), str(tmp_path / "gallery_main.6.pdf")]
    assert open(first[0], "rb").read() != open(second[0], "rb").read()  # the second did not overwrite the first
    assert save_figure(a, tmp_path / "units.svg") == [str(tmp_path / "units.svg")]
    assert sorted(os.listdir(tmp_path)) == ["gallery_main.5.pdf", "gallery_main.5.png", "gallery_main.6.pdf",
                                            "gallery_main.6.png", "units.svg"]


def test_gallery_entries_carry_the_segmentation_of_their_images(session):
    d = session.dissection
    unit = int(d.ranking("layer1", "red")[0])
    entry = session.unit_gallery("layer1", [unit], k=3)[unit]
    images, masks, maps = entry  # still three things to unpack
    x = session.render(d.topk("layer1")[unit][:3].tolist(), [], seed=int(d.settings["seed"]))
    want = (session.segmenter(x) == d.concept_index("red")).cpu().numpy()
    np.testing.assert_array_equal(entry.concept_mask(d.concept_index("red")), want)
    assert want.any() and masks.shape == want.shape


def test_gallery_figure_shows_concept_masks_under_unit_masks(session, tmp_path):
    d = session.dissection
    rows = [("red", int(d.ranking("layer1", "red")[0])), ("blue", int(d.ranking("layer1", "blue")[0]))]
    gallery = session.unit_gallery("layer1", [u for _, u in rows], k=4)
    fig = unit_gallery_figure(gallery, d, "layer1", rows)
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert ylabels[1] == "segmenter's\nred" and ylabels[3] == "segmenter's\nblue"
    assert ylabels[0].startswith("red\nlayer1 unit")
    png = save_figure(fig, tmp_path / "gallery", formats=("png",))[0]
    import matplotlib.image
    pixels = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    assert (np.abs(pixels - np.array(CONCEPT_OUTLINE)).sum(1) <= 3).sum() > 50  # the concept outlines are drawn


def test_report_cards_show_the_concept_mask_under_the_units(session):
    """A report card's picture: the unit's masks on top, the segmenter's mask of its label below."""
    from gandissect_widgets.engine.imaging import overlay_mask
    from gandissect_widgets.report.html import _unit_strips
    d = session.dissection
    unit = int(d.ranking("layer1", "green")[0])
    picture = _unit_strips(session, "layer1", [unit], 3)[unit]
    images, masks, _ = entry = session.unit_gallery("layer1", [unit], k=3)[unit]
    H, W = images.shape[1:3]
    assert picture.shape[:2] == (2 * H + 2, 3 * W + 4)
    label = int(d.unit_label_ids("layer1")[unit])
    below = overlay_mask(images, entry.concept_mask(label), dim=0.4, color=CONCEPT_OUTLINE)
    above = overlay_mask(images, masks, dim=0.4)
    for j in range(3):
        x = j * (W + 2)
        assert np.array_equal(picture[:H, x:x + W], above[j])
        assert np.array_equal(picture[H + 2:, x:x + W], below[j])
    assert not np.array_equal(above, below)  # two different masks, not one drawn twice
