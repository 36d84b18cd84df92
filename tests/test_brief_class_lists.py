"""Messages naming a label set list its first names and count the rest: a case of TotalSegmentator's 117 classes
refused by a case folder of two put all 117 names (and the folder's) into one status line."""
from __future__ import annotations

import numpy as np
import pytest

from engine.cases import CaseStore, LabelSetConflictError
from engine.class_names import BRIEF_NAMES, brief_names
from engine.io import Volume


@pytest.mark.parametrize("count", [0, 1, BRIEF_NAMES])
def test_short_lists_are_listed_whole(count):
    names = [f"class_{i}" for i in range(count)]
    assert brief_names(names) == repr(names)


def test_a_long_list_names_its_first_classes_and_counts_the_rest():
    names = [f"organ_{i}" for i in range(117)]
    text = brief_names(names)
    assert text.startswith("['organ_0', 'organ_1'") and f"'organ_{BRIEF_NAMES - 1}', ..." in text
    assert f"'organ_{BRIEF_NAMES}'" not in text and "organ_116" not in text
    assert text.endswith(f"... and {117 - BRIEF_NAMES} more (117 classes)]")
    assert brief_names(names, shown=2) == "['organ_0', 'organ_1', ... and 115 more (117 classes)]"


def test_the_case_folder_refusal_of_another_label_set_stays_one_readable_line(tmp_path):
    store = CaseStore(tmp_path / "cases")
    image = Volume(np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    store.add(image, labels, modality="MR", class_names=["background", "anterior", "posterior"], case_id="hippo")
    many = ["background", *(f"structure_{i}" for i in range(117))]
    with pytest.raises(LabelSetConflictError) as caught:
        store.add(image, labels, modality="CT", class_names=many, case_id="ct")
    message = str(caught.value)
    assert "structure_116" not in message and "(118 classes)" in message
    assert "['background', 'anterior', 'posterior']" in message and len(message) < 700
    assert caught.value.class_names == many  # the whole list stays for the GUI's own advice
    assert [r.case_id for r in store.list()] == ["hippo"]
