"""A label stored in another axis order or direction than its image (the same voxels: saved LAS for a RAS image, or
transposed by another tool) is reoriented for training, as evaluation already did; any other grid is refused.

Found by a new user's walk over dataset layouts: such a label was refused as "affines differ by up to 35 mm;
resample it", though nothing needs resampling.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff

from engine.datasets import DatasetError, load_dataset
from engine.io import VolumeError, load_label, load_volume
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.loop import train


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 30, 24), seed=5)


def _restore(label_path: Path, ornt: np.ndarray) -> np.ndarray:
    """Store ``label_path`` with its axes reordered/flipped by ``ornt`` (same voxel centres); returns the original."""
    lab = nib.load(str(label_path))
    data = np.asarray(lab.dataobj)
    new = apply_orientation(data, ornt)
    affine = lab.affine @ inv_ornt_aff(ornt, data.shape)
    nib.save(nib.Nifti1Image(new.astype(np.uint8), affine), str(label_path))
    return data


FLIP_X = np.array([[0, -1], [1, 1], [2, 1]], float)
TRANSPOSED_AND_FLIPPED = np.array([[2, 1], [0, -1], [1, -1]], float)


@pytest.mark.parametrize("ornt", [FLIP_X, TRANSPOSED_AND_FLIPPED], ids=["flipped", "transposed+flipped"])
def test_a_reoriented_label_reads_back_onto_its_image_voxel_for_voxel(phantoms, tmp_path, ornt):
    data = shutil.copytree(phantoms, tmp_path / "d")
    label_path = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    image_path = data / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")
    original = _restore(label_path, ornt)
    assert nib.load(str(label_path)).shape != original.shape or not np.array_equal(
        np.asarray(nib.load(str(label_path)).dataobj), original)
    label = load_label(label_path, reference=load_volume(image_path))
    np.testing.assert_array_equal(label.data, original)
    np.testing.assert_allclose(label.affine, nib.load(str(image_path)).affine)
    load_dataset(data).validate(deep=True)  # no "different grid" problem


def test_training_runs_on_a_dataset_with_a_reoriented_label(phantoms, tmp_path):
    data = shutil.copytree(phantoms, tmp_path / "d")
    _restore(sorted((data / "labelsTr").glob("*.nii.gz"))[1], TRANSPOSED_AND_FLIPPED)
    cfg = TrainConfig(dataset=str(data), out=str(tmp_path / "run"), preset="tiny", patch_size=[32, 32, 16],
                      batch_size=1, device="cpu", steps=1, val_every=1, seed=0, val_fraction=0.25)
    result = train(cfg)
    assert Path(result.checkpoint).is_file()


@pytest.mark.parametrize("mm", [1.0, 0.002])
def test_a_label_on_another_grid_is_still_refused(phantoms, tmp_path, mm):
    data = shutil.copytree(phantoms, tmp_path / "d")
    label_path = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    lab = nib.load(str(label_path))
    shifted = lab.affine.copy()
    shifted[0, 3] += mm  # off in the same axis order: needs resampling, not a reorientation (tolerance 0.001 mm)
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), shifted), str(label_path))
    with pytest.raises(DatasetError, match="different grid"):
        load_dataset(data).validate(deep=True)
    image_path = data / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")
    with pytest.raises(VolumeError):
        load_label(label_path, reference=load_volume(image_path))
