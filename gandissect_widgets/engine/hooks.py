"""Forward hooks addressed by module path: retain, edit and cut short a generator's forward.

- ``Trace(model, "layer4")``: context manager that retains (and optionally edits) one layer's output.
- ``TraceDict(model, ["layer3", "layer4"])``: the same for several layers at once.
- ``ThreadTraces(model, layers)``: retains layer outputs of forward passes run from several
  threads at once, each thread's apart.
- ``StopForward``: raised by a trace with ``stop=True`` to end the forward at that layer.
- ``Edit``: ``r' = r*(1-a) + k*a`` on a unit set, optionally inside a mask at the layer's grid.
- ``edit_layers(model, edits)``: applies a list of edits for the duration of a ``with`` block.
- ``run_from(model, layer, activation)``: runs only the layers after ``layer``, from a cached output.
- ``resolve_layers(model, names)``: checks names, with an error that lists the known ones.

Example::

    with Trace(G, "layer4", stop=True) as tr:
        G(z)                       # stops right after layer4
    r = tr.output                  # (N, C, h, w)
    ablate = Edit("layer4", units=[3, 17])
    x = run_from(G, "layer4", ablate.apply(r))

All hooks are ``register_forward_hook`` handles removed on exit, whatever happens inside.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["Trace", "TraceDict", "ThreadTraces", "StopForward", "Edit", "compose_edits", "edit_layers",
           "run_from", "resolve_layers", "layer_names", "UnknownLayerError"]


class UnknownLayerError(KeyError):
    """A layer path that the model does not have (the message lists the ones it has)."""

    def __str__(self):  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class StopForward(Exception):
    """Raised inside a forward to end it early; ``Trace``/``TraceDict`` swallow it on exit."""


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable module path of ``model`` (the root, named '', excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if not isinstance(name, str) or not name or name not in modules:
            known = layer_names(model)
            shown = ", ".join(known[:60]) + (" ..." if len(known) > 60 else "")
            raise UnknownLayerError(
                f"unknown layer {name!r} for {type(model).__name__}; known layers: {shown}")
        out[name] = modules[name]
    return out


class Trace(contextlib.AbstractContextManager):
    """Retain and/or edit the output of one module, named by its path.

    retain_output: keep the (pre-edit) output in ``self.output``.
    detach:        detach the retained tensor from the autograd graph.
    clone:         copy the retained tensor (needed if later layers modify it in place).
    edit_output:   ``fn(output) -> new_output``, applied after retaining.
    stop:          raise ``StopForward`` after this layer so the rest of the model is skipped.
    """

    def __init__(self, model: nn.Module, layer: str, retain_output: bool = True,
                 detach: bool = True, clone: bool = False,
                 edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 stop: bool = False):
        module = resolve_layers(model, [layer])[layer]
        self.layer = layer
        self.output = None

        def hook(mod, inputs, output):
            if retain_output:
                kept = output
                if detach and torch.is_tensor(kept):
                    kept = kept.detach()
                if clone and torch.is_tensor(kept):
                    kept = kept.clone()
                self.output = kept
            if edit_output is not None:
                output = edit_output(output)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def close(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict, contextlib.AbstractContextManager):
    """``Trace`` over several layers; ``self[name]`` is that layer's Trace.

    ``stop=True`` ends the forward after the last of ``layers`` in execution order
    (found with a first forward, or given by ``stop_after``).
    ``edit_output`` takes ``fn(output, layer_name)``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], retain_output: bool = True,
                 detach: bool = True, clone: bool = False,
                 edit_output: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                 stop_after: str | None = None):
        super().__init__()
        resolve_layers(model, layers)  # one clear error for any unknown name
        if stop_after is not None and stop_after not in layers:
            raise ValueError(f"stop_after={stop_after!r} is not among the traced layers {list(layers)}")
        for name in layers:
            fn = None
            if edit_output is not None:
                fn = (lambda out, _n=name: edit_output(out, _n))
            self[name] = Trace(model, name, retain_output=retain_output, detach=detach,
                               clone=clone, edit_output=fn, stop=(name == stop_after))

    def close(self):
        for tr in self.values():
            tr.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class ThreadTraces(contextlib.AbstractContextManager):
    """Retains the outputs of ``layers`` in forward passes that several threads run at once.

    Torch does not guard a module's hook table: registering or removing a hook while another
    thread runs the model can lose a hook or break that forward, so the hooks are registered
    once, here, and each thread's ``run`` keeps its own outputs (``threading.local``).

        with ThreadTraces(G, ["layer3", "layer4"]) as traces:
            x, outs = traces.run(lambda: G(z), ["layer4"], stop_after="layer4")  # from any thread
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        modules = resolve_layers(model, layers)
        self._local = threading.local()
        self._handles = []
        try:
            for name, module in modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise

    def _hook(self, name):
        def hook(mod, inputs, output):
            state = getattr(self._local, "state", None)
            if state is None or name not in state[0]:
                return output
            kept, stop = state
            kept[name] = output.detach() if torch.is_tensor(output) else output
            if name == stop:
                raise StopForward()
            return output
        return hook

    def run(self, forward: Callable[[], object], layers: Sequence[str], stop_after: str | None = None):
        """``(forward(), {layer: output})`` for this thread's call of ``forward``; the result is
        None if it stopped after ``stop_after``.  Outputs of layers that did not run are None."""
        kept = dict.fromkeys(layers)
        self._local.state = (kept, stop_after)
        try:
            out = forward()
        except StopForward:
            out = None
        finally:
            self._local.state = None
        return out, kept

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


@dataclass
class Edit:
    """``r' = r*(1-a) + k*a`` on the units ``units`` of ``layer``.

    units:  unit indices (or a length-C weight vector in [0,1], for continuous interventions).
    value:  k: None or 0 for ablation; a scalar, or a per-unit tensor of len(units) (or C), for insertion.
    mask:   None (everywhere) or a (h,w) / (N,1,h,w) tensor in [0,1] at the layer's resolution.
    """

    layer: str
    units: object
    value: object = None
    mask: object = None

    def alpha_value(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (a, k) pair of this edit, broadcastable to ``r`` (N,C,h,w)."""
        if r.dim() != 4:
            raise ValueError(f"Edit at {self.layer!r} needs a (N,C,h,w) activation, got shape {tuple(r.shape)}")
        C = r.shape[1]
        a = _unit_weights(self.units, C, r)
        a = a.view(1, C, 1, 1)
        if self.mask is not None:
            m = torch.as_tensor(self.mask, dtype=r.dtype, device=r.device)
            if m.dim() == 2:
                m = m[None, None]
            elif m.dim() == 3:
                m = m[:, None]
            if m.shape[-2:] != r.shape[-2:]:
                raise ValueError(f"mask for {self.layer!r} has spatial size {tuple(m.shape[-2:])}, "
                                 f"but the layer's grid is {tuple(r.shape[-2:])}")
            a = a * m
        k = torch.zeros(1, C, 1, 1, dtype=r.dtype, device=r.device)
        if self.value is not None:
            v = torch.as_tensor(self.value, dtype=r.dtype, device=r.device)
            if v.dim() == 0:
                k = k + v
            elif v.numel() == C:
                k = v.reshape(1, C, 1, 1)
            else:
                idx = _unit_index(self.units, C)
                if idx is None or v.numel() != len(idx):
                    raise ValueError(f"insertion value for {self.layer!r} must be a scalar, one value per "
                                     f"edited unit, or one per channel ({C}); got {v.numel()} values")
                k = k.clone()
                k[0, idx.to(r.device), 0, 0] = v.reshape(-1)
        return a, k

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        a, k = self.alpha_value(r)
        return r * (1 - a) + k * a


def _unit_index(units, C):
    t = torch.as_tensor(units)
    if t.dtype == torch.bool or t.is_floating_point():
        return None
    t = t.reshape(-1).long()
    return t


def _unit_weights(units, C, like):
    t = torch.as_tensor(units, device=like.device)
    if t.numel() == 0:
        raise ValueError("empty unit set: give at least one unit index")
    if t.dtype == torch.bool:
        if t.numel() != C:
            raise ValueError(f"a boolean unit mask needs {C} entries, got {t.numel()}")
        return t.to(like.dtype)
    if t.is_floating_point():
        if t.numel() != C:
            raise ValueError(f"a unit weight vector needs {C} entries, got {t.numel()}")
        return t.to(like.dtype)
    t = t.reshape(-1).long()
    if t.numel() == 0:
        raise ValueError("empty unit set: give at least one unit index")
    if int(t.min()) < 0 or int(t.max()) >= C:
        bad = [int(u) for u in t.tolist() if u < 0 or u >= C]
        raise ValueError(f"unit index out of range: {bad[:10]}; the layer has {C} units (0..{C - 1})")
    a = torch.zeros(C, dtype=like.dtype, device=like.device)
    a[t] = 1
    return a


def compose_edits(edits: Sequence[Edit], r: torch.Tensor) -> torch.Tensor:
    """Apply several edits of one layer in order (later ones over earlier ones).

    Sequential application equals GANPaint's alpha compositing
    ``a = 1-(1-a1)(1-a2)``, ``k = (k1*a1*(1-a2) + k2*a2)/a``.
    """
    for e in edits:
        r = e.apply(r)
    return r


@contextlib.contextmanager
def edit_layers(model: nn.Module, edits: Sequence[Edit]):
    """Apply ``edits`` to every forward of ``model`` inside the ``with`` block."""
    by_layer: dict[str, list[Edit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    resolve_layers(model, by_layer)
    with TraceDict(model, list(by_layer), retain_output=False,
                   edit_output=lambda out, name: compose_edits(by_layer[name], out)):
        yield


# ---------------------------------------------------------------------------------------------
# Partial forward

def _sequential_path(model: nn.Module, layer: str):
    """[(seq, child_name), ...] from the outermost Sequential down to ``layer``, or None."""
    parts = layer.split(".")
    chain = []
    mod = model
    for i, p in enumerate(parts):
        if not isinstance(mod, nn.Sequential):
            return None
        names = [n for n, _ in mod.named_children()]
        if p not in names:
            return None
        chain.append((mod, p))
        mod = getattr(mod, p)
    return chain


def can_run_from(model: nn.Module, layer: str) -> bool:
    """Whether ``run_from`` can skip the layers before ``layer`` for this model."""
    return hasattr(model, "forward_from") or _sequential_path(model, layer) is not None


def run_from(model: nn.Module, layer: str, activation: torch.Tensor, z: torch.Tensor | None = None):
    """The model's output when ``layer`` outputs ``activation``, running only what follows it.

    Uses ``model.forward_from(layer, activation)`` when the model defines it, else the
    nn.Sequential structure (nested Sequentials too).  Other models fall back to a full forward
    from ``z`` with the layer's output replaced (correct, but not faster).
    Edits applied with ``edit_layers`` to later layers still take effect.
    """
    resolve_layers(model, [layer])
    if hasattr(model, "forward_from"):
        return model.forward_from(layer, activation)
    chain = _sequential_path(model, layer)
    if chain is not None:
        x = activation
        for seq, name in reversed(chain):
            started = False
            for child_name, child in seq.named_children():
                if started:
                    x = child(x)
                elif child_name == name:
                    started = True
        return x
    if z is None:
        raise ValueError(f"{type(model).__name__} is not an nn.Sequential and has no forward_from(); "
                         "pass z= so run_from can replay the full forward with the layer replaced")
    with Trace(model, layer, retain_output=False, edit_output=lambda out: activation):
        return model(z)
