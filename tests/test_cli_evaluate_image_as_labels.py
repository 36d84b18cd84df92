"""`mambahome evaluate` given an image with whole-number voxels (a real hippocampus T1w MRI, stored as integers) where a
label map belongs.

Before:
- as the prediction, without class names (no dataset.json near the ground truth, no --classes): it was scored as a
  class per grey value, 125 classes ``class_1`` ... ``class_139``, and the command exited 0;
- as the ground truth, with class names: the case was refused, but the message named the prediction file (a sound
  label map) as the one holding "label values [3, ... 12] outside 0..2";
- a label map with negative or fractional values was refused without the range of label values its classes allow.

Now a prediction or ground truth whose values are no labels of the classes is refused for its case, naming that file,
a few of its values and the range expected; the other cases are still scored (exit 1, or exit 2 and no report when
none is). A label map holding a value the other file lacks (a class missed, a 0/255 mask) is still scored.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main

IMAGE_CASE, LABEL_CASE = "hippocampus_001", "hippocampus_003"
CLASSES = ["--classes", "background", "anterior", "posterior"]


def _real(shared_data, kind, case):
    path = shared_data / "hippocampus" / kind / f"{case}.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _folder(tmp_path, name, files):
    """A folder of links to the real files (``{case: file}``): no dataset.json beside them, so no class names."""
    folder = tmp_path / name
    folder.mkdir()
    for case, source in files.items():
        (folder / f"{case}.nii.gz").symlink_to(source)
    return folder


def _evaluate(pred, truth, out, *extra):
    return main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out), "--quiet", *extra])


def _labels_and_image(shared_data):
    image = _real(shared_data, "imagesTr", IMAGE_CASE)
    labels = {case: _real(shared_data, "labelsTr", case) for case in (IMAGE_CASE, LABEL_CASE)}
    assert np.issubdtype(nib.load(str(image)).get_data_dtype(), np.integer)  # an integer MRI, as the defect needs
    return image, labels


def test_an_integer_mri_as_prediction_without_class_names_is_refused_not_scored_as_a_hundred_classes(
        shared_data, tmp_path, capsys):
    image, labels = _labels_and_image(shared_data)
    pred = _folder(tmp_path, "pred", {IMAGE_CASE: image, LABEL_CASE: labels[LABEL_CASE]})
    truth = _folder(tmp_path, "truth", labels)
    out = tmp_path / "report.json"
    assert _evaluate(pred, truth, out) == 1  # a case not scored; the other one is
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["class_names"] == ["background", "class_1", "class_2"]
    assert list(report["cases"]) == [LABEL_CASE] and report["cases"][LABEL_CASE]["mean_dice"] == 1.0
    why = report["failed"][IMAGE_CASE]
    assert why.startswith(f"{pred / f'{IMAGE_CASE}.nii.gz'}: prediction has label values [3, 4, 5, 6, 7] and ")
    assert "outside 0..2" in why and "looks like an image" in why and "--classes" in why
    assert f"not scored: {IMAGE_CASE}: {why}" in printed
    assert "class_3" not in printed


def test_an_integer_mri_as_ground_truth_without_class_names_is_refused_naming_it(shared_data, tmp_path):
    image, labels = _labels_and_image(shared_data)
    pred = _folder(tmp_path, "pred", labels)
    truth = _folder(tmp_path, "truth", {IMAGE_CASE: image, LABEL_CASE: labels[LABEL_CASE]})
    out = tmp_path / "report.json"
    assert _evaluate(pred, truth, out) == 1
    report = json.loads(out.read_text())
    assert list(report["cases"]) == [LABEL_CASE] and len(report["class_names"]) == 3
    why = report["failed"][IMAGE_CASE]
    assert why.startswith(f"{truth / f'{IMAGE_CASE}.nii.gz'}: ground truth has label values [3, 4, 5, 6, 7] and ")
    assert "outside 0..2" in why and "looks like an image" in why


def test_an_integer_mri_as_ground_truth_with_class_names_names_the_ground_truth_file(shared_data, tmp_path, capsys):
    image, labels = _labels_and_image(shared_data)
    out = tmp_path / "report.json"
    assert _evaluate(labels[IMAGE_CASE], image, out, *CLASSES) == 2  # the only case: nothing scored, no report
    err = capsys.readouterr().err
    assert f"{IMAGE_CASE}: {image}: ground truth has label values [3, 4, 5, 6, 7] and " in err
    assert "outside 0..2 (the 3 classes background, anterior, posterior); it looks like an image" in err
    assert f"{labels[IMAGE_CASE]}: ground truth" not in err and not out.exists()

    # and as the prediction, the same words about the prediction file
    assert _evaluate(image, labels[IMAGE_CASE], out, *CLASSES) == 2
    err = capsys.readouterr().err
    assert f"{IMAGE_CASE}: {image}: prediction has label values [3, 4, 5, 6, 7] and " in err
    assert "outside 0..2 (the 3 classes background, anterior, posterior)" in err


def test_a_folder_whose_only_prediction_is_an_image_scores_nothing_and_writes_no_report(shared_data, tmp_path, capsys):
    image, labels = _labels_and_image(shared_data)
    pred = _folder(tmp_path, "pred", {IMAGE_CASE: image})
    truth = _folder(tmp_path, "truth", {IMAGE_CASE: labels[IMAGE_CASE]})
    out = tmp_path / "report.json"
    assert _evaluate(pred, truth, out) == 2
    assert "1 of 1 matched cases were not scored" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("bad, words", [(-3, "negative values (e.g. [-3], min -3)"),
                                        (0.5, "non-integer voxels (e.g. [0.5])")])
def test_negative_or_fractional_label_values_are_refused_with_the_range_of_the_classes(
        shared_data, tmp_path, bad, words):
    labels = {case: _real(shared_data, "labelsTr", case) for case in (IMAGE_CASE, LABEL_CASE)}
    truth_img = nib.load(str(labels[IMAGE_CASE]))
    broken = np.asarray(truth_img.dataobj).astype(np.float32)
    broken[0, 0, 0] = bad
    pred = _folder(tmp_path, "pred", {LABEL_CASE: labels[LABEL_CASE]})
    nib.save(nib.Nifti1Image(broken, truth_img.affine), str(pred / f"{IMAGE_CASE}.nii.gz"))
    truth = _folder(tmp_path, "truth", labels)
    out = tmp_path / "report.json"
    assert _evaluate(pred, truth, out, *CLASSES) == 1
    report = json.loads(out.read_text())
    assert list(report["cases"]) == [LABEL_CASE]
    why = report["failed"][IMAGE_CASE]
    assert why.startswith(f"{pred / f'{IMAGE_CASE}.nii.gz'}: label map has ") and words in why
    assert why.endswith("The prediction must hold label values 0..2 (the 3 classes background, anterior, posterior).")


def test_a_label_map_with_a_value_its_ground_truth_lacks_is_still_scored(shared_data, tmp_path):
    # a class the ground truth does not hold (a false positive of a class the test set lacks) is a label, not an image
    labels = {case: _real(shared_data, "labelsTr", case) for case in (IMAGE_CASE,)}
    truth_img = nib.load(str(labels[IMAGE_CASE]))
    extra = np.asarray(truth_img.dataobj).astype(np.uint8)
    extra[:4, :4, :4] = 3
    pred = tmp_path / "pred"
    pred.mkdir()
    nib.save(nib.Nifti1Image(extra, truth_img.affine), str(pred / f"{IMAGE_CASE}.nii.gz"))
    out = tmp_path / "report.json"
    assert _evaluate(pred, _folder(tmp_path, "truth", labels), out) == 0
    classes = json.loads(out.read_text())["cases"][IMAGE_CASE]["classes"]
    assert classes["class_3"]["status"] == "false_positive" and classes["class_1"]["dice"] == 1.0
