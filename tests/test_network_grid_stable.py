"""Geometry equal to float32 precision resamples onto the same network grid and predicts the same labels.

A user's oblique anisotropic scan (0.7 x 1.3 x 2.5 mm) saved as .nii.gz and as .nrrd predicted differently (0.7 %
of voxels): NIfTI stores the direction in float32, so its columns are orthogonal only to ~1e-7; MONAI's
``compute_shape_offset`` then found no source corner lowest along every network axis (it allows 1e-8 voxels)
and centred the network grid on the volume instead of starting it at the first voxel, half a voxel (0.5 mm)
away from the .nrrd's grid, and 97 % of the network-space voxels differed. ``engine.preprocess.network_grid``
decides the grid with a tolerance tied to the network voxel; ordinary geometry keeps MONAI's own grid.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.utils import compute_shape_offset, zoom_affine

from engine.io import Volume, load_label, load_volume, save_volume
from engine.preprocess import (Preprocessing, eval_transforms, network_grid, to_network_grid, to_network_space,
                               to_source_grid)
from engine.synth import make_phantom

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "napari_mambahome" / "models" / "default.safetensors"
TARGET = (1.5, 1.5, 2.0)  # the bundled models' spacing
SPACING = (0.7, 1.3, 2.5)


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = math.radians(z_deg), math.radians(x_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def oblique_affine(spacing=SPACING, z_deg: float = 30.0, x_deg: float = 0.0, origin=(-10.0, 20.0, 33.0)):
    affine = np.eye(4)
    affine[:3, :3] = rotation(z_deg, x_deg) @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(spacing)  # one flip, like LPS
    affine[:3, 3] = origin
    return affine


def float32_rounded(affine: np.ndarray) -> np.ndarray:
    """The affine as a NIfTI sform stores it (float32 elements)."""
    return np.asarray(affine, dtype=np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def oblique_pair(tmp_path_factory):
    """The user's case: one oblique MR phantom (0.7 x 1.3 x 2.5 mm) written as .nii.gz and as .nrrd."""
    folder = tmp_path_factory.mktemp("oblique")
    ph = make_phantom(shape=(40, 36, 20), modality="MR", seed=3, spacing=SPACING)
    exact = Volume.from_array(ph.image.astype(np.float32), oblique_affine())
    for suffix in (".nii.gz", ".nrrd"):
        save_volume(folder / f"hip{suffix}", exact.data, exact)
        save_volume(folder / f"hip_label{suffix}", ph.label.astype(np.uint8), exact)
    nii, nrrd = load_volume(folder / "hip.nii.gz"), load_volume(folder / "hip.nrrd")
    # the two files place the voxels the same to float32 precision, but not bit for bit
    assert not np.array_equal(nii.affine, nrrd.affine)
    assert np.abs(nii.affine - nrrd.affine).max() < 1e-5
    return folder, nii, nrrd


def test_nifti_and_nrrd_same_network_grid(oblique_pair):
    _, nii, nrrd = oblique_pair
    for target in (TARGET, (1.0, 1.0, 1.0), (0.8, 1.1, 3.0)):
        pp = Preprocessing.for_modality("MR", target_spacing=target)
        a, ctx_a = to_network_space(nii, pp)
        b, ctx_b = to_network_space(nrrd, pp)
        assert ctx_a.network_shape == ctx_b.network_shape, target
        # the grids start at the same voxel (they were 0.5 mm apart), to the files' float32 precision
        assert np.abs(ctx_a.network_affine - ctx_b.network_affine).max() < 1e-4, target
        # ... at a corner voxel of the scan (MONAI's rule for an unsheared grid), not centred on it
        corner = np.linalg.solve(nrrd.affine, np.append(ctx_a.network_affine[:3, 3], 1.0))[:3]
        assert np.allclose(corner, np.round(corner), atol=1e-4), (target, corner)
        assert all(round(c) in (0, n - 1) for c, n in zip(corner, nrrd.shape)), (target, corner)
        assert torch.allclose(a, b, rtol=0, atol=1e-4), (target, float((a - b).abs().max()))
        # and back onto each file's own grid
        assert to_source_grid(np.asarray(a), ctx_a).shape[1:] == nii.shape


def test_nifti_and_nrrd_same_training_grid(oblique_pair):
    """Training and validation resample the same way (``Spacingd`` with the same grid rule), labels included."""
    folder, nii, _ = oblique_pair
    pp = Preprocessing.for_modality("MR", target_spacing=TARGET)
    t = eval_transforms(pp, class_ids=range(8))
    a = t({"image": str(folder / "hip.nii.gz"), "label": str(folder / "hip_label.nii.gz"), "modality": "MR"})
    b = t({"image": str(folder / "hip.nrrd"), "label": str(folder / "hip_label.nrrd"), "modality": "MR"})
    assert a["image"].shape == b["image"].shape
    assert torch.equal(a["label"], b["label"])
    assert torch.allclose(a["image"], b["image"], rtol=0, atol=1e-4)
    # training sees the grid inference sees
    image, ctx = to_network_space(nii, pp, modality="MR")
    assert tuple(a["image"].shape[1:]) == ctx.network_shape
    assert np.allclose(np.asarray(a["image"].affine), ctx.network_affine, atol=1e-9)
    assert torch.allclose(a["image"].as_tensor(), image, rtol=0, atol=1e-6)
    label_net, _ = to_network_grid(load_label(folder / "hip_label.nii.gz", reference=nii), pp, mode="nearest")
    assert torch.equal(a["label"].as_tensor().float(), label_net)


def test_nifti_and_nrrd_same_prediction(oblique_pair):
    from engine.checkpoint import load_checkpoint
    from engine.inference import Predictor

    _, nii, nrrd = oblique_pair
    predictor = Predictor(load_checkpoint(DEFAULT_MODEL, device="cpu"), device="cpu")
    a, b = predictor.predict(nii, modality="MR").labels, predictor.predict(nrrd, modality="MR").labels
    assert (a != 0).any() and (a == 0).any()
    np.testing.assert_array_equal(a, b)  # 0.1 % of the voxels differed (0.5 mm apart grids)


@pytest.mark.parametrize("seed", range(40))
def test_float32_header_same_grid_as_exact(seed):
    """Random oblique/anisotropic geometries: the affine a float32 header stores, and one moved by 1e-7, give the
    exact affine's grid (shape, and origin to float32 precision)."""
    rng = np.random.default_rng(seed)
    spacing = rng.choice([0.5, 0.7, 0.7421875, 0.8, 1.0, 1.25, 1.3, 2.0, 2.5, 3.0, 5.0], size=3)
    affine = oblique_affine(spacing, z_deg=float(rng.uniform(-40, 40)), x_deg=float(rng.uniform(-40, 40)),
                            origin=rng.uniform(-200, 200, size=3))
    shape = tuple(int(v) for v in rng.integers(8, 200, size=3))
    target = TARGET if seed % 2 else (1.0, 1.0, 1.0)
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    def grid(a):
        img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(
            MetaTensor(torch.zeros((1,) + shape), affine=torch.as_tensor(a, dtype=torch.float64)))
        return network_grid(img.shape[1:], np.asarray(img.affine, np.float64), target)

    shape_exact, origin_exact = grid(affine)
    nudged = affine.copy()
    nudged[:3, :3] += rng.choice([-1e-7, 1e-7], size=(3, 3)) * (np.abs(affine[:3, :3]) > 1e-9)
    for other in (float32_rounded(affine), nudged):
        shape_other, origin_other = grid(other)
        assert shape_other == shape_exact
        assert np.abs(np.asarray(origin_other) - origin_exact).max() < 1e-4


@pytest.mark.parametrize("seed", range(40))
def test_exact_geometry_keeps_monai_grid(seed):
    """Orthogonal or genuinely sheared affines away from a rounding tie: the grid is MONAI's own."""
    rng = np.random.default_rng(100 + seed)
    spacing = rng.uniform(0.4, 4.0, size=3)
    affine = np.eye(4)
    affine[:3, :3] = rotation(float(rng.uniform(-40, 40)), float(rng.uniform(-40, 40))) @ np.diag(spacing)
    if seed % 3 == 0:  # a real shear (gantry tilt): MONAI centres the grid, and so does network_grid
        affine[:3, 2] += affine[:3, 1] * rng.uniform(-0.3, 0.3) / spacing[1] * spacing[2]
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    shape = tuple(int(v) for v in rng.integers(8, 120, size=3))
    target = tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
    monai_shape, monai_origin = compute_shape_offset(shape, affine, zoom_affine(affine, target, diagonal=False))
    grid_shape, origin = network_grid(shape, affine, target)
    assert grid_shape == tuple(int(v) for v in monai_shape)
    assert np.allclose(origin, monai_origin, rtol=0, atol=1e-9)


def test_orthogonal_volume_resamples_as_plain_monai():
    """An exactly orthogonal oblique volume (an .nrrd) resamples bit for bit as MONAI ``Spacing`` would."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientation, Spacing

    ph = make_phantom(shape=(32, 28, 20), modality="MR", seed=5, spacing=SPACING)
    vol = Volume.from_array(ph.image.astype(np.float32), oblique_affine())
    pp = Preprocessing.for_modality("MR", target_spacing=TARGET)
    ours, ctx = to_network_grid(vol, pp)
    plain = Compose([Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                     Spacing(pixdim=TARGET, mode="bilinear", padding_mode="border", dtype=np.float32)])
    ref = plain(MetaTensor(torch.as_tensor(vol.data)[None], affine=torch.as_tensor(vol.affine, dtype=torch.float64)))
    assert ctx.network_shape == tuple(ref.shape[1:])
    assert np.array_equal(ctx.network_affine, np.asarray(ref.affine, np.float64))
    assert torch.equal(ours, ref.as_tensor())
