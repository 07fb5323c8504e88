"""Pictures of a unit upsample as its dissection did: a PNAS-convention result's masks are its masks."""
import numpy as np
import pytest

import gandissect_widgets as gw
from gandissect_widgets.engine.upsample import upsample


@pytest.fixture(scope="module", params=["iclr", "pnas"])
def session(request):
    s = gw.Session(gw.load_generator("planted"), gw.load_segmenter("planted"), device="cpu")
    s.dissect(["layer1"], n_samples=48, batch_size=16, progress=False, upsample=request.param)
    return s


def test_gallery_and_unit_maps_use_the_results_convention(session):
    d = session.dissection
    other = {"iclr": "pnas", "pnas": "iclr"}[d.convention]
    unit = 2
    entry = session.unit_gallery("layer1", [unit], k=3)[unit]
    images, masks, maps = entry
    seed = int(d.settings.get("seed", 1))
    samples = [int(i) for i in d.topk("layer1")[unit][:3]]
    r = session.activation("layer1", samples, seed)[:, unit:unit + 1].float()
    hw = maps.shape[-2:]
    mine = upsample(r, hw, d.convention)[:, 0].numpy()
    theirs = upsample(r, hw, other)[:, 0].numpy()
    assert np.array_equal(maps, mine) and not np.array_equal(maps, theirs)  # the conventions differ here
    assert np.array_equal(masks, mine > d.thresholds("layer1")[unit])
    up, m, _ = session.unit_maps("layer1", unit, samples, seed)
    assert np.array_equal(up, mine) and np.array_equal(m, masks)
    assert d.convention in ("iclr", "pnas")
