"""NIfTI files in metres or microns after files walk 6 (which reads them in mm, as ITK does): files walk 6b.

1. A mask written for such an image keeps the image's own header (units and raw values), so nibabel-based tools
   (which ignore ``xyzt_units``: nibabel, MONAI's NibabelReader, nilearn) and ITK-based tools (which convert it) each
   put it where they put the image. Walk 6 wrote it converted to mm (values x1000, units mm): aligned in ITK tools,
   1000x off the image in nibabel's. The engine's geometry (Volume.affine, spacing) stays in mm; one-geometry formats
   (.nrrd, .seg.nrrd, .mha) get the mm grid.
2. A label saved the common nibabel way for a metre image (``Nifti1Image(lab, img.affine)``: units 0, read as mm) is
   refused as a unit mismatch naming both files' units, not as "affines differ by up to 199.8 mm; resample it".
3. The server's range check of an uploaded NIfTI's affine runs on the affine in mm, as the engine places it.
"""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from engine.io import VolumeError, load_label, load_volume, save_volume

SHAPE = (10, 12, 8)


def _mm_affine() -> np.ndarray:
    """An oblique grid of 1.5 x 2 x 3 mm voxels placed about 100 mm from the origin."""
    mm = np.zeros((4, 4))
    mm[0, 1], mm[1, 0], mm[2, 2] = -2.0, -1.5, 3.0
    mm[:3, 3] = (90.0, 110.0, -60.0)
    mm[3, 3] = 1.0
    return mm


def _write(path, unit: str = "meter", scale: float = 1000.0, affine=None):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    raw = (_mm_affine() if affine is None else np.array(affine, dtype=np.float64)).copy()
    raw[:3] /= scale
    img = nib.Nifti1Image(data, raw)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, str(path))
    return path


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:7, 1:4] = 1
    return labels


# ------------------------------------------------------------------------------------------------ 1. masks
@pytest.mark.parametrize("unit, scale", [("meter", 1000.0), ("micron", 0.001)])
def test_a_mask_lines_up_with_its_image_in_nibabel_simpleitk_and_the_engine(tmp_path, unit, scale):
    scan = _write(tmp_path / "scan.nii.gz", unit, scale)
    vol = load_volume(scan)
    np.testing.assert_allclose(vol.affine, _mm_affine(), atol=1e-4)  # the engine works in mm
    mask = save_volume(tmp_path / "mask.nii.gz", _labels(), vol, label_map=True)

    # nibabel (MONAI's NibabelReader, nilearn): raw values, units ignored -- the mask is where the image is
    img_n, mask_n = nib.load(str(scan)), nib.load(str(mask))
    np.testing.assert_array_equal(mask_n.affine, img_n.affine)
    assert mask_n.header.get_xyzt_units() == img_n.header.get_xyzt_units() == (unit, "sec")
    for key in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "qoffset_x", "quatern_b"):
        np.testing.assert_array_equal(mask_n.header[key], img_n.header[key])
    np.testing.assert_array_equal(mask_n.header["pixdim"][1:4], img_n.header["pixdim"][1:4])

    # SimpleITK (3D Slicer, ITK-SNAP): units converted -- the mask is where the image is
    sitk = pytest.importorskip("SimpleITK")
    img_s, mask_s = sitk.ReadImage(str(scan)), sitk.ReadImage(str(mask))
    np.testing.assert_allclose(mask_s.GetOrigin(), img_s.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(mask_s.GetSpacing(), img_s.GetSpacing(), rtol=1e-7)
    np.testing.assert_allclose(mask_s.GetDirection(), img_s.GetDirection(), atol=1e-7)
    np.testing.assert_allclose(img_s.GetSpacing(), vol.spacing, rtol=1e-5)  # ITK: in mm as well

    # the engine: both in mm, identical
    back = load_volume(mask)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.spacing == vol.spacing
    np.testing.assert_array_equal(np.asarray(load_label(mask, reference=vol).data), _labels())


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".mha"])
def test_one_geometry_formats_get_the_mm_grid(tmp_path, suffix):
    vol = load_volume(_write(tmp_path / "scan.nii.gz"))
    out = save_volume(tmp_path / f"mask{suffix}", _labels(), vol,
                      segments=[{"value": 1, "name": "organ"}] if suffix == ".seg.nrrd" else None)
    np.testing.assert_allclose(load_volume(out).affine, _mm_affine(), atol=1e-4)
    sitk = pytest.importorskip("SimpleITK")
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetSpacing(),
                               sitk.ReadImage(str(tmp_path / "scan.nii.gz")).GetSpacing(), rtol=1e-5)


def test_a_volume_whose_grid_changed_gets_a_new_header_in_mm(tmp_path):
    """A header that no longer describes the volume's (mm) affine is not kept: the new one says mm."""
    import dataclasses

    vol = load_volume(_write(tmp_path / "scan.nii.gz"))
    moved = vol.affine.copy()
    moved[:3, 3] += 5.0
    out = save_volume(tmp_path / "mask.nii.gz", _labels(), dataclasses.replace(vol, affine=moved), label_map=True)
    written = nib.load(str(out))
    assert written.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(written.affine, moved, atol=1e-4)
    np.testing.assert_allclose(load_volume(out).affine, moved, atol=1e-4)


# ------------------------------------------------------------------------------------------------ 2. labels
def _nibabel_way_label(tmp_path, scan):
    """The common nibabel way: the image's affine, a new header (units 0: read as mm by every tool)."""
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(_labels(), nib.load(str(scan)).affine), str(path))
    assert nib.load(str(path)).header.get_xyzt_units()[0] == "unknown"
    return path


def test_a_label_in_other_units_is_refused_as_such_naming_both_files_and_units(tmp_path):
    scan = _write(tmp_path / "scan.nii.gz")
    label = _nibabel_way_label(tmp_path, scan)
    with pytest.raises(VolumeError) as info:
        load_label(label, reference=load_volume(scan))
    text = str(info.value)
    assert str(label) in text and str(scan) in text
    assert "differ only in their length unit" in text
    assert "the image's header says its lengths are in metres, the label's says unknown (read as mm)" in text
    assert "write the label with the image's header" in text
    assert "resample" not in text and "affines differ" not in text


def test_microns_against_mm_too(tmp_path):
    scan = _write(tmp_path / "scan.nii.gz", "micron", 0.001)
    label = tmp_path / "label.nii.gz"
    img = nib.Nifti1Image(_labels(), nib.load(str(scan)).affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(label))
    with pytest.raises(VolumeError, match=r"image's header says its lengths are in microns, the label's says mm"):
        load_label(label, reference=load_volume(scan))


def test_evaluation_names_the_unit_mismatch(tmp_path):
    from engine.io import check_same_grid

    scan = _write(tmp_path / "scan.nii.gz")
    label = _nibabel_way_label(tmp_path, scan)
    with pytest.raises(VolumeError, match="prediction's grid is 1/1000 the size of the ground truth's"):
        check_same_grid(load_label(label), load_volume(scan), what="prediction", reference_what="ground truth")


def test_a_really_different_grid_still_says_resample(tmp_path):
    scan = _write(tmp_path / "scan.nii.gz")
    shifted = _mm_affine()
    shifted[:3, 3] += 7.0
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(_labels(), shifted), str(label))
    with pytest.raises(VolumeError, match="resample it onto the image first"):
        load_label(label, reference=load_volume(scan))


def test_a_dataset_check_names_the_unit_mismatch(tmp_path):
    from engine.datasets import DatasetError, load_dataset
    from engine.synth import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=2, modality="CT", shape=(16, 16, 16), seed=1)
    image_path = root / "imagesTr" / "phantom_000_0000.nii.gz"
    label_path = root / "labelsTr" / "phantom_000.nii.gz"
    image = nib.load(str(image_path))
    metres = image.affine.copy()
    metres[:3] /= 1000.0
    img = nib.Nifti1Image(np.asarray(image.dataobj), metres)
    img.header.set_xyzt_units("meter")
    nib.save(img, str(image_path))
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(label_path)).dataobj), metres), str(label_path))
    with pytest.raises(DatasetError) as info:
        load_dataset(root).validate(deep=True)
    text = str(info.value)
    assert "case phantom_000:" in text and "differ only in their length unit" in text
    assert "the image's header says its lengths are in metres, the label's says unknown (read as mm)" in text
    assert str(label_path) in text and str(image_path) in text
    assert "resample" not in text


# ------------------------------------------------------------------------------------------------ 3. server
def test_server_range_check_runs_on_the_mm_affine(tmp_path):
    from engine.server.volumes import volume_from_nifti_bytes

    far = _mm_affine()
    far[:3, 3] = (5e6, 0.0, 0.0)  # 5 km: raw 5000 in metres passed the 1e6 check, then reached the engine in mm
    body = gzip.compress(_write(tmp_path / "far.nii", affine=far).read_bytes())
    with pytest.raises(VolumeError, match=r"holds 5e\+06, out of range"):
        volume_from_nifti_bytes(body, "far.nii.gz", 10**7)

    near = _mm_affine()
    near[:3, 3] = (5e5, 0.0, 0.0)  # 500 m, in microns 5e8: refused from its raw values before
    body = _write(tmp_path / "near.nii", "micron", 0.001, affine=near).read_bytes()
    vol = volume_from_nifti_bytes(body, "near.nii", 10**7)
    np.testing.assert_allclose(vol.affine[:3, 3], (5e5, 0.0, 0.0), rtol=1e-6)


@pytest.mark.parametrize("units", [("mm", "mm"), ("unknown", "mm")])
def test_two_files_in_one_unit_1000x_apart_are_on_different_grids(tmp_path, units):
    """The unit message is for files whose headers name different units (metres or microns against mm); two mm files
    1000x apart were told "the image's header says mm, the label's says mm... correct the units"."""
    image = _write(tmp_path / "image.nii.gz", unit=units[1], scale=1.0)
    data = _labels()
    small = _mm_affine()
    small[:3] /= 1000.0
    label = nib.Nifti1Image(data, small)
    label.header.set_xyzt_units(units[0], "sec")
    nib.save(label, str(tmp_path / "label.nii.gz"))
    with pytest.raises(VolumeError, match="resample it onto the image") as caught:
        load_label(tmp_path / "label.nii.gz", reference=load_volume(image))
    assert "length unit" not in str(caught.value)
