"""Checkable exercises for the teaching notebook: every true answer is computed from the dissection.

    from gandissect_widgets.teaching import check_answer, pick_unit, true_answer
    unit = pick_unit(dissection, "layer4", seed=0)          # an interpretable unit to ask about
    check_answer("unit_concept", "tree", dissection, layer="layer4", unit=unit)   # prints right/wrong

Questions (and the parameters they take):
    unit_concept        layer, unit     which concept does the unit match best (its label)?
    is_interpretable    layer, unit     is its best IoU above the cut-off (True/False)?
    interpretable_count layer           how many units of the layer are interpretable?
    best_unit           layer, concept  which unit has the highest IoU with the concept?
    best_layer          concept         which dissected layer has the most units of the concept?
    top_fraction        (none)          what fraction of a unit's pixels lie above its threshold?
Each call prints a one-line verdict (with a hint when wrong) and returns True, False, or None when
no answer was given yet.
"""
from __future__ import annotations

import numpy as np

from gandissect_widgets.engine.results import DEFAULT_MIN_IOU, Dissection

__all__ = ["QUESTIONS", "true_answer", "check_answer", "pick_unit"]

QUESTIONS = {
    "unit_concept": ("layer", "unit"),
    "is_interpretable": ("layer", "unit"),
    "interpretable_count": ("layer",),
    "best_unit": ("layer", "concept"),
    "best_layer": ("concept",),
    "top_fraction": (),
}

_HINTS = {
    "unit_concept": "open the unit's card in the UnitBrowser (layer {layer}, sort by unit), or look at "
                    "dissection.unit_labels('{layer}')[{unit}]",
    "is_interpretable": "a unit is interpretable when its best IoU is above {min_iou}: compare "
                        "dissection.unit_ious('{layer}')[{unit}] with it",
    "interpretable_count": "count the units whose best IoU is above {min_iou} (the LayerSummary shows it too)",
    "best_unit": "rank the units of {layer} by IoU with {concept} (the IouRanking widget does it)",
    "best_layer": "compare dissection.concept_counts(layer) across layers, or the per-layer figure",
    "top_fraction": "the threshold is the 0.99 quantile of the unit's activations",
}


def _need(question, params):
    if question not in QUESTIONS:
        raise ValueError(f"unknown question {question!r}; questions: {', '.join(QUESTIONS)}")
    missing = [p for p in QUESTIONS[question] if params.get(p) is None]
    if missing:
        raise ValueError(f"question {question!r} needs {', '.join(missing)}")


def true_answer(question: str, dissection: Dissection, min_iou: float = DEFAULT_MIN_IOU, **params):
    """The answer computed from ``dissection``: a concept name, a bool, an int, a layer name, a
    fraction, or for ``best_layer`` the list of layers tied for the most units."""
    _need(question, params)
    d = dissection
    layer, unit, concept = params.get("layer"), params.get("unit"), params.get("concept")
    if unit is not None:
        n = d.iou(layer).shape[0]
        if not 0 <= int(unit) < n:
            raise ValueError(f"unit {unit} out of range: {layer} has {n} units (0..{n - 1})")
    if question == "unit_concept":
        return d.unit_labels(layer)[int(unit)]
    if question == "is_interpretable":
        return bool(d.interpretable(layer, min_iou)[int(unit)])
    if question == "interpretable_count":
        return int(d.interpretable(layer, min_iou).sum())
    if question == "best_unit":
        return int(d.ranking(layer, concept)[0])
    if question == "best_layer":
        counts = {l: d.concept_counts(l, min_iou).get(concept, 0) for l in d.layers}
        best = max(counts.values())
        return [l for l, v in counts.items() if v == best]
    if question == "top_fraction":
        q = d.settings.get("quantile", 0.99)
        return round(1 - float(q), 6)
    raise AssertionError(question)


def _matches(question, answer, truth):
    if question == "unit_concept":
        return str(answer).strip().lower() == str(truth).lower()
    if question == "is_interpretable":
        if isinstance(answer, str):
            answer = {"true": True, "yes": True, "false": False, "no": False}.get(answer.strip().lower(), answer)
        return isinstance(answer, (bool, np.bool_)) and bool(answer) == truth
    if question in ("interpretable_count", "best_unit"):
        try:
            return int(answer) == truth and float(answer) == int(answer)
        except (TypeError, ValueError):
            return False
    if question == "best_layer":
        return str(answer).strip() in truth
    if question == "top_fraction":
        try:
            a = float(str(answer).strip().rstrip("%")) / (100 if str(answer).strip().endswith("%") else 1)
        except ValueError:
            return False
        return abs(a - truth) <= 0.002
    raise AssertionError(question)


def check_answer(question: str, answer, dissection: Dissection, min_iou: float = DEFAULT_MIN_IOU,
                 verbose: bool = True, **params):
    """Print whether ``answer`` is right (True), wrong (False, with a hint), or missing (None)."""
    truth = true_answer(question, dissection, min_iou=min_iou, **params)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        if verbose:
            print("No answer yet: set `answer = ...` above and run the cell again.")
        return None
    ok = _matches(question, answer, truth)
    if verbose:
        where = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
        if ok:
            print(f"Right! ({question}{': ' + where if where else ''}: {answer!r})")
        else:
            hint = _HINTS[question].format(min_iou=min_iou, **{k: params.get(k) for k in ("layer", "unit", "concept")})
            print(f"Not quite: {answer!r} is not the answer. Hint: {hint}.")
    return ok


def pick_unit(dissection: Dissection, layer: str, seed: int = 0, interpretable: bool = True,
              min_iou: float = DEFAULT_MIN_IOU) -> int:
    """A unit of ``layer`` drawn with ``seed`` (among the interpretable ones, when there are any)."""
    units = np.flatnonzero(dissection.interpretable(layer, min_iou)) if interpretable else np.array([], int)
    if units.size == 0:
        units = np.arange(dissection.iou(layer).shape[0])
    return int(np.random.RandomState(seed).choice(units))
