"""``Dissection``: the result of ``dissect()``, with documented shapes, saved and loaded whole.

On disk a dissection is two files in one directory: ``dissect.json`` (settings, labels and a
per-unit summary; the schema is in the README) and ``arrays-<hash>.npz`` (the arrays below, keyed
``"<layer>/<name>"``).  ``dissect.json`` is the manifest of the result: ``arrays`` names the arrays
file (a plain file name inside the directory) with its SHA-256, and ``document_sha256`` is the
SHA-256 of the document itself (its JSON with sorted keys and no spaces, without that field), so
an edited or damaged ``dissect.json`` or arrays file is refused on load (``ResultError``).

Saving switches the directory from the old complete result to the new one in one step, or not at
all: the new arrays go to a file of their own name (``arrays-<first 16 hex of its SHA-256>.npz``),
then ``dissect.json`` is replaced atomically (``os.replace``), then the old arrays file is removed.
A failed save (a full disk) leaves the earlier result loading as it was, removes what it wrote, and
raises ``ResultSaveError`` (an ``OSError``).  Results of format version 1 (``arrays.npz``, no
document hash) still load, with a ``LegacyResultWarning`` that edits to their JSON go unnoticed.

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

For the whole result (format version 3; keys without a ``/``), when the dissection counted them:
    concept_position_counts  (C, H, W) int64  samples with concept c at each pixel of the
                                              segmentation grid (``engine.concept_stats``)
    concept_position_samples ()        int64  the samples counted (N)
They give the position-only baseline (``position_baseline``); a result without them (older
versions) has no baseline and says so (``has_position_baseline``).  The IoU ceiling needs only the
per-layer counts, so every result has it.  Baselines and ceilings: ``engine.baselines``.
"""
from __future__ import annotations

import errno as _errno
import io
import json
import os
import re
import stat
import warnings

import numpy as np

from gandissect_widgets.engine import baselines, readout
from gandissect_widgets.engine.io import (atomic_write_bytes, describe_os_error, fsync_dir, json_bytes, json_clean,
                                          sha256_bytes, sha256_file)

__all__ = ["Dissection", "DEFAULT_MIN_IOU", "FORMAT", "ResultError", "ResultSaveError", "LegacyResultWarning",
           "LowCeilingWarning", "NoBaselineError"]

DEFAULT_MIN_IOU = readout.DEFAULT_MIN_IOU
FORMAT = "gandissect-widgets/dissection"
VERSION = 3  # 3: concept position counts; 2: arrays-<hash>.npz and document_sha256; 1: arrays.npz, only the arrays hashed
MANIFEST = "dissect.json"
_SPACE_ERRNOS = (_errno.ENOSPC, getattr(_errno, "EDQUOT", _errno.ENOSPC))
_DOC_HASH = "document_sha256"
_ARRAYS_NAME = re.compile(r"arrays(-[0-9a-f]{8,64})?\.npz")  # the only files a save ever removes
_ARRAYS = ("iou", "intersection", "mask_pixels", "concept_pixels", "n_pixels", "thresholds",
           "fraction_above", "topk_indices", "topk_values", "mean", "std", "min", "max", "shape")
_POSITIONS = ("concept_position_counts", "concept_position_samples")  # of the whole result (keys without '/')


class ResultError(ValueError):
    """A saved result that cannot be used as it is: edited, damaged, incomplete or pointing outside itself."""


class ResultSaveError(OSError):
    """A save that did not happen (a full disk, no permission); the directory holds what it held before."""

    def __init__(self, message, errno=None, directory=None):
        super().__init__(message)
        self.errno = errno
        self.directory = directory


class LegacyResultWarning(UserWarning):
    """A result saved by an older version, loaded without checking its JSON (it records no hash of it)."""


class LowCeilingWarning(UserWarning):
    """Concepts whose IoU ceiling at the dissection's threshold is below the interpretability cut-off."""


class NoBaselineError(LookupError):
    """A result without concept position counts (saved before they were counted): no position baseline."""


def document_hash(doc: dict) -> str:
    """SHA-256 of a result document without its ``document_sha256`` field (sorted keys, no spaces)."""
    body = {k: v for k, v in doc.items() if k != _DOC_HASH}
    return sha256_bytes(json.dumps(json_clean(body), sort_keys=True, separators=(",", ":"),
                                   allow_nan=False, ensure_ascii=True).encode())


def _recompute_hint(directory) -> str:
    return (f"recompute it (delete {directory} and run the dissection again, or save the Dissection there "
            f"again) or restore the original files")


def result_file(directory, name, manifest=MANIFEST) -> str:
    """``directory/name`` after checking that ``name`` is a plain file inside ``directory`` (``ResultError``).

    Refused: anything but a non-empty file name (path separators, ``.``/``..``, absolute paths), a
    symlink leading outside the directory, and anything that is not a regular file."""
    directory = os.fspath(directory)
    where = os.path.join(directory, manifest)
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name) or os.path.basename(name) != name):
        raise ResultError(f"{where} names the file {name!r}, which is not a plain file name inside {directory} "
                          f"(expected a name such as 'arrays-<hash>.npz', without '/', '..' or a leading '/'); "
                          f"refusing to read outside the result directory")
    path = os.path.join(directory, name)
    real, real_dir = os.path.realpath(path), os.path.realpath(directory)
    if os.path.dirname(real) != real_dir:
        raise ResultError(f"{path} is a symlink to {real}, outside {directory}; the files of a result must be "
                          f"plain files inside its directory")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ResultError(f"{path}, named by {where}, is missing: the result is incomplete; "
                          f"{_recompute_hint(directory)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ResultError(f"{path} is not a regular file; the files of a result must be plain files inside "
                          f"its directory")
    return path


def _previous_arrays(directory):
    """The arrays file named by the result now in ``directory`` (None if none, or not a name saves own)."""
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            name = json.loads(f.read()).get("arrays", {}).get("file")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _ARRAYS_NAME.fullmatch(name) else None


class Dissection:
    """Per-layer dissection statistics of one generator against one segmenter."""

    def __init__(self, labels, layers: dict, settings: dict, concept_positions=None):
        """``concept_positions``: where each concept sat over the same samples, a
        ``concept_stats.ConceptPixelCounts`` or its ``arrays()``; None: no position baseline."""
        self.labels = list(labels)
        self._layers = {name: {k: np.asarray(v) for k, v in arrays.items()} for name, arrays in layers.items()}
        self.settings = dict(settings)
        for name, arrays in self._layers.items():
            missing = [k for k in _ARRAYS if k not in arrays]
            if missing:
                raise ValueError(f"layer {name!r} lacks arrays {missing}")
        self._positions = self._check_positions(concept_positions)
        self._tables = {}  # position_iou_table, computed once
        self.format_version = VERSION  # of the file it was loaded from

    def _check_positions(self, positions):
        """The counts as {name: array}, checked against the layers' counts: the same samples."""
        if positions is None:
            return None
        if callable(getattr(positions, "arrays", None)):
            positions = positions.arrays()
        if not isinstance(positions, dict) or set(positions) != set(_POSITIONS):
            raise ValueError(f"concept_positions must be a ConceptPixelCounts or a dict with {list(_POSITIONS)}")
        counts = np.asarray(positions["concept_position_counts"]).astype(np.int64)
        samples = int(np.asarray(positions["concept_position_samples"]))
        if counts.ndim != 3 or counts.shape[0] != len(self.labels):
            raise ValueError(f"concept position counts of shape {counts.shape} do not fit {len(self.labels)} labels "
                             f"(expected ({len(self.labels)}, H, W))")
        area = counts.sum((1, 2))
        for name, a in self._layers.items():
            want = np.asarray(a["concept_pixels"]).astype(np.int64)
            n_pixels = int(a["n_pixels"])
            if samples * counts.shape[1] * counts.shape[2] != n_pixels or not np.array_equal(area[1:], want[1:]):
                wrong = [self.labels[c] for c in range(1, len(want)) if area[c] != want[c]]
                raise ValueError(f"the concept position counts ({samples} samples of {counts.shape[1]}x"
                                 f"{counts.shape[2]}) are not of the samples layer {name!r} counted ({n_pixels} "
                                 f"pixels{'; concept areas differ for ' + ', '.join(wrong) if wrong else ''}): "
                                 f"count the dissection's own segmentations")
        return {"concept_position_counts": counts, "concept_position_samples": np.asarray(samples, dtype=np.int64)}

    def with_concept_positions(self, concept_positions) -> "Dissection":
        """This result with concept position counts (``concept_stats.count_samples`` for a result
        that lacks them), checked to be of the same samples."""
        return type(self)(self.labels, self._layers, self.settings, concept_positions)

    # -- access -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    @property
    def convention(self) -> str:
        """The upsampling convention of the thresholds ("iclr" or "pnas", ``engine.upsample``):
        every picture of a unit's map or mask upsamples the same way, or it would not be its mask."""
        return str(self.settings.get("upsample", "iclr"))

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
        return readout.concept_index(self.labels, concept)

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

    def interpretable(self, layer: str, min_iou: float = DEFAULT_MIN_IOU, min_iqr: float | None = None) -> np.ndarray:
        """(units,) bool: the unit's best IoU exceeds ``min_iou``; with ``min_iqr`` (the ICLR code's
        second condition under its IQR thresholds, 0.01 there: ``readout.DEFAULT_MIN_IQR``), its
        mask's IQR with that label at its threshold, over the dissection samples, exceeds it too."""
        ious = self.unit_ious(layer)
        if min_iqr is None:
            return ious > min_iou
        q = readout.iqr_at_threshold(*(self.array(layer, k) for k in ("intersection", "mask_pixels", "concept_pixels",
                                                                     "n_pixels")))
        own = q[np.arange(len(ious)), self.unit_label_ids(layer)]
        return readout.interpretable(ious, min_iou, own, min_iqr)

    def topk(self, layer: str) -> np.ndarray:
        """(units, k) sample indices of each unit's top-activating samples (seed/order of the run)."""
        return self._get(layer)["topk_indices"]

    def ranking(self, layer: str, concept) -> np.ndarray:
        """Unit indices by descending IoU with ``concept`` (ties by unit index)."""
        c = self.concept_index(concept)
        return readout.descending(self.iou(layer)[:, c])

    # -- what an IoU is compared with (engine.baselines) ----------------------------------------
    @property
    def has_position_baseline(self) -> bool:
        """Whether the result holds concept position counts (results saved before them do not)."""
        return self._positions is not None

    @property
    def concept_positions(self):
        """(counts (C, H, W) int64, samples N): how many samples had concept c at each pixel."""
        p = self._need_positions()
        return p["concept_position_counts"], int(p["concept_position_samples"])

    def _need_positions(self):
        if self._positions is None:
            version = self.format_version
            raise NoBaselineError("this result has no concept position counts"
                                  + (f" (saved in format version {version}, before they were counted)"
                                     if version < 3 else "")
                                  + ", so no position-only baseline: dissect again, or add them with "
                                  "d.with_concept_positions(concept_stats.count_samples(G, S, n_samples, seed))")
        return self._positions

    def _quantile(self) -> float:
        return float(self.settings.get("quantile", 0.99))

    def iou_ceiling(self, layer: str) -> np.ndarray:
        """(units, concepts) the highest IoU each unit's mask size allows with each concept:
        ``min(mask_pixels, concept_pixels) / max(...)`` (column 0 is 0)."""
        a = self._get(layer)
        return baselines.iou_ceiling(a["mask_pixels"], a["concept_pixels"])

    def concept_ceiling(self, layer: str) -> np.ndarray:
        """(concepts,) the highest IoU a mask of the threshold's nominal size (``1 - quantile`` of
        the pixels) allows with each concept."""
        a = self._get(layer)
        return baselines.iou_ceiling((1 - self._quantile()) * float(a["n_pixels"]), a["concept_pixels"])

    def _table(self):
        if "table" not in self._tables:
            counts, samples = self.concept_positions
            self._tables["table"] = baselines.position_iou_table(counts, samples)
        return self._tables["table"]

    def _baseline_at(self, mask_pixels):
        counts, samples = self.concept_positions
        k = baselines.mask_size_per_sample(mask_pixels, samples, counts.shape[1] * counts.shape[2])
        return self._table()[:, k].T if k.ndim else self._table()[:, int(k)]

    def position_baseline(self, layer: str) -> np.ndarray:
        """(units, concepts) IoU of the best fixed mask (the same pixels in every sample) of each
        unit's mask size, ``floor(mask_pixels / N)`` pixels, with each concept (column 0 is 0).
        ``NoBaselineError`` for a result without concept position counts."""
        return self._baseline_at(self._get(layer)["mask_pixels"])

    def concept_baseline(self, layer: str) -> np.ndarray:
        """(concepts,) the position-only baseline at the threshold's nominal mask size."""
        counts, samples = self.concept_positions
        return self._baseline_at((1 - self._quantile()) * counts.shape[1] * counts.shape[2] * samples)

    def unit_baselines(self, layer: str) -> np.ndarray:
        """(units,) position-only baseline of each unit's label (``NoBaselineError`` if none)."""
        return self.position_baseline(layer)[np.arange(len(self.thresholds(layer))), self.unit_label_ids(layer)]

    def unit_ceilings(self, layer: str) -> np.ndarray:
        """(units,) IoU ceiling of each unit with its label."""
        return self.iou_ceiling(layer)[np.arange(len(self.thresholds(layer))), self.unit_label_ids(layer)]

    def describe_unit(self, layer: str, unit: int) -> str:
        """'IoU 0.180 (position-only baseline 0.400, ceiling 0.030)' for a unit and its label."""
        unit = int(unit)
        base = float(self.unit_baselines(layer)[unit]) if self.has_position_baseline else None
        return baselines.describe_unit_iou(float(self.unit_ious(layer)[unit]), base,
                                           float(self.unit_ceilings(layer)[unit]))

    def low_ceiling_concepts(self, min_iou: float = DEFAULT_MIN_IOU) -> list[tuple[str, float]]:
        """[(label, ceiling)] of concepts whose ceiling (``concept_ceiling``, the lowest over the
        layers) is below ``min_iou``, lowest first; concepts never segmented are left out."""
        if not self.layers:
            return []
        ceiling = np.min([self.concept_ceiling(l) for l in self.layers], axis=0)
        return baselines.low_ceiling_concepts(self.labels, ceiling, min_iou)

    def ceiling_warning(self, min_iou: float = DEFAULT_MIN_IOU) -> str | None:
        """One line naming the concepts no unit can be interpretable for at this threshold, or None."""
        if not self.layers:
            return None
        ceiling = np.min([self.concept_ceiling(l) for l in self.layers], axis=0)
        return baselines.ceiling_warning_text(self.labels, ceiling, min_iou, self._quantile())

    def warn_low_ceilings(self, min_iou: float = DEFAULT_MIN_IOU) -> str | None:
        """Warn (``LowCeilingWarning``) with ``ceiling_warning``, if there is one; return its text."""
        text = self.ceiling_warning(min_iou)
        if text:
            warnings.warn(text, LowCeilingWarning, stacklevel=2)
        return text

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
            if self.has_position_baseline:  # beside each unit's IoU, that of its label (ceilings: per_concept)
                for entry, b in zip(units, self.unit_baselines(name)):
                    entry["position_baseline"] = float(b)
            iou = self.iou(name)
            top_units = {}
            for c in range(1, len(self.labels)):
                rank = self.ranking(name, c)[:top]
                entries = [{"unit": int(u), "iou": float(iou[u, c])} for u in rank if iou[u, c] > 0]
                if entries:
                    top_units[self.labels[c]] = entries
            cc = self.concept_ceiling(name)
            cb = self.concept_baseline(name) if self.has_position_baseline else None
            per_concept = {self.labels[c]: {"iou_ceiling": float(cc[c]),
                                            "position_baseline": None if cb is None else float(cb[c])}
                           for c in range(1, len(self.labels))}
            layers.append({"layer": name, "shape": [int(s) for s in self.array(name, "shape")],
                           "interpretable": int(interp.sum()),
                           "concepts": self.concept_counts(name, min_iou),
                           "units": units, "top_units": top_units, "per_concept": per_concept})
        warning = self.ceiling_warning(min_iou)
        return {"format": FORMAT, "version": VERSION, "labels": self.labels, "min_iou": min_iou,
                "settings": self.settings,
                "position_baseline": self.has_position_baseline,
                "warnings": [warning] if warning else [], "layers": layers}

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory, min_iou: float = DEFAULT_MIN_IOU):
        """Write the result to ``directory``: it switches from the result there (if any) to this one in one
        step, or not at all (``ResultSaveError``, with the earlier result as it was and nothing left over).

        Order: ``arrays-<hash>.npz`` (atomically), then ``dissect.json`` (atomically: the switch), then the
        old arrays file is removed.  Returns ``directory``."""
        directory = os.fspath(directory)
        buf = io.BytesIO()
        arrays = {f"{layer}/{k}": v for layer, a in self._layers.items() for k, v in a.items()}
        if self._positions is not None:  # keys without '/': of the whole result
            counts = self._positions["concept_position_counts"]
            arrays["concept_position_counts"] = counts.astype(np.int32) if counts.max(initial=0) < 2 ** 31 else counts
            arrays["concept_position_samples"] = self._positions["concept_position_samples"]
        np.savez_compressed(buf, **arrays)
        data = buf.getvalue()
        digest = sha256_bytes(data)
        name = f"arrays-{digest[:16]}.npz"
        doc = self.summary(min_iou)
        doc["arrays"] = {"file": name, "sha256": digest, "layers": self.layers}
        doc = json_clean(doc)
        doc[_DOC_HASH] = document_hash(doc)
        text = json_bytes(doc)
        jpath = os.path.join(directory, MANIFEST)
        had_result = os.path.exists(jpath)
        old = _previous_arrays(directory) if had_result else None
        step, wrote_arrays = name, False
        try:
            os.makedirs(directory, exist_ok=True)
            atomic_write_bytes(os.path.join(directory, name), data)
            wrote_arrays = True
            step = MANIFEST
            atomic_write_bytes(jpath, text)  # the switch
        except OSError as e:
            if wrote_arrays and name != old:
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
            before = ("the result that was there is unchanged" if had_result else "nothing was saved")
            advice = ("free some space there or save to another directory" if e.errno in _SPACE_ERRNOS
                      else "fix that or save to another directory")
            raise ResultSaveError(f"could not save the dissection in {directory}: {describe_os_error(e)} while "
                                  f"writing {step}; {before}; {advice}", errno=e.errno, directory=directory) from e
        if old is not None and old != name:
            try:
                os.unlink(os.path.join(directory, old))
            except OSError:
                pass  # the new result is complete; an old arrays file left over is harmless
            fsync_dir(directory)
        return directory

    @classmethod
    def load(cls, directory) -> "Dissection":
        """The result saved in ``directory``, after checking every file against ``dissect.json``.

        ``FileNotFoundError`` when there is no ``dissect.json``; ``ResultError`` (a ``ValueError``) when a
        file was edited or damaged, is missing, or points outside the directory."""
        directory = os.fspath(directory)
        jpath = os.path.join(directory, MANIFEST)
        if not os.path.lexists(jpath):
            raise FileNotFoundError(f"no {MANIFEST} in {directory!r}: not a saved dissection")
        result_file(directory, MANIFEST, manifest=MANIFEST)
        with open(jpath, "rb") as f:
            raw = f.read()
        try:
            doc = json.loads(raw)
        except ValueError as e:  # includes UnicodeDecodeError
            raise ResultError(f"{jpath} is corrupt (not valid JSON: {' '.join(str(e).split())}); "
                              f"{_recompute_hint(directory)}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ResultError(f"{jpath} is not a {FORMAT} file (format={fmt!r})")
        version = doc.get("version", 0)
        if not isinstance(version, int) or version > VERSION:
            raise ResultError(f"{jpath} has format version {version!r}; this package reads versions 1 to {VERSION}")
        if version >= 2:
            recorded, actual = doc.get(_DOC_HASH), document_hash(doc)
            if recorded != actual:
                raise ResultError(f"{jpath} is corrupt or was edited: its content has SHA-256 {actual}, but it "
                                  f"records {recorded!r}; {_recompute_hint(directory)}")
        else:
            warnings.warn(f"{jpath} was saved by an older version (format version {version}) that records no "
                          f"hash of the JSON itself, so edits to it cannot be detected; save it again to add one",
                          LegacyResultWarning, stacklevel=2)
        meta = doc.get("arrays")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or not isinstance(meta.get("layers"), list) or "file" not in meta):
            raise ResultError(f"{jpath} lacks a valid 'arrays' entry ({{\"file\", \"sha256\", \"layers\"}}); "
                              f"{_recompute_hint(directory)}")
        npz = result_file(directory, meta["file"])
        actual = sha256_file(npz)
        if actual != meta["sha256"]:
            raise ResultError(f"{npz} is corrupt or was edited: its SHA-256 {actual} does not match the "
                              f"{meta['sha256']} recorded in {jpath}; {_recompute_hint(directory)}")
        layers = {name: {} for name in meta["layers"]}
        positions = {}
        try:
            with np.load(npz, allow_pickle=False) as data:
                for key in data.files:
                    if "/" not in key and version >= 3 and key in _POSITIONS:  # of the whole result
                        positions[key] = data[key]
                        continue
                    layer, _, name = key.rpartition("/")
                    if "/" not in key or layer not in layers:
                        raise ResultError(f"{npz} holds arrays of layer {layer!r}, which {jpath} does not list "
                                          f"(it lists {meta['layers']}); {_recompute_hint(directory)}")
                    layers[layer][name] = data[key]
            out = cls(doc["labels"], layers, doc.get("settings", {}), positions or None)
            out.format_version = version  # an older one says why there is no position baseline
            return out
        except ResultError:
            raise
        except (ValueError, KeyError, OSError, EOFError) as e:
            raise ResultError(f"{npz} or {jpath} does not hold a complete dissection "
                              f"({type(e).__name__}: {' '.join(str(e).split())}); {_recompute_hint(directory)}") from e

    def __repr__(self):
        parts = ", ".join(f"{l}: {int(self.interpretable(l).sum())}/{self.iou(l).shape[0]} interpretable"
                          for l in self.layers)
        return f"<Dissection of {self.settings.get('generator', '?')} vs {self.settings.get('segmenter', '?')}; {parts}>"
