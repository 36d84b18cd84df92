"""A label map saved under a neutral name (``cord.nii.gz`` beside its image) opens as labels, judged by its voxels;
images, even quantised ones, stay images."""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.io import load_label, load_volume, looks_like_label_map
from napari_mambahome._reader import is_label_file, read_volumes


def test_every_real_image_and_label_is_told_apart(shared_data):
    files = sorted(shared_data.glob("*/*.nii.gz"))
    files += sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:40]
    files += sorted((shared_data / "hippocampus" / "labelsTr").glob("*.nii.gz"))[:40]
    assert len(files) > 80
    wrong = [f.name for f in files if looks_like_label_map(load_volume(f).data) != ("label" in str(f))]
    assert wrong == []


@pytest.mark.parametrize("levels", [4, 12, 60])
def test_a_noisy_image_with_few_grey_levels_is_an_image(levels):
    rng = np.random.default_rng(levels)
    image = np.zeros((40, 50, 45), np.float32)
    image[10:30, 10:40, 10:35] = rng.integers(1, levels + 1, (20, 30, 25))  # an 8-bit-style object with speckle
    assert not looks_like_label_map(image)


def test_regions_of_a_few_integers_are_a_label_map():
    mask = np.zeros((40, 50, 45), np.float32)
    mask[5:30, 10:40, 10:35] = 1
    mask[10:20, 15:25, 15:25] = 7
    assert looks_like_label_map(mask)
    assert looks_like_label_map(mask.astype(np.uint16))


@pytest.mark.parametrize("case", ["nan", "negative", "fraction", "constant", "2d", "bool"])
def test_what_is_not_a_label_map(case):
    mask = np.zeros((20, 20, 20), np.float32)
    mask[5:15, 5:15, 5:15] = 2
    if case == "nan":
        mask[0, 0, 0] = np.nan
    elif case == "negative":
        mask[0, 0, 0] = -1
    elif case == "fraction":
        mask[6, 6, 6] = 2.5
    elif case == "constant":
        mask[:] = 0
    elif case == "2d":
        mask = mask[0]
    elif case == "bool":
        mask = mask > 0
    assert not looks_like_label_map(mask)


def test_a_real_label_under_a_neutral_name_opens_as_labels_and_its_image_as_image(shared_data, tmp_path):
    src = shared_data / "spinal_cord_mri"
    cord, image = tmp_path / "cord.nii.gz", tmp_path / "t2.nii.gz"
    shutil.copy(src / "t2_label.nii.gz", cord)
    shutil.copy(src / "t2_image.nii.gz", image)
    assert not is_label_file(cord)  # nothing in its name or folder says label

    (data, kwargs, kind), = read_volumes(str(cord))
    assert kind == "labels"
    assert np.issubdtype(np.asarray(data).dtype, np.integer)
    truth = load_label(src / "t2_label.nii.gz").data
    assert int(np.asarray(data).sum()) == int(truth.sum()) and set(np.unique(data)) == {0, 1}

    (_, _, kind), = read_volumes(str(image))
    assert kind == "image"


def test_a_file_whose_sample_looks_like_labels_but_holds_fractions_stays_an_image(tmp_path):
    # big enough that the sample thins its rows (every second row and column): the fraction lies off the sample
    data = np.zeros((20, 500, 500), np.float32)
    data[2:18, 100:400, 100:400] = 3
    data[10, 201, 201] = 3.5
    assert looks_like_label_map(data)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    (_, _, kind), = read_volumes(str(path))
    assert kind == "image"
