"""Segmenter families, registered by name (``gandissect_widgets.load_segmenter(name, ...)``)."""
from gandissect_widgets.registry import SEGMENTERS

if "planted" not in SEGMENTERS:
    SEGMENTERS.register("planted", "gandissect_widgets.segmenters.planted:load_planted_segmenter",
                        "exact segmenter of the planted generator's images (nearest palette colour)")
if "sceneworld" not in SEGMENTERS:
    SEGMENTERS.register("sceneworld", "gandissect_widgets.world.segmenter:load_segmenter",
                        "the embedded default: a small FCN trained on SceneWorld renders")
_REAL = [
    ("upernet", "gandissect_widgets.segmenters.upernet:load_upernet",
     "the papers' Unified Perceptual Parsing UPerNet-ResNet50 (objects, parts, materials): checkpoint=DIR or cached"),
    ("ade20k", "gandissect_widgets.segmenters.csail_ade:load_ade20k",
     "ADE20K-150 resnet50dilated-ppm_deepsup in the CSAIL layout: checkpoint=DIR or cached"),
    ("hf", "gandissect_widgets.segmenters.hf:load_hf_segmenter",
     "a Hugging Face semantic segmenter (needs the [transformers] extra): checkpoint=DIR or hub id"),
]
for _name, _path, _doc in _REAL:
    if _name not in SEGMENTERS:
        SEGMENTERS.register(_name, _path, _doc)
if "upp" not in SEGMENTERS:
    SEGMENTERS.register("upp", "gandissect_widgets.segmenters.upernet:load_upernet", "alias of 'upernet'")
