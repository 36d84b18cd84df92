"""The same voxels + affine saved as .nii.gz (float32 header spacing 3.0000002) and as .nrrd (3.0) resample onto
the same network grid, in inference and in training: MONAI sizes the grid as round((n-1)*spacing/target + 1), and
3 mm -> 2 mm over 30 slices is a tie (44.5) that the float32 rounding turned into 45 voxels instead of 44."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, Orientation, Spacing

from engine.io import load_label, load_volume, save_volume
from engine.preprocess import (Preprocessing, eval_transforms, snapped_spacing, to_network_grid, to_network_space,
                               to_source_grid)

TARGET = (1.5, 1.5, 2.0)  # the shipped default model's spacing


@pytest.fixture
def ct_pair(shared_data, tmp_path):
    src = nib.load(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))
    lab = nib.load(str(shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz"))
    affine = src.affine.copy()
    nii_affine = affine.copy()
    nii_affine[2, 2] = float(np.nextafter(np.float32(3.0), np.float32(4.0)))  # 3.0000002: float32 rounding
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), nii_affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), nii_affine), str(tmp_path / "ct_label.nii.gz"))
    exact = load_volume(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz")
    assert exact.spacing == (3.0, 3.0, 3.0)
    save_volume(tmp_path / "ct.nrrd", np.asarray(exact.data), exact)
    save_volume(tmp_path / "ct_label.nrrd", np.asarray(lab.dataobj), exact)
    nii, nrrd = load_volume(tmp_path / "ct.nii.gz"), load_volume(tmp_path / "ct.nrrd")
    assert nii.spacing[2] != nrrd.spacing[2] and abs(nii.spacing[2] - 3.0) < 1e-6 and nrrd.spacing[2] == 3.0
    return tmp_path, nii, nrrd


def test_inference_grid_same_for_near_equal_spacing(ct_pair):
    _, nii, nrrd = ct_pair
    pp = Preprocessing.for_modality("CT", target_spacing=TARGET)
    a, ctx_a = to_network_space(nii, pp)
    b, ctx_b = to_network_space(nrrd, pp)
    assert ctx_a.network_shape == ctx_b.network_shape == (243, 201, 44)
    assert np.allclose(ctx_a.network_affine, ctx_b.network_affine, atol=1e-4)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
    # and back onto each source grid exactly
    assert to_source_grid(np.asarray(a), ctx_a).shape[1:] == nii.shape


def test_training_grid_same_for_near_equal_spacing(ct_pair):
    folder, _, _ = ct_pair
    pp = Preprocessing.for_modality("CT", target_spacing=TARGET)
    t = eval_transforms(pp, class_ids=range(200))
    a = t({"image": str(folder / "ct.nii.gz"), "label": str(folder / "ct_label.nii.gz"), "modality": "CT"})
    b = t({"image": str(folder / "ct.nrrd"), "label": str(folder / "ct_label.nrrd"), "modality": "CT"})
    assert a["image"].shape == b["image"].shape == (1, 243, 201, 44)
    assert torch.equal(a["label"], b["label"])


def test_ordinary_spacing_resamples_as_plain_monai(shared_data):
    """Exact spacings keep MONAI's own grid and values (here the tie rounds to 44 as before)."""
    from monai.data import MetaTensor

    vol = load_volume(shared_data / "abdomen_ct_mr" / "mr_image.nii.gz")
    for target in (TARGET, (1.0, 1.0, 1.0), (0.8, 1.3, 2.7)):
        pp = Preprocessing.for_modality("MR", target_spacing=target)
        _, ctx = to_network_grid(vol, pp)
        plain = Compose([Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                         Spacing(pixdim=target, mode="bilinear", padding_mode="border", dtype=np.float32)])
        img = MetaTensor(torch.as_tensor(np.asarray(vol.data, np.float32))[None],
                         affine=torch.as_tensor(vol.affine, dtype=torch.float64))
        ref = plain(img)
        assert ctx.network_shape == tuple(ref.shape[1:])
        assert np.allclose(ctx.network_affine, np.asarray(ref.affine), atol=1e-9)


def test_snapped_spacing_rule():
    assert snapped_spacing(3.000000238418579, 2.0) == 3.0
    assert snapped_spacing(2.9999999, 1.5) == 3.0
    for ordinary in (3.0, 0.9765625, 0.7, 1.2345678, 3.001):
        assert snapped_spacing(ordinary, 2.0) == ordinary
