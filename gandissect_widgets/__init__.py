"""gandissect-widgets: GAN Dissection (Bau et al., ICLR 2019) as a daily tool in JupyterLab.

    import gandissect_widgets as gw
    G = gw.load_generator("sceneworld")
    S = gw.load_segmenter("sceneworld")
    d = gw.dissect(G, S, ["layer4", "layer6"], n_samples=1000)
    d.unit_labels("layer4"), d.iou("layer4"), d.ranking("layer4", "tree")
"""
from gandissect_widgets.engine import (Dissection, Edit, ProtocolError, Trace, TraceDict, UnknownLayerError,
                                       dissect, edit_layers, run_from, upsample)
from gandissect_widgets.engine.session import Session
from gandissect_widgets.registry import (list_generators, list_segmenters, load_generator, load_segmenter,
                                         register_generator, register_segmenter)

__version__ = "0.1.0"
__all__ = ["Session", "dissect", "Dissection", "Edit", "Trace", "TraceDict", "edit_layers", "run_from", "upsample",
           "load_generator", "load_segmenter", "register_generator", "register_segmenter",
           "list_generators", "list_segmenters", "ProtocolError", "UnknownLayerError"]
