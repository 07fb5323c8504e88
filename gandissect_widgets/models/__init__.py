"""Generator families, registered by name (``gandissect_widgets.load_generator(name, ...)``)."""
from gandissect_widgets.registry import GENERATORS

if "planted" not in GENERATORS:
    GENERATORS.register("planted", "gandissect_widgets.models.planted:load_planted_generator",
                        "synthetic generator with known units (concept j = unit j of layer1); tests and demos")
if "sceneworld" not in GENERATORS:
    GENERATORS.register("sceneworld", "gandissect_widgets.world.gan:load_generator",
                        "the embedded default: a 64x64 outdoor-scene GAN trained on SceneWorld renders")
