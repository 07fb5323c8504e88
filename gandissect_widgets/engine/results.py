"""``Dissection``: the result of ``dissect()``, with documented shapes, saved and loaded whole.

On disk a dissection is two files in one directory: ``dissect.json`` (settings, labels and a
per-unit summary; the schema is in the README) and ``arrays.npz`` (the arrays below, keyed
``"<layer>/<name>"``).  The JSON records the SHA-256 of the arrays file, so a mismatched pair is
refused on load.  Both are written atomically, arrays first.

Per layer (U units, C = len(labels) concepts, k top samples):
    iou            (U, C) float64  dataset-level IoU; column 0 (unlabeled) is 0
    intersection   (U, C) int64    sum_z |M_u & S_c| pixels
    mask_pixels    (U,)   int64    sum_z |M_u|
    concept_pixels (C,)   int64    sum_z |S_c|
    n_pixels       ()     int64    pixels per unit over all samples
    thresholds     (U,)   float32  t_u, activation units
    fraction_above (U,)   float64  fraction of pixels with activation > t_u (target 1 - quantile)
    topk_indices   (U, k) int64    sample indices, by descending max activation
    topk_values    (U, k) float32  those max activations (upsampled maps)
    mean, std, min, max (U,) float64  of the activations (layer grid)
    shape          (3,)   int64    the layer's output shape (C, h, w)
"""
from __future__ import annotations

import json
import os

import numpy as np

from gandissect_widgets.engine.io import atomic_save_npz, atomic_write_json, sha256_file

__all__ = ["Dissection", "DEFAULT_MIN_IOU", "FORMAT"]

DEFAULT_MIN_IOU = 0.04
FORMAT = "gandissect-widgets/dissection"
VERSION = 1
_ARRAYS = ("iou", "intersection", "mask_pixels", "concept_pixels", "n_pixels", "thresholds",
           "fraction_above", "topk_indices", "topk_values", "mean", "std", "min", "max", "shape")


class Dissection:
    """Per-layer dissection statistics of one generator against one segmenter."""

    def __init__(self, labels, layers: dict, settings: dict):
        self.labels = list(labels)
        self._layers = {name: {k: np.asarray(v) for k, v in arrays.items()} for name, arrays in layers.items()}
        self.settings = dict(settings)
        for name, arrays in self._layers.items():
            missing = [k for k in _ARRAYS if k not in arrays]
            if missing:
                raise ValueError(f"layer {name!r} lacks arrays {missing}")

    # -- access -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def _get(self, layer):
        if layer not in self._layers:
            raise KeyError(f"layer {layer!r} was not dissected; dissected layers: {', '.join(self._layers)}")
        return self._layers[layer]

    def array(self, layer: str, name: str) -> np.ndarray:
        """Any stored array of a layer (see the module docstring for names and shapes)."""
        a = self._get(layer)
        if name not in a:
            raise KeyError(f"no array {name!r}; available: {', '.join(sorted(a))}")
        return a[name]

    def concept_index(self, concept) -> int:
        if isinstance(concept, (int, np.integer)):
            if not 0 < int(concept) < len(self.labels):
                raise ValueError(f"concept index {concept} out of range 1..{len(self.labels) - 1}")
            return int(concept)
        if concept not in self.labels or concept == self.labels[0]:
            raise KeyError(f"unknown concept {concept!r}; concepts: {', '.join(self.labels[1:])}")
        return self.labels.index(concept)

    def iou(self, layer: str) -> np.ndarray:
        """(units, concepts) IoU, columns in the order of ``labels``."""
        return self._get(layer)["iou"]

    def thresholds(self, layer: str) -> np.ndarray:
        return self._get(layer)["thresholds"]

    def unit_label_ids(self, layer: str) -> np.ndarray:
        """(units,) argmax_c IoU(u, c) over concepts (never 0, the unlabeled column)."""
        iou = self.iou(layer)
        return 1 + np.argmax(iou[:, 1:], axis=1)

    def unit_labels(self, layer: str) -> list[str]:
        return [self.labels[c] for c in self.unit_label_ids(layer)]

    def unit_ious(self, layer: str) -> np.ndarray:
        """(units,) IoU of each unit with its label."""
        iou = self.iou(layer)
        return iou[np.arange(iou.shape[0]), self.unit_label_ids(layer)]

    def interpretable(self, layer: str, min_iou: float = DEFAULT_MIN_IOU) -> np.ndarray:
        """(units,) bool: the unit's best IoU exceeds ``min_iou``."""
        return self.unit_ious(layer) > min_iou

    def topk(self, layer: str) -> np.ndarray:
        """(units, k) sample indices of each unit's top-activating samples (seed/order of the run)."""
        return self._get(layer)["topk_indices"]

    def ranking(self, layer: str, concept) -> np.ndarray:
        """Unit indices by descending IoU with ``concept`` (ties by unit index)."""
        c = self.concept_index(concept)
        col = self.iou(layer)[:, c]
        return np.lexsort((np.arange(col.shape[0]), -col))

    def concept_counts(self, layer: str, min_iou: float = DEFAULT_MIN_IOU) -> dict[str, int]:
        """Number of interpretable units per label, most frequent first."""
        mask = self.interpretable(layer, min_iou)
        names = np.array(self.unit_labels(layer), dtype=object)[mask]
        vals, counts = np.unique(names, return_counts=True) if len(names) else ([], [])
        order = sorted(zip(vals, counts), key=lambda t: (-t[1], t[0]))
        return {str(v): int(c) for v, c in order}

    def summary(self, min_iou: float = DEFAULT_MIN_IOU, top: int = 10) -> dict:
        """The JSON summary written as dissect.json (schema in the README)."""
        layers = []
        for name in self.layers:
            ids = self.unit_label_ids(name)
            ious = self.unit_ious(name)
            thr = self.thresholds(name)
            interp = ious > min_iou
            units = [{"unit": int(u), "label": self.labels[int(ids[u])], "iou": float(ious[u]),
                      "threshold": float(thr[u]), "interpretable": bool(interp[u])}
                     for u in range(len(ids))]
            iou = self.iou(name)
            top_units = {}
            for c in range(1, len(self.labels)):
                rank = self.ranking(name, c)[:top]
                entries = [{"unit": int(u), "iou": float(iou[u, c])} for u in rank if iou[u, c] > 0]
                if entries:
                    top_units[self.labels[c]] = entries
            layers.append({"layer": name, "shape": [int(s) for s in self.array(name, "shape")],
                           "interpretable": int(interp.sum()),
                           "concepts": self.concept_counts(name, min_iou),
                           "units": units, "top_units": top_units})
        return {"format": FORMAT, "version": VERSION, "labels": self.labels, "min_iou": min_iou,
                "settings": self.settings, "layers": layers}

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory, min_iou: float = DEFAULT_MIN_IOU):
        """Write ``directory/arrays.npz`` then ``directory/dissect.json``, each atomically."""
        os.makedirs(directory, exist_ok=True)
        arrays = {f"{layer}/{k}": v for layer, a in self._layers.items() for k, v in a.items()}
        npz = os.path.join(directory, "arrays.npz")
        atomic_save_npz(npz, arrays)
        doc = self.summary(min_iou)
        doc["arrays"] = {"file": "arrays.npz", "sha256": sha256_file(npz), "layers": self.layers}
        atomic_write_json(os.path.join(directory, "dissect.json"), doc)
        return directory

    @classmethod
    def load(cls, directory) -> "Dissection":
        jpath = os.path.join(directory, "dissect.json")
        if not os.path.exists(jpath):
            raise FileNotFoundError(f"no dissect.json in {directory!r}: not a saved dissection")
        with open(jpath) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{jpath} is not a {FORMAT} file (format={doc.get('format')!r})")
        if doc.get("version", 0) > VERSION:
            raise ValueError(f"{jpath} has format version {doc['version']}; this package reads up to {VERSION}")
        meta = doc["arrays"]
        npz = os.path.join(directory, meta["file"])
        if not os.path.exists(npz) or sha256_file(npz) != meta["sha256"]:
            raise ValueError(f"{npz} is missing or does not match {jpath} (checksum differs)")
        layers = {name: {} for name in meta["layers"]}
        with np.load(npz, allow_pickle=False) as data:
            for key in data.files:
                layer, _, name = key.rpartition("/")
                layers[layer][name] = data[key]
        return cls(doc["labels"], layers, doc.get("settings", {}))

    def __repr__(self):
        parts = ", ".join(f"{l}: {int(self.interpretable(l).sum())}/{self.iou(l).shape[0]} interpretable"
                          for l in self.layers)
        return f"<Dissection of {self.settings.get('generator', '?')} vs {self.settings.get('segmenter', '?')}; {parts}>"
