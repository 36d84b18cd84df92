"""``evaluate`` without class names scores the classes the test set holds, not every class a file's label set names:
an empty prediction of the real abdomen CT, whose ground truth names TotalSegmentator's 117 classes, had a mean Dice of
0.65 (76 named classes in neither file, each "both empty", Dice 1). A value the two files name differently is
warned about."""
from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from engine.evaluation import evaluate_folders
from engine.io import load_volume, save_volume

NAMES = ["spleen", "kidney_right", "kidney_left", "liver", "stomach"]


def _files(tmp_path, pred, pred_names):
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[2:8, 2:8, 2:8], truth[9:14, 9:14, 9:14] = 1, 3
    reference = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.float32), np.eye(4)), str(reference))
    volume = load_volume(reference)
    for folder in ("pred", "truth"):
        (tmp_path / folder).mkdir()
    save_volume(tmp_path / "truth" / "a.nii.gz", truth, volume,
                segments=[{"value": v, "name": n} for v, n in enumerate(NAMES, start=1)])
    save_volume(tmp_path / "pred" / "a.nii.gz", pred, volume,
                segments=[{"value": v, "name": n} for v, n in enumerate(pred_names, start=1)])
    return truth


def test_an_empty_prediction_scores_0_whatever_the_label_set_names(tmp_path):
    truth = _files(tmp_path, np.zeros((16, 16, 16), np.uint8), NAMES)
    report = evaluate_folders(tmp_path / "pred", tmp_path / "truth", out=tmp_path / "r.json")
    assert report["summary"]["__mean__"]["dice_mean"] == pytest.approx(0.0)
    assert set(report["cases"]["a"]["classes"]) == {"spleen", "kidney_left"}  # the values 1 and 3 the truth holds
    assert report["summary"]["kidney_right"]["n"] == 0  # named, held by no file: not scored (the table says so)
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["__mean__"]["dice_mean"] == pytest.approx(0.0)
    assert truth.any()


def test_a_class_named_differently_by_the_two_files_is_warned_about(tmp_path):
    pred = np.zeros((16, 16, 16), np.uint8)
    pred[2:8, 2:8, 2:8] = 1
    _files(tmp_path, pred, ["organ", "vessel", "gland"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    said = [str(w.message) for w in caught if "named" in str(w.message)]
    assert any("label 1 is named 'organ' in the predictions but 'spleen' in the ground truth" in m for m in said), said
    assert report["cases"]["a"]["classes"]["spleen"]["dice"] == pytest.approx(1.0)
    # the same names: no warning
    for f in (tmp_path / "pred").iterdir():
        f.unlink()
    (tmp_path / "pred").rmdir()
    (tmp_path / "truth" / "a.nii.gz").unlink()
    (tmp_path / "truth").rmdir()
    _files(tmp_path, pred, NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert not [w for w in caught if "named" in str(w.message)]
