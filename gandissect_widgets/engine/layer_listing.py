"""Which layers of a generator a user can dissect, found by running one sample.

- ``probe_layers(G, layers)``: one forward pass of one sample; per traced layer that ran, its place
  in execution order, output shape, the output in words and bytes per sample.  The one probe of
  layer order and shapes: the dissection, the interventions and the command line all ask it.
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

from typing import NamedTuple, Sequence

import torch

from gandissect_widgets.engine.hooks import TraceDict, layer_names
from gandissect_widgets.engine.protocols import ProtocolError, model_device

__all__ = ["probe_layers", "Probe", "LayerOutput", "module_outputs", "feature_maps", "describe_output"]


class LayerOutput(NamedTuple):
    """What one layer gave in the probe's forward pass (of a module that runs more than once: its
    place is its first finish, the rest describes its last output, the one a ``Trace`` retains)."""
    order: int            # its place in execution order, 0 = the first traced layer to finish
    shape: tuple | None   # the output's full shape (N, C, h, w, ...) when it is a tensor, else None
    kind: str             # the output in words, for messages (``describe_output``)
    type_name: str        # the output's type name ("Tensor", "tuple")
    sample_bytes: int     # bytes of one sample of the output (0 for no tensor or an empty batch)


class Probe(NamedTuple):
    """``probe_layers``' answer: the traced layers that ran, in execution order, and the output."""
    layers: dict          # {name: LayerOutput}, in execution order; layers that did not run are absent
    output: object        # what the generator returned (the images)
    model: str            # the generator's type name, for messages

    @property
    def order(self) -> list[str]:
        """The traced layers that ran, in the order they finished."""
        return list(self.layers)

    def map_shapes(self, names: Sequence[str], needs: str = "dissection") -> dict[str, tuple]:
        """{name: (C,h,w)} of layers whose output is a feature map (N,C,h,w); for any other, a
        ``ProtocolError`` that says what it gave and what ``needs`` it."""
        shapes = {}
        for name in names:
            out = self.layers.get(name)
            if out is None:
                raise ProtocolError(f"layer {name!r} did not run in a forward pass of {self.model}")
            if out.shape is None or len(out.shape) != 4:
                raise ProtocolError(f"layer {name!r} outputs {out.kind}; {needs} needs a convolutional "
                                    "feature map (N,C,h,w)")
            shapes[name] = out.shape[1:]
        return shapes


def probe_layers(G, layers: Sequence[str] | None = None, z=None) -> Probe:
    """One forward pass of one sample (``z[:1]``; default ``G.sample_z(1, 0)`` on the model's
    device), tracing ``layers`` (default: every module): their execution order and outputs."""
    layers = layer_names(G) if layers is None else list(layers)
    if z is None:
        z = G.sample_z(1, 0).to(model_device(G))
    first, last = [], {}

    def record(out, name):
        if name not in last:
            first.append(name)
        last[name] = out
        return out

    with torch.no_grad(), TraceDict(G, layers, retain_output=False, edit_output=record):
        x = G(z[:1])
    seen = {}
    for i, name in enumerate(first):
        out = last[name]
        tensor = torch.is_tensor(out)
        size = out[0].numel() * out.element_size() if tensor and out.dim() and out.shape[0] else 0
        seen[name] = LayerOutput(i, tuple(out.shape) if tensor else None, describe_output(out),
                                 type(out).__name__, int(size))
    return Probe(seen, x, type(G).__name__)


def _trace(G):
    """(names in module order, {name: shape (C,...) or type name}, names in the order they finished, image shape)."""
    names = layer_names(G)
    p = probe_layers(G, names)
    shapes = {n: o.shape[1:] if o.shape is not None else o.type_name for n, o in p.layers.items()}
    x = p.output
    return names, shapes, p.order, (tuple(x.shape[1:]) if torch.is_tensor(x) else None)


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
