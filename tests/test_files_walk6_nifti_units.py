"""NIfTI lengths in metres or microns (``xyzt_units``) are read in mm (files walk 6).

The header's spatial unit was ignored: a file in metres (0.002 m voxels) was read as 0.002 mm voxels, 1000x too
small, where ITK-based tools (3D Slicer, SimpleITK) convert the unit and show 2 mm voxels; a mask saved for it lay
1000x off the scan there. 'unknown' (0, what most tools write) stays mm, as before and as ITK reads it.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from engine.io import load_label, load_volume, read_grid, save_volume

SHAPE = (10, 12, 8)
LPS = np.diag([-1.0, -1.0, 1.0])


def _affine(scale: float) -> np.ndarray:
    """An oblique scanner-like grid of 1.5 x 2 x 3 mm voxels, its lengths in a unit of ``scale`` mm."""
    mm = np.zeros((4, 4))
    mm[0, 1], mm[1, 0], mm[2, 2] = -2.0, -1.5, 3.0
    mm[:3, 3] = (90.0, 110.0, -60.0)
    mm[3, 3] = 1.0
    out = mm.copy()
    out[:3] /= scale
    return out


def _write(path, unit: str, scale: float):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    img = nib.Nifti1Image(data, _affine(scale))
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, str(path))
    return path


def _itk_ras(path) -> np.ndarray:
    """Where SimpleITK (ITK's NIfTI reader, as 3D Slicer) puts the voxels, as a RAS affine."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(path))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS @ np.asarray(image.GetOrigin())
    return affine


@pytest.mark.parametrize("unit, scale", [("meter", 1000.0), ("micron", 0.001), ("mm", 1.0)])
def test_metres_and_microns_are_read_as_mm(tmp_path, unit, scale):
    path = _write(tmp_path / f"{unit}.nii.gz", unit, scale)
    vol = load_volume(path)
    np.testing.assert_allclose(vol.spacing, (1.5, 2.0, 3.0), rtol=1e-5)
    np.testing.assert_allclose(vol.affine, _affine(1.0), rtol=1e-5, atol=1e-4)
    shape, affine = read_grid(path)  # the header-only reader places it alike
    assert shape == SHAPE
    np.testing.assert_allclose(affine, vol.affine, atol=1e-9)
    np.testing.assert_allclose(vol.affine, _itk_ras(path), atol=1e-3)  # where 3D Slicer puts it
    assert vol.notes == []
    assert load_label(path, reference=vol).shape == SHAPE


def test_unknown_units_stay_mm(tmp_path):
    """Most writers leave xyzt_units 0 whatever they mean: read as mm, as nibabel and ITK read it."""
    path = _write(tmp_path / "unknown.nii.gz", "unknown", 1.0)
    assert nib.load(str(path)).header.get_xyzt_units()[0] == "unknown"
    vol = load_volume(path)
    np.testing.assert_allclose(vol.affine, _affine(1.0), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(vol.affine, _itk_ras(path), atol=1e-3)


@pytest.mark.parametrize("unit, scale", [("meter", 1000.0), ("micron", 0.001)])
def test_a_mask_saved_for_it_keeps_the_image_units_and_overlays_the_scan_everywhere(tmp_path, unit, scale):
    """The mask keeps the image's own header (units and raw values): nibabel-based tools, which ignore the units, and
    ITK-based tools, which convert them, each place it where they place the scan (files walk 6b)."""
    scan = _write(tmp_path / "scan.nii.gz", unit, scale)
    vol = load_volume(scan)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:7, 1:4] = 1
    out = save_volume(tmp_path / "mask.nii.gz", labels, vol, label_map=True)
    written = nib.load(str(out))
    assert written.header.get_xyzt_units() == (unit, "sec")  # the image's units; the time unit kept
    np.testing.assert_allclose(written.affine, nib.load(str(scan)).affine, rtol=0, atol=0)  # nibabel: same place
    np.testing.assert_allclose(_itk_ras(out), _itk_ras(scan), atol=1e-3)  # same place as the scan in 3D Slicer
    back = load_label(out, reference=vol)
    np.testing.assert_array_equal(np.asarray(back.data), labels)
    np.testing.assert_allclose(back.affine, vol.affine, atol=0)
    nrrd = save_volume(tmp_path / "mask.nrrd", labels, vol, label_map=True)  # one-geometry formats in mm
    np.testing.assert_allclose(load_volume(nrrd).affine, vol.affine, atol=1e-4)


def test_the_header_kept_on_the_volume_is_the_files_and_its_affine_in_mm_is_the_volumes(tmp_path):
    from engine.io import nifti_affine_mm

    path = _write(tmp_path / "m.nii.gz", "meter", 1000.0)
    vol = load_volume(path)
    assert vol.header.get_xyzt_units()[0] == "meter"
    np.testing.assert_array_equal(vol.header.get_best_affine(), nib.load(str(path)).affine)
    np.testing.assert_allclose(nifti_affine_mm(vol.header), vol.affine, atol=1e-9)
