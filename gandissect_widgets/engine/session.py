"""``Session``: one generator, one segmenter, one device and one dissection, shared by every view.

It holds the state that views share (current layer, concept, focused unit, selected units,
sample indices, edit mode) and notifies observers when a piece changes, so a selection made in
one widget shows in the others.  It also caches what interactive re-rendering needs: latents,
each layer's unedited activations for the displayed samples, and insertion values, so a toggle
re-runs only the layers after the edited one.  Model calls are serialised by ``self.lock``:
views may render from worker threads.

``Session.open(result_dir)`` opens a saved result with the models it records (``settings["models"]``,
loaded through the registry and checked against the result's fingerprints), so every view can be
made from a result directory alone.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from gandissect_widgets.engine.hooks import check_units, resolve_layers
from gandissect_widgets.engine.imaging import to_uint8
from gandissect_widgets.engine.interventions import (InsertionValues, Intervention, concept_index,
                                                     concept_presence, layer_activation, render)
from gandissect_widgets.engine.protocols import check_generator, check_segmenter, model_device, segment
from gandissect_widgets.engine.results import Dissection
from gandissect_widgets.engine.upsample import upsample

__all__ = ["Session", "parse_indices", "ResultModelsError"]

_STATE = ("layer", "concept", "unit", "selection", "samples", "mode", "strength", "dissection", "ace")


class ResultModelsError(ValueError):
    """The models of a saved result cannot be loaded, or are not the ones it was made with (one line
    that says what to pass to ``Session.open``)."""


def parse_indices(text: str, limit: int = 10_000) -> list[int]:
    """'0-7', '3, 9, 12-14' -> sample indices, with a clear error on anything else."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"cannot read sample indices {text!r}: use numbers and ranges like '0-7, 12'") from None
    if not out:
        raise ValueError("no sample indices given: use numbers and ranges like '0-7, 12'")
    if min(out) < 0 or len(out) > limit:
        raise ValueError(f"sample indices must be >= 0 and at most {limit} of them")
    return out


class Session:
    """The shared state and caches behind a notebook's widgets.

    State (read as attributes, change with ``update(**changes)``; observers get
    ``(name, old, new)``): ``layer``, ``concept``, ``unit``, ``selection`` (tuple of units of
    ``layer`` chosen for editing), ``samples`` (tuple of sample indices shown), ``mode``
    ("ablate" or "insert"), ``strength`` (insertions set units to ``strength`` times their
    insertion values; default 1, small GANs often need 2-4 to draw an object), ``dissection``,
    ``ace`` ({(layer, concept): (U,) single-unit ACE}).
    """

    def __init__(self, generator=None, segmenter=None, device=None, dissection: Dissection | None = None,
                 layer: str | None = None, concept: str | None = None, seed: int = 0, samples=range(8),
                 insertion_samples: int = 64):
        from gandissect_widgets.registry import load_generator, load_segmenter
        if device is None:
            device = model_device(generator) if isinstance(generator, torch.nn.Module) else \
                ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.generator = generator if generator is not None else load_generator("sceneworld", device=str(self.device))
        self.segmenter = segmenter if segmenter is not None else load_segmenter("sceneworld", device=str(self.device))
        check_generator(self.generator)
        check_segmenter(self.segmenter)
        self.generator.to(self.device).eval()
        if isinstance(self.segmenter, torch.nn.Module):
            self.segmenter.to(self.device).eval()
        self.labels = list(self.segmenter.labels)
        self.seed = int(seed)
        self.lock = threading.RLock()  # model calls
        self._state_lock = threading.RLock()  # state changes and their notifications, one at a time
        self._observers: list[tuple[Callable, set | None]] = []
        self._z: dict[int, torch.Tensor] = {}
        self._acts: OrderedDict = OrderedDict()
        self._insertion = InsertionValues(self.generator, self.segmenter, n_samples=insertion_samples)
        self.layer = layer
        self.concept = concept
        self.unit = None
        self.selection: tuple = ()
        self.samples = tuple(int(i) for i in samples)
        self.mode = "ablate"
        self.strength = 1.0
        self.dissection = None
        self.ace: dict = {}
        self.result_dir = None  # the saved result this session was opened from (Session.open)
        if dissection is not None:
            self.set_dissection(dissection)
        if self.layer is None:
            self.layer = self.layers()[0] if self.dissection is not None else None

    @classmethod
    def open(cls, result_dir, generator=None, segmenter=None, checkpoint=None, segmenter_checkpoint=None,
             device=None, trust_pickle: bool = False, verify: bool = True, **options) -> "Session":
        """A session over the result saved in ``result_dir``, with the models it was made with.

        Each model is the one given (a model, or a name / import path with ``checkpoint=`` /
        ``segmenter_checkpoint=``), else the one the result records (``settings["models"]``, written by
        the command line and by ``dissect`` for models the registry made), loaded through the registry
        as ``gandissect report`` does: a recorded import path whose module lies inside ``result_dir``
        is refused (name it yourself if you trust it), and ``trust_pickle`` is only ever yours to give,
        never read from the result.  ``verify``: each model must have the fingerprint the result
        records (``verify=False`` opens with other weights; the pictures then show those).
        ``options`` go to ``Session`` (``layer=``, ``samples=``, ...).  Failures: ``ResultModelsError``."""
        directory = os.fspath(result_dir)
        d = Dissection.load(directory)
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        models = {kind: _result_model(kind, given, ckpt, d, directory, str(device), trust_pickle, verify)
                  for kind, given, ckpt in (("generator", generator, checkpoint),
                                            ("segmenter", segmenter, segmenter_checkpoint))}
        session = cls(models["generator"], models["segmenter"], device=device, dissection=d, **options)
        session.result_dir = directory
        return session

    # -- observation --------------------------------------------------------------------------
    def observe(self, fn: Callable, names: Iterable[str] | None = None):
        """Call ``fn(name, old, new)`` whenever one of ``names`` (default: all) changes."""
        names = set(names) if names is not None else None
        if names is not None and names - set(_STATE):
            raise ValueError(f"unknown session state {sorted(names - set(_STATE))}; known: {', '.join(_STATE)}")
        self._observers.append((fn, names))
        return fn

    def unobserve(self, fn: Callable):
        self._observers = [(f, n) for f, n in self._observers if f is not fn]

    def update(self, **changes):
        """Set several pieces of state, validate them, then notify observers of what changed.

        Atomic: all changes are validated first (against the layer they apply to), then set
        together; concurrent updates from several threads apply one after the other.  Units
        belong to a layer: a change of layer without a new selection clears the selection and
        the focused unit."""
        unknown = set(changes) - set(_STATE)
        if unknown:
            raise ValueError(f"unknown session state {sorted(unknown)}; known: {', '.join(_STATE)}")
        with self._state_lock:
            if "layer" in changes and changes["layer"] != self.layer:
                changes = {"selection": (), "unit": None, **changes}
            clean = {k: self._validate(k, v, changes) for k, v in changes.items()}
            changed = []
            for k, v in clean.items():
                old = getattr(self, k)
                if not _same(old, v):
                    setattr(self, k, v)
                    changed.append((k, old, v))
            for k, old, v in changed:
                for fn, names in list(self._observers):
                    if names is None or k in names:
                        fn(k, old, v)
        return self

    def _validate(self, k, v, changes):
        if k == "layer":
            if v is not None:
                resolve_layers(self.generator, [v])
            return v
        if k == "concept":
            return None if v is None else self.labels[concept_index(self.labels, v)]
        if k == "mode":
            if v not in ("ablate", "insert"):
                raise ValueError(f"mode must be 'ablate' or 'insert', got {v!r}")
            return v
        if k == "strength":
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"strength must be a number, got {v!r}") from None
            if not (0 < v <= 100):
                raise ValueError(f"strength must be in (0, 100], got {v}")
            return v
        if k == "samples":
            v = tuple(int(i) for i in v)
            if not v or min(v) < 0:
                raise ValueError("samples must be a non-empty list of indices >= 0")
            return v
        if k in ("selection",):
            v = tuple(sorted({int(u) for u in v}))
            layer = changes.get("layer", self.layer)
            if v and layer is not None:
                check_units(v, self.n_units(layer), layer)
            return v
        if k == "unit":
            if v is None:
                return None
            v, layer = int(v), changes.get("layer", self.layer)
            if layer is not None:
                check_units([v], self.n_units(layer), layer)
            return v
        if k == "dissection":
            if v is not None and not isinstance(v, Dissection):
                raise ValueError(f"dissection must be a Dissection, got {type(v).__name__}")
            return v
        return v

    # -- dissection ---------------------------------------------------------------------------
    def set_dissection(self, d: Dissection):
        if list(d.labels) != self.labels:
            raise ValueError("the dissection was made with a segmenter of different labels than this session's")
        resolve_layers(self.generator, d.layers)
        self.update(dissection=d, layer=self.layer if self.layer in d.layers else d.layers[0])
        return d

    def dissect(self, layers: Sequence[str], n_samples: int = 1000, **kwargs) -> Dissection:
        """Run (or load from ``cache_dir``) a dissection with this session's models and keep it."""
        from gandissect_widgets.engine.dissection import dissect
        with self.lock:
            d = dissect(self.generator, self.segmenter, layers, n_samples=n_samples, device=self.device, **kwargs)
        return self.set_dissection(d)

    def layers(self) -> list[str]:
        if self.dissection is not None:
            return self.dissection.layers
        from gandissect_widgets.engine.layer_listing import feature_maps
        with self.lock:
            return [n for n, _ in feature_maps(self.generator)]

    def concepts(self) -> list[str]:
        return self.labels[1:]

    def n_units(self, layer: str) -> int:
        if self.dissection is not None and layer in self.dissection.layers:
            return int(self.dissection.array(layer, "shape")[0])
        return int(self.activation(layer, (0,)).shape[1])

    def _need_dissection(self):
        if self.dissection is None:
            raise ValueError("this needs a dissection: call session.dissect([...layers]) or pass dissection=")
        return self.dissection

    # -- latents, activations, images ----------------------------------------------------------
    def latents(self, indices: Sequence[int], seed: int | None = None) -> torch.Tensor:
        """z of sample ``indices`` under ``seed`` (default the session's), on the device."""
        seed = self.seed if seed is None else int(seed)
        need = max(indices) + 1
        z = self._z.get(seed)
        if z is None or z.shape[0] < need:
            n = max(need, 2 * (z.shape[0] if z is not None else 32))
            z = self.generator.sample_z(n, seed)
            self._z[seed] = z
        return z[list(indices)].to(self.device)

    def activation(self, layer: str, indices: Sequence[int], seed: int | None = None) -> torch.Tensor:
        """Unedited output of ``layer`` for the samples (cached: the last few requests)."""
        key = (layer, tuple(indices), self.seed if seed is None else seed)
        with self.lock:
            if key in self._acts:
                self._acts.move_to_end(key)
                return self._acts[key]
            r = layer_activation(self.generator, self.latents(indices, seed), layer)
            self._acts[key] = r
            while len(self._acts) > 16:
                self._acts.popitem(last=False)
            return r

    def render(self, indices: Sequence[int], interventions: Sequence = (), seed: int | None = None) -> torch.Tensor:
        """Images (N,3,H,W) of the samples under ``interventions``, from cached activations."""
        interventions = list(interventions)
        layers = {iv.layer for iv in interventions}
        with self.lock:
            z = self.latents(indices, seed)
            if len(layers) == 1:
                L = next(iter(layers))
                return render(self.generator, z, interventions, activation=self.activation(L, indices, seed), layer=L)
            if not interventions and self.layer is not None:
                return render(self.generator, z, [], activation=self.activation(self.layer, indices, seed),
                              layer=self.layer)
            return render(self.generator, z, interventions)

    def images(self, indices: Sequence[int], interventions: Sequence = (), seed: int | None = None) -> np.ndarray:
        """The same as uint8 (N,H,W,3)."""
        return to_uint8(self.render(indices, interventions, seed))

    def presence(self, images: torch.Tensor, concept) -> np.ndarray:
        """(N,) fraction of pixels of ``concept`` in each image."""
        with self.lock:
            return concept_presence(self.segmenter, images, concept_index(self.labels, concept)).cpu().numpy()

    def segmentation(self, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            return segment(self.segmenter, images)[:, 0].cpu().numpy()

    # -- interventions -------------------------------------------------------------------------
    def insertion_ready(self, layer: str) -> bool:
        """Whether insertions at ``layer`` render at once (their values are computed)."""
        return self._insertion.cached(layer)

    def insertion_values(self, layer: str, concept, progress=False) -> torch.Tensor:
        """(C,) insertion values of ``layer``'s units for ``concept``.  The first call computes
        those of every concept of every dissected layer in one pass over ``insertion_samples``
        samples (seconds on the default world); ``progress`` as in ``engine.progress``."""
        with self.lock:
            if not self._insertion.cached(layer):
                others = self.dissection.layers if self.dissection is not None else []
                self._insertion.prepare([layer] + [l for l in others if l != layer], progress)
            return self._insertion(layer, concept)

    def intervention(self, layer: str, units, mode: str = "ablate", concept=None, region=None,
                     strength: float | None = None, progress=False) -> Intervention:
        """An Intervention with this session's insertion values (for ``concept``), times
        ``strength`` (default the session's), when inserting."""
        values = None
        if mode == "insert":
            concept = concept if concept is not None else self.concept
            if concept is None:
                raise ValueError("an insertion needs a concept (its insertion values come from it)")
            values = self.insertion_values(layer, concept, progress)[torch.as_tensor(list(units), dtype=torch.long)]
            values = values * (self.strength if strength is None else float(strength))
        return Intervention(layer, list(units), mode, values=values, region=region)

    def unit_ace(self, layer: str, concept, n_samples: int = 32, units=None, progress=False) -> np.ndarray:
        """(U,) single-unit ACE with this session's insertion values (NaN for units not in
        ``units``, default all), many units a pass (``engine.ace.unit_ace``; ``progress`` moves
        a step per pass, ``engine.ace.unit_ace_cost`` counts them)."""
        from gandissect_widgets.engine.ace import unit_ace
        self.insertion_values(layer, concept, progress)
        with self.lock:
            return unit_ace(self.generator, self.segmenter, layer, concept, n_samples=n_samples, units=units,
                            insertion=self._insertion, progress=progress)

    def top_units(self, layer: str, concept, k: int) -> list[int]:
        return [int(u) for u in self._need_dissection().ranking(layer, concept)[:k]]

    # -- unit views ----------------------------------------------------------------------------
    def unit_maps(self, layer: str, unit: int, indices: Sequence[int], seed: int | None = None):
        """(upsampled activation maps (N,H,W), masks at the dissection's threshold, images uint8)."""
        d = self._need_dissection()
        with self.lock:
            x = self.render(indices, [], seed)
            seg_hw = segment(self.segmenter, x[:1]).shape[-2:]
            r = self.activation(layer, indices, seed)[:, unit:unit + 1]
            up = upsample(r.float(), seg_hw, d.convention)[:, 0].cpu().numpy()
        return up, up > float(d.thresholds(layer)[unit]), to_uint8(x)

    def unit_top_samples(self, layer: str, unit: int, k: int = 5) -> list[int]:
        d = self._need_dissection()
        return [int(i) for i in d.topk(layer)[unit][:k]]

    def unit_gallery(self, layer: str, units: Sequence[int], k: int = 4) -> dict:
        """{unit: (images (k,H,W,3) uint8, masks (k,h,w) bool, maps (k,h,w))} over each unit's top-k
        dissection samples; masks at the dissection's threshold, maps upsampled as in the dissection.
        One forward for all the samples involved.  Each entry's ``labels`` (k,K,h,w) is the
        segmenter's label map of its images (one segmenter call for the gallery, on first use),
        so a concept's mask can be shown beside the unit's."""
        d = self._need_dissection()
        seed = int(d.settings.get("seed", 1))
        top = {int(u): [int(i) for i in d.topk(layer)[int(u)][:k]] for u in units}
        idx = sorted({i for v in top.values() for i in v})
        if not idx:
            return {}
        pos = {i: j for j, i in enumerate(idx)}
        thr = d.thresholds(layer)
        with self.lock:
            x = self.render(idx, [], seed)
            hw = segment(self.segmenter, x[:1]).shape[-2:]
            r = self.activation(layer, idx, seed)
            imgs = to_uint8(x)
            labels = _Once(lambda: self._labels_of(x))
            out = {}
            for u, samples in top.items():
                rows = [pos[i] for i in samples]
                up = upsample(r[rows, u:u + 1].float(), hw, d.convention)[:, 0].cpu().numpy()
                out[u] = GalleryEntry(imgs[rows], up > thr[u], up, labels, rows)
        return out

    def _labels_of(self, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            return segment(self.segmenter, images).cpu().numpy()


def _result_model(kind, given, checkpoint, d, directory, device, trust_pickle, verify):
    """The ``kind`` model to open the result in ``directory`` with (see ``Session.open``)."""
    from gandissect_widgets.engine.protocols import fingerprint
    from gandissect_widgets.registry import PluginError, load_model, model_to_load
    ckpt_arg = "checkpoint" if kind == "generator" else "segmenter_checkpoint"
    advice = (f"pass {kind}= to Session.open (a model, a name or an import path package.module:factory; "
              f"{ckpt_arg}= for its weights)")
    if given is not None and not isinstance(given, str):  # a model object
        if checkpoint is not None:
            raise ResultModelsError(f"{ckpt_arg}= was given with a {kind} object; give the {kind} by name or "
                                    f"import path to load that checkpoint, or leave {ckpt_arg}= out")
        model, said = given, f"the given {kind} ({type(given).__name__})"
    else:
        try:
            name, checkpoint = model_to_load(kind, d.settings, directory, given, checkpoint, style="python")
        except PluginError as e:  # the result names code that lies inside it
            raise ResultModelsError(str(e)) from None
        recorded = (d.settings.get("models") or {}).get(kind) or {}
        said = f"{kind} {name!r}" + (f" ({recorded['where']})" if given is None and recorded.get("where") else "") \
            + (f" with checkpoint {checkpoint}" if checkpoint else "")
        if given is None and not recorded:
            said += " (the result records only this name, not how to load it)"
        try:
            model = load_model(kind, name, device, checkpoint, trust_pickle)
        except Exception as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            reason = " ".join(str(reason).split()) or type(e).__name__
            raise ResultModelsError(f"cannot load the {kind} of the result in {directory}: {said}: {reason}; "
                                    f"{advice}") from e
    want = d.settings.get(f"{kind}_fingerprint")
    if verify and want and fingerprint(model) != want:
        raise ResultModelsError(f"{said} is not the {kind} the result in {directory} was made with: its fingerprint "
                                f"is {fingerprint(model)}, the result's {want} (other weights, labels or code); "
                                f"{advice}, or verify=False to look at the result with this one")
    return model


class _Once:
    """A value computed on first use, once, from any thread."""

    def __init__(self, fn):
        self._fn, self._lock, self._done, self._value = fn, threading.Lock(), False, None

    def __call__(self):
        with self._lock:
            if not self._done:
                self._value, self._done = self._fn(), True
            return self._value


class GalleryEntry(tuple):
    """``(images, masks, maps)`` of one unit's gallery, plus ``labels``: the segmenter's label maps
    (k,K,h,w) of the images, computed for the whole gallery when first asked for."""

    def __new__(cls, images, masks, maps, labels: _Once, rows):
        entry = super().__new__(cls, (images, masks, maps))
        entry._labels, entry._rows = labels, rows
        return entry

    @property
    def labels(self) -> np.ndarray:
        return self._labels()[self._rows]

    def concept_mask(self, concept: int) -> np.ndarray:
        """(k,h,w) bool: where the segmenter says ``concept`` (any label channel)."""
        return (self.labels == int(concept)).any(1)


def _same(a, b):
    if a is b:
        return True
    try:
        r = a == b
        return bool(r) if not isinstance(r, np.ndarray) else bool(r.all())
    except Exception:
        return False
