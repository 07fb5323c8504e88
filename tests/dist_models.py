"""A plug-in generator for tests/test_distributed_dissect.py (``--generator dist_models:dying_sceneworld``):
SceneWorld's generator (same weights, so the same cache key) that, on rank GD_DIE_RANK of a job,
kills its process at its GD_DIE_AT-th forward pass, as a crash or the OOM killer would, once
(the marker file GD_DIE_MARKER says it happened: the rerun lives)."""
import os

from gandissect_widgets.registry import load_generator


def dying_sceneworld(**options):
    G = load_generator("sceneworld", **options)
    die_at, marker = int(os.environ.get("GD_DIE_AT", "0")), os.environ.get("GD_DIE_MARKER")
    if die_at and marker and os.environ.get("RANK") == os.environ.get("GD_DIE_RANK", "1") and not os.path.exists(marker):
        calls = [0]

        def count(module, inputs):
            calls[0] += 1
            if calls[0] >= die_at:
                open(marker, "w").close()
                os._exit(3)

        G.register_forward_pre_hook(count)
    return G
