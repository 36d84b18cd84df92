"""``evaluate`` without class names: a value only predictions hold is no class of the test set. A reviewer's find: a
stray 7 in one prediction became ``class_7``, "false positive" (Dice 0) there and "both empty" (Dice 1) in the other
case, which lifted the mean foreground Dice, without a word. It is now a false positive where predicted only, and
named."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest

from engine.evaluation import evaluate_folders


def _save(path, data):
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), str(path))


@pytest.fixture()
def folders(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[2:8, 2:8, 2:8], truth[9:14, 9:14, 9:14] = 1, 2
    stray = truth.copy()
    stray[0, 0, :5] = 7  # five voxels of a value no ground truth holds
    for case, pred in (("c1", stray), ("c2", truth)):
        _save(tmp_path / "truth" / f"{case}.nii.gz", truth)
        _save(tmp_path / "pred" / f"{case}.nii.gz", pred)
    return tmp_path


def test_a_value_only_predictions_hold_is_named_and_scored_where_predicted_only(folders):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_folders(folders / "pred", folders / "truth")
    said = [str(w.message) for w in caught if "no ground truth" in str(w.message)]
    assert len(said) == 1 and "label 7" in said[0] and "c1" in said[0] and "c2" not in said[0], said
    c1, c2 = report["cases"]["c1"]["classes"], report["cases"]["c2"]["classes"]
    assert set(c2) == {"class_1", "class_2"} and all(m["dice"] == 1.0 for m in c2.values())  # no "both empty" 7
    assert set(c1) == {"class_1", "class_2", "class_7"}
    assert c1["class_7"]["status"] == "false_positive" and c1["class_7"]["dice"] == 0.0
    assert report["summary"]["class_7"]["n"] == 1 and report["summary"]["class_7"]["dice_mean"] == 0.0
