"""DICOM as a hospital PACS hands it over, made from crops of the real CT (Hounsfield units stored with a rescale
intercept, as scanners write them) and MR: a gantry-tilted CT used to be stacked along the slice normal, every
slice shifted in-plane by the tilt (silent wrong geometry); a multi-frame file was refused as a one-slice
series; a folder with several series, a PACS tree with a DICOMDIR at its top and slices named without a
suffix gave errors that did not say which series were there or where."""
from __future__ import annotations

import locale
import math
import os
from pathlib import Path

import numpy as np
import pytest

from engine.formats import _itk_affine
from engine.io import VolumeError, is_sheared, load_volume, save_volume

sitk = pytest.importorskip("SimpleITK")

from tests.test_formats import assert_same_in_world  # noqa: E402

UID = "1.2.826.0.1.3680043.2.1125.77"


def _ct_crop(shared_data):
    image = sitk.ReadImage(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))
    return image[30:62, 30:62, 5:17]


def _write_series(image, folder, modality="CT", series_uid=UID + ".1", description="AX 3mm", slopes=None,
                  direction=None, positions=None, names=None):
    """One file per slice, real values (HU) stored through Rescale Slope/Intercept by GDCM's writer."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the "C" locale
    values = sitk.GetArrayFromImage(image).astype(np.float64)  # (k, j, i)
    d = direction or image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(values.shape[0]):
        slope = slopes[k] if slopes else 1.0
        intercept = -1024.0 if modality == "CT" else 0.0
        if slope == 1.0:
            sl = sitk.GetImageFromArray(np.round(values[k]).astype(np.int16))
        else:  # a real-valued slice: GDCM needs the stored pixel type spelled out
            sl = sitk.GetImageFromArray(values[k].astype(np.float32))
            for tag, value in (("0028|0100", "16"), ("0028|0101", "16"), ("0028|0102", "15"), ("0028|0103", "1")):
                sl.SetMetaData(tag, value)
        sl.SetSpacing(image.GetSpacing()[:2])
        pos = positions[k] if positions is not None else image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", modality), ("0020|000e", series_uid), ("0020|000d", UID + ".0"),
                           ("0008|0018", f"{series_uid}.{k + 1}"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in pos)), ("0020|0013", str(k + 1)),
                           ("0028|1052", f"{intercept:g}"), ("0028|1053", f"{slope:g}"),
                           ("0008|103e", description)):
            sl.SetMetaData(tag, value)
        target = folder / (names[k] if names else f"IM{k:04d}.dcm")
        writer.SetFileName(str(target) + ("" if target.suffix == ".dcm" else ".dcm"))
        writer.Execute(sl)
        if target.suffix != ".dcm":  # PACS names: no suffix (GDCM's writer needs one to pick itself)
            os.replace(str(target) + ".dcm", target)
    locale.setlocale(locale.LC_ALL, saved)
    return folder


def test_ct_hounsfield_units_through_rescale_read_like_the_nifti(shared_data, tmp_path):
    ct = _ct_crop(shared_data)
    # every other slice stored with another slope, as some exports rescale per slice
    folder = _write_series(ct, tmp_path / "ct", slopes=[1.0 if k % 2 else 0.5 for k in range(ct.GetDepth())])
    vol = load_volume(folder)
    assert_same_in_world(vol.data, vol.affine, sitk.GetArrayFromImage(ct).transpose(2, 1, 0), _itk_affine(ct), 1e-3)
    assert (vol.modality, vol.modality_source) == ("CT", "file")


def test_gantry_tilted_ct_puts_every_slice_where_the_scanner_did(shared_data, tmp_path):
    ct = _ct_crop(shared_data)
    tilt = math.radians(15)
    # rows along x, columns tilted with the gantry; the table moves straight along z between slices
    direction = (1, 0, 0, 0, math.cos(tilt), 0, 0, math.sin(tilt), 1)
    origin, dz = np.array(ct.GetOrigin()), ct.GetSpacing()[2]
    positions = [tuple(origin + [0.0, 0.0, k * dz]) for k in range(ct.GetDepth())]
    folder = _write_series(ct, tmp_path / "tilt", direction=direction, positions=positions)
    vol = load_volume(folder)
    last = vol.affine @ np.array([0, 0, ct.GetDepth() - 1, 1.0])
    truth = np.diag([-1.0, -1.0, 1.0]) @ positions[-1]  # LPS -> RAS
    np.testing.assert_allclose(last[:3], truth, atol=1e-3)
    assert is_sheared(vol.affine)
    # the label map written back overlays the scan in a format that holds the shear; NIfTI is refused by name
    mask = (vol.data > 0).astype(np.uint8)
    with pytest.raises(VolumeError, match=r"\.nrrd"):
        save_volume(tmp_path / "mask.nii.gz", mask, vol)
    back = load_volume(save_volume(tmp_path / "mask.nrrd", mask, vol))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(back.data, mask)


def test_multiframe_file_reads_as_the_volume(shared_data, tmp_path):
    ct = sitk.Cast(_ct_crop(shared_data), sitk.sitkInt16)
    ct.SetMetaData("0008|0060", "CT")
    saved = locale.setlocale(locale.LC_ALL)
    sitk.WriteImage(ct, str(tmp_path / "frames.dcm"))  # one file, one frame per slice
    locale.setlocale(locale.LC_ALL, saved)
    for path in (tmp_path / "frames.dcm", tmp_path):
        vol = load_volume(path)
        assert_same_in_world(vol.data, vol.affine, sitk.GetArrayFromImage(ct).transpose(2, 1, 0),
                             _itk_affine(ct), 1e-3)
        assert vol.modality == "CT"


def _scan_and_localiser(shared_data, folder, names=None):
    mr = sitk.ReadImage(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"))[10:40, 10:40, 20:28]
    _write_series(mr, folder, modality="MR", description="T2 SAG", names=names)
    localiser = sitk.GetImageFromArray(np.zeros((1, 30, 30), np.int16))
    _write_series(localiser, folder, modality="MR", series_uid=UID + ".9", description="3-plane loc",
                  names=["LOC1"])
    return mr


def test_folder_with_two_series_names_each_series_and_a_file_of_it(shared_data, tmp_path):
    _scan_and_localiser(shared_data, tmp_path / "export")
    with pytest.raises(VolumeError, match=r"2 DICOM series.*'T2 SAG' MR, 8 files, e.g\. IM000\d\.dcm.*"
                                          r"'3-plane loc' MR, 1 file, e.g\. LOC1"):
        load_volume(tmp_path / "export")


def test_a_file_named_without_suffix_picks_its_series(shared_data, tmp_path):
    names = [f"{0x1A2B00 + 7 * k:X}" for k in range(8)]  # PACS names, in no slice order
    mr = _scan_and_localiser(shared_data, tmp_path / "export", names=names[::-1])
    vol = load_volume(tmp_path / "export" / names[3])
    assert_same_in_world(vol.data, vol.affine, sitk.GetArrayFromImage(mr).transpose(2, 1, 0), _itk_affine(mr), 1e-3)
    assert (vol.modality, vol.modality_source) == ("MR", "file")


def test_a_file_named_by_its_uid_picks_its_series(shared_data, tmp_path):
    # CD and PACS exports name slices by their SOP Instance UID: the part after the last dot is no suffix
    names = [f"1.2.840.113619.2.55.{k + 1}" for k in range(8)]
    mr = _scan_and_localiser(shared_data, tmp_path / "export", names=names)
    vol = load_volume(tmp_path / "export" / names[2])
    assert_same_in_world(vol.data, vol.affine, sitk.GetArrayFromImage(mr).transpose(2, 1, 0), _itk_affine(mr), 1e-3)
    with pytest.raises(VolumeError, match="unsupported file type"):  # a file of another kind is still named as such
        (tmp_path / "notes.3").write_text("not an image")
        load_volume(tmp_path / "notes.3")


def test_pacs_tree_with_dicomdir_names_the_series_folder(shared_data, tmp_path):
    export = tmp_path / "CD"
    _write_series(_ct_crop(shared_data)[:, :, :3], export / "PAT1" / "STUDY1" / "SER1")
    (export / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64)
    with pytest.raises(VolumeError, match=r"CD: no DICOM series directly in .*PAT1/STUDY1/SER1.*open the folder"):
        load_volume(export)
    assert load_volume(export / "PAT1" / "STUDY1" / "SER1").shape == (32, 32, 3)
