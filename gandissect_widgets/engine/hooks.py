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
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from gandissect_widgets.engine.protocols import model_device

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
    clone:         copy the retained tensor.  None (default): copy unless the forward stops at
                   this layer, since a later module may write into it in place (an
                   ``nn.ReLU(inplace=True)`` after a BatchNorm would otherwise leave post-ReLU
                   values here); False: keep the tensor itself (cheaper, and unsafe then).
    edit_output:   ``fn(output) -> new_output``, applied after retaining.
    stop:          raise ``StopForward`` after this layer so the rest of the model is skipped.
    """

    def __init__(self, model: nn.Module, layer: str, retain_output: bool = True,
                 detach: bool = True, clone: bool | None = None,
                 edit_output: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 stop: bool = False):
        module = resolve_layers(model, [layer])[layer]
        self.layer = layer
        self.output = None
        clone = (not stop) if clone is None else clone

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
    ``edit_output`` takes ``fn(output, layer_name)``.  ``clone`` as in ``Trace`` (None: every
    retained output but the last layer's is a copy, safe from later in-place writes).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], retain_output: bool = True,
                 detach: bool = True, clone: bool | None = None,
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

    Outputs are the layers' own even when a later module writes into them in place (an
    ``nn.ReLU(inplace=True)`` after a BatchNorm): a layer's output is copied until a forward has
    shown, by the tensor's version counter, that nothing writes into it; from then on it is kept
    uncopied and only its counter is checked (one int), and should a write show up after all the
    layer is copied from then on and the forward run again.  Models whose layers are never
    written into in place pay for one copy of each retained output, in the first forward.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        modules = resolve_layers(model, layers)
        self._local = threading.local()
        self._handles = []
        self._clean: set[str] = set()    # layers seen not written into after their hook
        self._written: set[str] = set()  # layers that a later module writes into: kept as copies
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
            kept, stop, watch = state
            out = output.detach() if torch.is_tensor(output) else output
            if torch.is_tensor(out) and name != stop:  # nothing runs after the stop layer
                version = _version(out)
                if version is not None:
                    watch[name] = (out, version)
                if name not in self._clean or version is None:
                    out = out.clone()
            kept[name] = out
            if name == stop:
                raise StopForward()
            return output
        return hook

    def run(self, forward: Callable[[], object], layers: Sequence[str], stop_after: str | None = None):
        """``(forward(), {layer: output})`` for this thread's call of ``forward``; the result is
        None if it stopped after ``stop_after``.  Outputs of layers that did not run are None."""
        while True:
            kept, watch = dict.fromkeys(layers), {}
            self._local.state = (kept, stop_after, watch)
            try:
                out = forward()
            except StopForward:
                out = None
            finally:
                self._local.state = None
            lost = False
            for name, (t, version) in watch.items():
                if t._version != version:
                    lost |= kept[name] is t  # kept uncopied, and written into since
                    self._written.add(name)
                    self._clean.discard(name)
                elif name not in self._written:
                    self._clean.add(name)
            if not lost:
                return out, kept

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


def _version(t: torch.Tensor):
    """The tensor's version counter (bumped by every in-place write), None where it has none
    (inference-mode tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass
class Edit:
    """``r' = r*(1-a) + k*a`` on the units ``units`` of ``layer``.

    units:  unit indices (or a length-C weight vector in [0,1], for continuous interventions),
            or a (N,C) weight per sample: one forward then renders N different edits (the
            single-unit edits of ``unit_ace``, one unit per sample).
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
        a = _unit_weights(self.units, C, r, self.layer)
        if a.dim() == 2 and a.shape[0] != r.shape[0]:
            raise ValueError(f"per-sample unit weights for {self.layer!r} have {a.shape[0]} rows for "
                             f"{r.shape[0]} samples")
        a = a.view(-1, C, 1, 1)
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


def check_units(units, n_units: int, layer: str | None = None) -> np.ndarray:
    """Unit indices as a flat int64 array, each in 0..n_units-1 (an error names the bad ones and the
    layer's size): the one check of every unit set a user gives (edits, ACE, context, the Session)."""
    u = units.detach().cpu().numpy() if torch.is_tensor(units) else np.asarray(units)
    if u.size == 0:
        raise ValueError("empty unit set: give at least one unit index")
    if u.dtype.kind not in "iu":
        raise ValueError(f"unit indices must be integers, got {u.dtype}")
    u = u.reshape(-1).astype(np.int64)
    bad = [int(x) for x in u if x < 0 or x >= n_units]
    if bad:
        raise ValueError(f"unit index out of range: {bad[:10]}; {layer or 'the layer'} has {n_units} units "
                         f"(0..{n_units - 1})")
    return u


def _unit_index(units, C):
    t = torch.as_tensor(units)
    if t.dtype == torch.bool or t.is_floating_point():
        return None
    t = t.reshape(-1).long()
    return t


def _unit_weights(units, C, like, layer=None):
    t = torch.as_tensor(units, device=like.device)
    if t.numel() == 0:
        raise ValueError("empty unit set: give at least one unit index")
    if t.dtype == torch.bool or t.is_floating_point():
        if t.dim() == 2 and t.shape[1] == C:  # (N,C): a weight vector per sample
            return t.to(like.dtype)
        if t.numel() != C:
            kind = "boolean unit mask" if t.dtype == torch.bool else "unit weight vector"
            raise ValueError(f"a {kind} needs {C} entries (or one row of {C} per sample), "
                             f"got shape {tuple(t.shape)}")
        return t.to(like.dtype).reshape(C)
    t = torch.from_numpy(check_units(t, C, layer)).to(like.device)
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
#
# ``run_from`` needs to know what follows a layer.  It does for: a model with ``forward_from``; a
# chain of nn.Sequentials from the model down to the layer; a Sequential inside any module whose
# forward returns that Sequential's output as it is (the PyTorch tutorial's DCGAN: ``return
# self.main(z)``), seen once in a forward of one latent; and a wrapper (``adapt_generator``) that
# names the module it calls on z unchanged (``resume_module``) and what it does to that module's
# output (``finish``), over any of these.

_RETURNS = weakref.WeakKeyDictionary()  # model -> {module path: whether its output is the model's}


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


def _run_chain(chain, x):
    for seq, name in reversed(chain):
        started = False
        for child_name, child in seq.named_children():
            if started:
                x = child(x)
            elif child_name == name:
                started = True
    return x


def _returns_output_of(root: nn.Module, path: str, forward: Callable[[], object]) -> bool:
    """Whether ``root``'s output is the very tensor module ``path`` outputs, in ``forward()``
    (one forward, in eval mode and without gradients; the modes are restored after it)."""
    seen = _RETURNS.setdefault(root, {})
    if path not in seen:
        outs = {}
        modes = [(m, m.training) for m in root.modules()]
        sub = dict(root.named_modules())[path]
        handles = [m.register_forward_hook(lambda mod, i, o, _k=k: outs.__setitem__(_k, o))
                   for k, m in (("root", root), ("sub", sub))]
        try:
            root.eval()
            with torch.no_grad():
                forward()
        except StopForward:  # a trace of the caller's cut it short: no answer, none kept
            return False
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        seen[path] = "root" in outs and outs.get("sub") is outs["root"]
    return seen[path]


def _tail(model: nn.Module, layer: str, forward: Callable[[], object] | None = None):
    """A function ``activation -> model output`` that runs only what follows ``layer``, or None.
    ``forward``: a call that runs ``model`` on one latent (for the check of what it returns)."""
    if hasattr(model, "forward_from"):
        return lambda a: model.forward_from(layer, a)
    chain = _sequential_path(model, layer)
    if chain is not None:
        return lambda a: _run_chain(chain, a)
    if forward is None and callable(getattr(model, "sample_z", None)):
        forward = lambda: model(model.sample_z(1, 0).to(model_device(model)))  # noqa: E731
    inner = getattr(model, "resume_module", None)
    if isinstance(inner, nn.Module) and inner is not model:
        tail = _tail(inner, layer, forward)
        finish = getattr(model, "finish", None) or (lambda x: x)
        return None if tail is None else (lambda a: finish(tail(a)))
    if forward is None:
        return None
    parts = layer.split(".")
    for i in range(1, len(parts)):  # the outermost Sequential on the way down whose output is returned
        path, rest = ".".join(parts[:i]), ".".join(parts[i:])
        sub = model.get_submodule(path)
        chain = _sequential_path(sub, rest)
        if chain is not None and _returns_output_of(model, path, forward):
            return lambda a: _run_chain(chain, a)
    return None


def can_run_from(model: nn.Module, layer: str) -> bool:
    """Whether ``run_from`` can skip the layers before ``layer`` for this model."""
    return _tail(model, layer) is not None


def run_from(model: nn.Module, layer: str, activation: torch.Tensor, z: torch.Tensor | None = None):
    """The model's output when ``layer`` outputs ``activation``, running only what follows it.

    Uses ``model.forward_from(layer, activation)`` when the model defines it, else the
    nn.Sequential structure: nested Sequentials, a Sequential whose output a module returns as it
    is, and an ``adapt_generator`` wrapper over either (see the notes above ``_tail``).  Other
    models fall back to a full forward from ``z`` with the layer's output replaced (correct, but
    not faster).  ``activation`` is never written into (the layers after it may work in place).
    Edits applied with ``edit_layers`` to later layers still take effect.
    """
    resolve_layers(model, [layer])
    tail = _tail(model, layer)
    if tail is not None:
        return tail(activation.clone())
    if z is None:
        raise ValueError(f"{type(model).__name__} is not an nn.Sequential and has no forward_from(); "
                         "pass z= so run_from can replay the full forward with the layer replaced")
    with Trace(model, layer, retain_output=False, edit_output=lambda out: activation.clone()):
        return model(z)
