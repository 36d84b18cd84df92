"""`mambahome dataset` names the case behind a refusal and says how far a label's grid is off.

Reproductions (before the fix):
- a label holding value 3 with ``--classes a b``: "label values go up to 3 but 2 class name(s) were given"
  named no file, so in a folder of 200 labels the user could not find the bad one;
- a label shifted 1e-3 mm and a label shifted 2 mm got the same "lies on a different grid" line, with
  no hint whether it was float rounding or another case's label.
"""
import nibabel as nib
import numpy as np
import pytest

from engine.datasets import DatasetError, make_dataset


def _pairs(tmp_path, tweak):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir(), labs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.random((12, 12, 12)).astype(np.float32)
        label = np.zeros((12, 12, 12), np.uint8)
        label[3:6, 3:6, 3:6], label[7:9, 7:9, 7:9] = 1, 2
        affine = np.eye(4)
        label_affine = affine.copy()
        if i == 1:
            label, label_affine = tweak(label, label_affine)
        nib.save(nib.Nifti1Image(image, affine), str(imgs / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, label_affine), str(labs / f"c{i}.nii.gz"))
    return imgs, labs


def _value3(label, affine):
    label = label.copy()
    label[0, 0, 0] = 3
    return label, affine


def _shifted(mm):
    def tweak(label, affine):
        affine = affine.copy()
        affine[0, 3] += mm
        return label, affine
    return tweak


def test_value_outside_classes_names_the_case(tmp_path):
    imgs, labs = _pairs(tmp_path, _value3)
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["a", "b"])
    assert "case c1" in str(err.value) and "c1.nii.gz" in str(err.value)
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("mm", [0.002, 2.0])
def test_grid_mismatch_says_by_how_much(tmp_path, mm):
    imgs, labs = _pairs(tmp_path, _shifted(mm))
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["a", "b"])
    text = str(err.value)
    assert "case c1" in text and "different grid" in text
    assert f"differ by up to {mm:g}" in text
    assert not (tmp_path / "ds").exists()
