"""Which layers of a generator a user can dissect, found by running one sample.

- ``module_outputs(G)``: every module that runs, with its output's shape (C,h,w) or type name.
- ``feature_maps(G)``: the feature maps to dissect, in forward order: modules whose output is a
  (N,C,h,w) tensor, nested ones included.  A container is opened up, not listed, when its own
  output is not a feature map (a tuple, a flat vector, a ModuleList that never runs itself), or
  when it only wraps the network: its output is the image while modules inside it give feature
  maps of other shapes (``main`` of an ``nn.Sequential`` DCGAN, a wrapper module).  A block whose
  output is a feature map (SceneWorld's ``layer4``) is listed as one layer, its parts only by
  ``module_outputs``.
"""
from __future__ import annotations

import torch

from gandissect_widgets.engine.hooks import TraceDict, layer_names
from gandissect_widgets.engine.protocols import model_device

__all__ = ["module_outputs", "feature_maps", "describe_output"]


def _trace(G):
    """(names in module order, {name: shape or type name}, names in the order they finished, image shape)."""
    names = layer_names(G)
    shapes, order = {}, []

    def record(out, name):
        if name not in shapes:
            order.append(name)
            shapes[name] = tuple(out.shape[1:]) if torch.is_tensor(out) else type(out).__name__
        return out

    with torch.no_grad(), TraceDict(G, names, retain_output=False, edit_output=record):
        x = G(G.sample_z(1, 0).to(model_device(G)))
    return names, shapes, order, (tuple(x.shape[1:]) if torch.is_tensor(x) else None)


def module_outputs(G) -> list[tuple[str, tuple | str]]:
    """[(path, output shape (C,...) or the output's type name)] of every module that runs, in module order."""
    names, shapes, _, _ = _trace(G)
    return [(n, shapes[n]) for n in names if n in shapes]


def feature_maps(G) -> list[tuple[str, tuple]]:
    """[(path, (C,h,w))] of the layers to dissect, in forward order (see the module docstring)."""
    names, shapes, order, image = _trace(G)

    def is_map(n):
        return isinstance(shapes.get(n), tuple) and len(shapes[n]) == 3

    children: dict[str, list[str]] = {}
    for n in names:
        children.setdefault(n.rpartition(".")[0], []).append(n)

    def wraps_the_network(n):
        return shapes[n] == image and any(is_map(m) and shapes[m] != image for m in names if m.startswith(n + "."))

    picked = []

    def visit(n):
        if n and is_map(n) and not (children.get(n) and wraps_the_network(n)):
            picked.append(n)
            return
        for child in children.get(n, []):
            visit(child)

    visit("")
    finished = {n: i for i, n in enumerate(order)}
    return [(n, shapes[n]) for n in sorted(picked, key=finished.__getitem__)]


def describe_output(out) -> str:
    """A module's output in words, for messages: "a tensor of shape (1, 8)", "a tuple of 2 tensors"."""
    if torch.is_tensor(out):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        kinds = {"tensor" if torch.is_tensor(o) else type(o).__name__ for o in out}
        what = f"{next(iter(kinds))}s" if len(kinds) == 1 else "items"
        return f"a {type(out).__name__} of {len(out)} {what if len(out) != 1 else what[:-1]}"
    return "None" if out is None else f"a {type(out).__name__}"
