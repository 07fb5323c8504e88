"""Real segmenter families: random weights saved in the real layouts, loaded back through the registry;
the exact PrRoI pooling; and one end-to-end dissection of a random ProGAN against a random UPerNet."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import gandissect_widgets as gw
from gandissect_widgets.checkpoint import CheckpointError
from gandissect_widgets.segmenters.ade20k_labels import ADE20K_150
from gandissect_widgets.segmenters.prroi_pool import prroi_pool_full
from gandissect_widgets.segmenters.upernet import UnifiedParsingSegmenter

from tiny_real import UPP_LABELS, save_upp, tiny_ade_parts, tiny_progan, tiny_upp_parts


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# -- PrRoI pooling -------------------------------------------------------------------------------

def _brute_force_prroi(x, bins, roi, steps=240):
    """Midpoint-rule average of the bilinear field (grid_sample, zeros outside) over each bin."""
    N, C, H, W = x.shape
    x0, y0, x1, y1 = roi
    out = torch.zeros(N, C, bins, bins, dtype=torch.float64)
    for a in range(bins):
        for b in range(bins):
            ya, yb = y0 + (y1 - y0) * a / bins, y0 + (y1 - y0) * (a + 1) / bins
            xa, xb = x0 + (x1 - x0) * b / bins, x0 + (x1 - x0) * (b + 1) / bins
            ys = ya + (torch.arange(steps, dtype=torch.float64) + 0.5) * (yb - ya) / steps
            xs = xa + (torch.arange(steps, dtype=torch.float64) + 0.5) * (xb - xa) / steps
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            # align_corners=True: -1 and 1 are the centres of the first and last pixels (at 0 and W-1)
            grid = torch.stack([gx / (W - 1) * 2 - 1, gy / (H - 1) * 2 - 1], -1)[None].expand(N, -1, -1, -1)
            f = F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out[:, :, a, b] = f.mean((2, 3))
    return out


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_prroi_pool_is_the_exact_bin_average(bins):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    exact = prroi_pool_full(x, bins)
    assert exact.shape == (2, 3, bins, bins)
    brute = _brute_force_prroi(x, bins, (0.0, 0.0, 7.0, 5.0))
    assert torch.allclose(exact, brute, atol=2e-4), (exact - brute).abs().max()


def test_prroi_pool_inner_roi_and_constant_field():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    roi = (0.7, 1.3, 4.2, 5.0)
    assert torch.allclose(prroi_pool_full(x, 3, roi), _brute_force_prroi(x, 3, roi), atol=2e-4)
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    # inside [0, W-1] the field of a constant map is that constant
    assert torch.allclose(prroi_pool_full(ones, 3, (0, 0, 3, 3)), torch.ones(1, 1, 3, 3, dtype=torch.float64))


# -- UPerNet (UPP) -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upp_dir(tmp_path_factory):
    enc, dec = tiny_upp_parts()
    folder = save_upp(str(tmp_path_factory.mktemp("upp")), enc, dec)
    return folder, enc, dec


def test_upp_roundtrip_labels_and_outputs(upp_dir):
    folder, enc, dec = upp_dir
    S = gw.load_segmenter("upernet", checkpoint=folder, segsizes=None)
    mem = UnifiedParsingSegmenter(enc, dec, UPP_LABELS, segsizes=None).eval()
    x = _images()
    with torch.no_grad():
        seg, ref = S(x), mem(x)
        prob = S.probabilities(x)
    assert seg.dtype == torch.long and seg.shape == (2, 3, 64, 64) and torch.equal(seg, ref)
    assert S.labels == ["-", "sky", "building", "person", "tree", "window", "door", "glass",
                        "wood", "glass (material)", "brick", "cloud", "roof", "head", "arm"]
    assert S.categories[8:11] == ["material"] * 3 and S.categories[11:] == ["part"] * 4
    assert prob.shape == (2, len(S.labels), 64, 64)
    # object channel = argmax of the object probabilities
    assert torch.equal(prob[:, :8].argmax(1), seg[:, 0])
    # materials live in the material range, parts only inside their owner object
    mat = seg[:, 1]
    assert bool(((mat == 0) | ((mat >= 8) & (mat <= 10))).all())
    part = seg[:, 2]
    owner = {11: 1, 12: 2, 5: 2, 6: 2, 13: 3, 14: 3}
    for p, o in owner.items():
        assert bool((seg[:, 0][part == p] == o).all())
    assert len(set(S.labels)) == len(S.labels)
    gw.engine.protocols.check_segmenter(S)


def test_upp_input_convention_and_sizes(upp_dir):
    folder, enc, dec = upp_dir
    S = gw.load_segmenter("upp", checkpoint=folder, segsizes=(32,), downsample=2)
    x = _images(1)
    with torch.no_grad():
        seg = S(x)
        # by hand: BGR, 0..255, mean subtracted, average-pooled to 32, output at 64 / 2
        bgr = torch.flip((x + 1) / 2 * 255, (1,)) - torch.tensor([102.9801, 115.9465, 122.7717]).view(1, 3, 1, 1)
        logits = dec(enc(F.adaptive_avg_pool2d(bgr, 32)))
        obj = F.interpolate(logits["object"], size=(32, 32), mode="bilinear", align_corners=False).argmax(1)
    assert seg.shape == (1, 3, 32, 32) and torch.equal(seg[:, 0], obj)


def test_upp_quadrants_option(upp_dir):
    folder, _, _ = upp_dir
    S = gw.load_segmenter("upernet", checkpoint=folder, segsizes=None, quad=True)
    n = 7
    assert len(S.labels) == 1 + 5 * n + 3 + 4 and S.labels[1 + n] == "sky-t" and S.labels[1 + 4 * n] == "sky-r"
    with torch.no_grad():
        seg = S(_images(1))
    assert seg.shape == (1, 5, 64, 64)
    obj, tb, lr = seg[0, 0], seg[0, 3], seg[0, 4]
    fg = obj > 0
    assert bool(((tb[fg] - obj[fg]) % n == 0).all()) and bool((tb[~fg] == 0).all())
    assert set(((tb[fg] - obj[fg]) // n).tolist()) <= {1, 3} and set(((lr[fg] - obj[fg]) // n).tolist()) <= {2, 4}
    assert int(seg.max()) < len(S.labels)


def test_upp_strict_keys_and_label_mismatch(upp_dir, tmp_path):
    folder, enc, dec = upp_dir
    sd = dec.state_dict()
    del sd["conv_fusion.0.weight"]
    bad = save_upp(str(tmp_path / "bad"), enc, dec)
    torch.save(sd, os.path.join(bad, "decoder_epoch_40.pth"))
    with pytest.raises(CheckpointError, match="missing keys: conv_fusion.0.weight"):
        gw.load_segmenter("upernet", checkpoint=bad)
    labels = dict(UPP_LABELS, object=UPP_LABELS["object"] + ["car"])
    mism = save_upp(str(tmp_path / "mism"), enc, dec, labels=labels)
    with pytest.raises(CheckpointError, match="object head has 8 classes but labels.json lists 9"):
        gw.load_segmenter("upernet", checkpoint=mism)
    with pytest.raises(FileNotFoundError, match="encoder_epoch_40.pth"):
        gw.load_segmenter("upernet", checkpoint=str(tmp_path))


# -- ADE20K (CSAIL layout) ------------------------------------------------------------------------

def test_ade20k_roundtrip(tmp_path):
    enc, dec = tiny_ade_parts()
    torch.save(enc.state_dict(), tmp_path / "encoder_epoch_20.pth")
    torch.save({"state_dict": dec.state_dict()}, tmp_path / "decoder_epoch_20.pth")
    S = gw.load_segmenter("ade20k", checkpoint=str(tmp_path))
    assert S.labels[0] == "-" and S.labels[1:] == ADE20K_150 and S.labels[5] == "tree"
    x = _images(2, 32)
    with torch.no_grad():
        seg, prob = S(x), S.probabilities(x)
        norm = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        feats = enc(norm)
        logits = F.interpolate(dec(feats), size=(32, 32), mode="bilinear", align_corners=False)
    assert feats[-1].shape[-1] == 4  # dilated: C5 at stride 8
    assert seg.shape == (2, 32, 32) and torch.equal(seg, logits.argmax(1) + 1)
    assert prob.shape == (2, 151, 32, 32) and float(prob[:, 0].abs().max()) == 0
    assert torch.allclose(prob.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    with pytest.raises(ValueError, match="resnet50dilated-ppm_deepsup"):
        gw.load_segmenter("ade20k", checkpoint=str(tmp_path), arch="hrnetv2")


# -- Hugging Face ----------------------------------------------------------------------------------

def test_hf_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"gandissect-widgets\[transformers\]"):
        gw.load_segmenter("hf", checkpoint="anywhere")


def test_hf_tiny_segformer_from_folder(tmp_path):
    import transformers  # installed by the test extra: no skip
    cfg = transformers.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                       hidden_sizes=[8, 16], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                       patch_sizes=[7, 3], strides=[4, 2], decoder_hidden_size=16, num_labels=4,
                                       id2label={0: "wall", 1: "sky", 2: "tree", 3: "sky"},
                                       label2id={"wall": 0, "sky": 1, "tree": 2})
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 48, "width": 48}, "do_normalize": True,
         "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    S = gw.load_segmenter("hf", checkpoint=str(tmp_path))
    assert S.labels == ["-", "wall", "sky", "tree", "sky (3)"]
    x = _images(2, 32)
    with torch.no_grad():
        seg, prob = S(x), S.probabilities(x)
        norm = ((x + 1) / 2 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
            1, 3, 1, 1)
        norm = F.interpolate(norm, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
        logits = F.interpolate(model(pixel_values=norm).logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert seg.shape == (2, 32, 32) and torch.equal(seg, logits.argmax(1) + 1)
    assert prob.shape == (2, 5, 32, 32)


# -- end to end ------------------------------------------------------------------------------------

def test_dissect_random_progan_against_random_upernet(upp_dir):
    folder, _, _ = upp_dir
    G = tiny_progan()
    S = gw.load_segmenter("upernet", checkpoint=folder, segsizes=None)
    d = gw.dissect(G, S, ["layer2", "layer4"], n_samples=16, batch_size=8, progress=False)
    assert d.labels == S.labels
    iou2, iou4 = d.iou("layer2"), d.iou("layer4")
    assert iou2.shape == (16, len(S.labels)) and iou4.shape == (16, len(S.labels))
    assert float(iou4.max()) > 0 and float(iou4.min()) >= 0 and float(iou4.max()) <= 1
    assert len(d.unit_labels("layer4")) == 16
