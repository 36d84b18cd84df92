"""``evaluate`` pairs a prediction with its ground truth when the names differ by a label or prediction tag, as
``mambahome dataset`` pairs images with labels (``case_pred`` or ``case_seg`` for ``case``), and points a dataset folder
given as ``--truth`` to its ``labelsTr``. A reviewer's find: both gave "0 ground truths matched" and no hint."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.evaluation import EvaluationError, evaluate_folders


def _save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), str(path))


def _label(shift=0):
    data = np.zeros((12, 12, 12), np.uint8)
    data[2 + shift:8 + shift, 2:8, 2:8] = 1
    return data


@pytest.mark.parametrize("pred_name, truth_name", [
    ("hippocampus_014_pred", "hippocampus_014"),
    ("hippocampus_014_seg", "hippocampus_014"),
    ("hippocampus_014_prediction", "hippocampus_014_label"),
])
def test_names_differing_by_a_tag_are_one_case(tmp_path, pred_name, truth_name):
    _save(tmp_path / "pred" / f"{pred_name}.nii.gz", _label(1))
    _save(tmp_path / "pred" / "other_pred.nii.gz", _label())
    _save(tmp_path / "truth" / f"{truth_name}.nii.gz", _label())
    report = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert list(report["cases"]) == [truth_name]
    assert report["unmatched_pred"] == ["other_pred"]
    assert 0 < report["cases"][truth_name]["mean_dice"] < 1


def test_a_name_that_would_stand_for_two_files_keeps_exact_matching(tmp_path):
    _save(tmp_path / "pred" / "a.nii.gz", _label())
    _save(tmp_path / "pred" / "a_pred.nii.gz", _label(1))
    _save(tmp_path / "truth" / "a.nii.gz", _label())
    report = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert list(report["cases"]) == ["a"] and report["cases"]["a"]["mean_dice"] == 1.0


def test_a_dataset_folder_as_truth_is_pointed_to_its_labels(tmp_path):
    _save(tmp_path / "pred" / "a.nii.gz", _label())
    _save(tmp_path / "ds" / "labelsTr" / "a.nii.gz", _label())
    _save(tmp_path / "ds" / "imagesTr" / "a_0000.nii.gz", _label())
    with pytest.raises(EvaluationError, match="is a dataset folder: give its labels folder, --truth .*labelsTr"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ds")
