"""Loading the weights shipped with the package: state_dict + the .json record beside it."""
import json
import os

from gandissect_widgets.checkpoint import torch_load, unwrap_state_dict

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'weights')


def load_shipped(name, build, device='cpu', checkpoint=None, trainer=''):
    """``build(model_config)`` with the weights of ``weights/<name>.pt`` (or ``checkpoint``),
    float32, in eval mode with ``requires_grad`` False (gradients still reach the input).
    The architecture comes from the ``model`` section of the ``.json`` record beside the file."""
    path = checkpoint or os.path.join(WEIGHTS_DIR, f'{name}.pt')
    if not os.path.exists(path):
        raise FileNotFoundError(f'no {name} weights at {path!r}; train them with '
                                f'`python -m gandissect_widgets.world.{trainer}`')
    config = {}
    record = os.path.splitext(path)[0] + '.json'
    if os.path.exists(record):
        with open(record) as f:
            config = json.load(f).get('model', {})
    state = unwrap_state_dict(torch_load(path), keys=())  # weights only: anything more is refused, clearly
    model = build(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval().requires_grad_(False)
    return model.to(device)
