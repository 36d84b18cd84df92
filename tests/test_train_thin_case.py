"""A training case whose file holds one slice is named as 2D, not blamed on its header's spacing (as predict says)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.datasets import load_dataset
from engine.preprocess import Preprocessing
from engine.synth import make_phantom, write_phantom_dataset
from engine.train.patches import TrainingDataError, preprocess_cases


@pytest.mark.parametrize("depth, word", [(1, "2D image"), (24, "check the voxel spacing")])
def test_a_thin_case_says_why_it_is_too_small(tmp_path, depth, word):
    root = write_phantom_dataset(tmp_path / "data", 1, shape=(28, 30, 24), seed=1, num_structures=2)
    image, label = make_phantom((28, 30, 24), "CT", seed=1, num_structures=2).to_volumes()
    data, labels = image.data[:, :, :depth], label.data[:, :, :depth].astype(np.uint8)
    affine = np.array(image.affine)
    # a header with 0.01 mm voxels shrinks a whole volume too: then the spacing is the likely fault
    if depth > 1:
        affine[:3, :3] = np.diag([0.01, 0.01, 0.01])
    nib.save(nib.Nifti1Image(data, affine), str(root / "imagesTr" / "phantom_000_0000.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / "phantom_000.nii.gz"))
    ds = load_dataset(root)
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    with pytest.raises(TrainingDataError) as info:
        preprocess_cases(ds.cases, pp, list(range(len(ds.class_names))))
    assert word in str(info.value) and "phantom_000" in str(info.value)
