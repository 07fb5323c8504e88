"""Generator families, registered by name (``gandissect_widgets.load_generator(name, ...)``)."""
from gandissect_widgets.registry import GENERATORS

if "planted" not in GENERATORS:
    GENERATORS.register("planted", "gandissect_widgets.models.planted:load_planted_generator",
                        "synthetic generator with known units (concept j = unit j of layer1); tests and demos")
if "sceneworld" not in GENERATORS:
    GENERATORS.register("sceneworld", "gandissect_widgets.world.gan:load_generator",
                        "the embedded default: a 64x64 outdoor-scene GAN trained on SceneWorld renders")
if "sceneworld-artifacts" not in GENERATORS:
    GENERATORS.register("sceneworld-artifacts", "gandissect_widgets.world.plant_artifacts:load_artifact_generator",
                        "sceneworld with artifact units planted in layer4 (its segmenter: sceneworld); "
                        "ground truth for `gandissect artifacts`")
_REAL = [
    ("progan", "gandissect_widgets.models.progan:load_progan",
     "ProGAN in the GAN Dissection layout: checkpoint=PATH, or name= bedroom, churchoutdoor, conferenceroom, "
     "diningroom, kitchen, livingroom, restaurant, celebhq (downloaded to the cache)"),
    ("stylegan2", "gandissect_widgets.models.stylegan2:load_stylegan2",
     "StyleGAN2: rosinality .pt (g_ema) with checkpoint=PATH; NVIDIA .pkl with trust_pickle=True; truncation="),
    ("biggan", "gandissect_widgets.models.biggan:load_biggan",
     "BigGAN-deep (needs the [biggan] extra): name='biggan-deep-256' or checkpoint=DIR; classes=[...], truncation="),
]
for _name, _path, _doc in _REAL:
    if _name not in GENERATORS:
        GENERATORS.register(_name, _path, _doc)

from gandissect_widgets.models.adapter import adapt_generator  # noqa: E402,F401
