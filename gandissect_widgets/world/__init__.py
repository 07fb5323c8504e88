"""SceneWorld: the embedded default world (procedural scenes, their GAN and segmenter).

    from gandissect_widgets.world.render import render, LABELS
    from gandissect_widgets.world import load_generator, load_segmenter

(The package does not re-export the function ``render``, so that
``gandissect_widgets.world.render`` stays the module.)
"""
from .render import LABELS, LABEL_COLORS, to_tensor, colorize
from .gan import SceneGenerator, load_generator
from .segmenter import SceneSegmenter, load_segmenter

__all__ = ['LABELS', 'LABEL_COLORS', 'to_tensor', 'colorize', 'SceneGenerator',
           'load_generator', 'SceneSegmenter', 'load_segmenter']
