"""The readout's shared helpers: every ranking orders alike, one concept lookup, one unit check."""
import numpy as np
import pytest
import torch

from gandissect_widgets.engine.hooks import Edit, check_units
from gandissect_widgets.engine.readout import DEFAULT_MIN_IOU, concept_index, descending, descending_within


def test_descending_ties_by_index_and_nan_last():
    v = np.array([0.2, np.nan, 0.5, 0.2, -1.0, 0.5])
    assert descending(v).tolist() == [2, 5, 0, 3, 4, 1]
    brute = sorted(range(len(v)), key=lambda i: (np.isnan(v[i]), -np.nan_to_num(v[i]), i))
    assert descending(v).tolist() == brute


def test_descending_within_groups_orders_by_group_then_as_descending():
    """The unit browser's "by concept" order: concept names alphabetically, then IoU down, ties by unit, NaN last."""
    names = np.array(["tree", "sky", "tree", "sky", "door", "tree", "sky"], dtype=object)
    v = np.array([0.1, np.nan, 0.3, 0.2, 0.0, 0.3, 0.2])
    brute = sorted(range(len(v)), key=lambda i: (names[i], np.isnan(v[i]), -np.nan_to_num(v[i]), i))
    assert descending_within(names, v).tolist() == brute == [4, 3, 6, 1, 2, 5, 0]
    with pytest.raises(ValueError, match="2 groups for 3 values"):
        descending_within(["a", "b"], [1, 2, 3])


def test_concept_index_by_name_or_index():
    labels = ["-", "sky", "tree"]
    assert concept_index(labels, "tree") == 2 and concept_index(labels, 1) == 1 and concept_index(labels, np.int64(2)) == 2
    with pytest.raises(KeyError, match="unknown concept 'door'; concepts: sky, tree"):
        concept_index(labels, "door")
    with pytest.raises(KeyError):
        concept_index(labels, "-")  # unlabeled is no concept
    with pytest.raises(ValueError, match="out of range 1..2"):
        concept_index(labels, 0)


def test_one_unit_check_for_edits_and_sets():
    assert check_units([3, 1], 4).tolist() == [3, 1]
    assert check_units(torch.tensor([2]), 4).tolist() == [2]
    with pytest.raises(ValueError, match=r"out of range: \[4, -1\]; layer4 has 4 units \(0..3\)"):
        check_units([4, -1, 2], 4, "layer4")
    with pytest.raises(ValueError, match="empty unit set"):
        check_units([], 4)
    with pytest.raises(ValueError, match="must be integers"):
        check_units([0.5], 4)
    r = torch.ones(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"out of range: \[7\]; layer2 has 4 units"):
        Edit("layer2", units=[7]).apply(r)
    assert DEFAULT_MIN_IOU == 0.04
