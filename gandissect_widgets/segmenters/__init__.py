"""Segmenter families, registered by name (``gandissect_widgets.load_segmenter(name, ...)``)."""
from gandissect_widgets.registry import SEGMENTERS

if "planted" not in SEGMENTERS:
    SEGMENTERS.register("planted", "gandissect_widgets.segmenters.planted:load_planted_segmenter",
                        "exact segmenter of the planted generator's images (nearest palette colour)")
if "sceneworld" not in SEGMENTERS:
    SEGMENTERS.register("sceneworld", "gandissect_widgets.world.segmenter:load_segmenter",
                        "the embedded default: a small FCN trained on SceneWorld renders")
