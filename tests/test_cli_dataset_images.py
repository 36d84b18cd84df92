"""`mambahome dataset` reads every image's voxels, not only its header.

Before: a truncated .nii.gz image (header intact) or an image with NaN voxels went into the dataset
(exit 0, "wrote ... 3 case(s)"), and `mambahome train` refused it later.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main


def _pairs(root, n=3):
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    images, labels = root / "imgs", root / "labs"
    images.mkdir()
    labels.mkdir()
    for i in range(n):
        image = rng.normal(100.0, 20.0, size=(24, 20, 16)).astype(np.float32)
        label = np.zeros((24, 20, 16), dtype=np.uint8)
        label[5:12, 4:10, 3:9] = 1
        nib.save(nib.Nifti1Image(image, affine), str(images / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(labels / f"case{i}.nii.gz"))
    return images, labels


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_voxel(path):
    img = nib.load(str(path))
    data = img.get_fdata().astype(np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


@pytest.mark.parametrize("spoil, reason", [(_truncate, "truncated"), (_nan_voxel, "1 of 7680 voxels are NaN")])
def test_a_bad_image_is_refused_by_name_and_nothing_is_written(tmp_path, capsys, spoil, reason):
    images, labels = _pairs(tmp_path)
    spoil(images / "case1.nii.gz")
    out = tmp_path / "dataset"
    assert main(["dataset", "--images", str(images), "--labels", str(labels), "--modality", "MR",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "case case1:" in err and str(images / "case1.nii.gz") in err and reason in err
    assert "case0" not in err and "case2" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_good_images_still_make_a_dataset(tmp_path):
    images, labels = _pairs(tmp_path)
    assert main(["dataset", "--images", str(images), "--labels", str(labels), "--modality", "MR",
                 "--out", str(tmp_path / "dataset")]) == 0
    assert sorted(p.name for p in (tmp_path / "dataset" / "imagesTr").iterdir()) == \
        ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
