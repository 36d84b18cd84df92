"""napari's reader knows a label map by its NIfTI intent also when the file's suffix is mixed case (``.Nii.Gz``:
nibabel alone cannot open it, so the intent was read as "not a label")."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from napari_mambahome._reader import is_label_file


def test_label_intent_is_read_from_a_mixed_case_suffix(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4))
    img.header.set_intent("label")
    plain = tmp_path / "scan2.nii.gz"
    nib.save(img, str(plain))
    mixed = tmp_path / "scan3.Nii.Gz"
    plain.rename(mixed)
    assert is_label_file(mixed)
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    other = tmp_path / "scan4.nii.gz"
    nib.save(image, str(other))
    other.rename(tmp_path / "scan4.Nii.Gz")
    assert not is_label_file(tmp_path / "scan4.Nii.Gz")
