"""Enhanced multi-frame DICOM (one file holding every slice: Enhanced / Legacy Converted Enhanced CT and MR, as
modern scanners and PACS exports write them) is read with the scan's geometry.

The files are made from the real CT and MR (``MAMBAHOME_SHARED_DATA``): each crop is written as a classic series
(one file per slice, pydicom) on an oblique grid with anisotropic pixels (0.8 x 1.1 mm) and 2.5 mm between slices
(3 mm slice thickness, so a reader taking the thickness for the step is wrong too), stored through a rescale whose
slope changes from slice to slice; highdicom then converts that series into one Legacy Converted Enhanced file,
frames in the spatial order, reversed or shuffled.

SimpleITK (GDCM) alone read such a file frame by frame in file order with the first frame's rescale and, without
Spacing Between Slices, 1 mm and a wrong direction along the slices: shuffled frames came back shuffled, reversed
ones reversed, rescaled frames with wrong Hounsfield units (up to 2500 HU off), uneven, duplicated or non-parallel
frames as a silently wrong volume. Now the frames are sorted along the slice normal from their functional groups,
each rescaled with its own slope and intercept, and frames that do not make one evenly spaced stack are refused
naming the file.
"""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.io import VolumeError, is_sheared, load_volume

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING = (0.8, 1.1, 2.5)  # along rows (i), along columns (j), between slices (k)
ORIGIN = np.array([-40.0, 25.0, 110.0])  # LPS, of voxel (0, 0, 0)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    a, b, c = map(math.radians, (a, b, c))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = _rotation(20, -15, 30)  # LPS columns: row direction, column direction, slice normal


def _truth_affine(direction=DIRECTION, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing)[None, :]
    lps[:3, 3] = origin
    return LPS @ lps


def _crop(shared_data, modality):
    if modality == "CT":
        image = sitk.ReadImage(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))[30:70, 30:66, 5:19]
    else:
        image = sitk.ReadImage(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"))[10:50, 8:44, 18:30]
    return sitk.GetArrayFromImage(image).astype(np.float64)  # (k, j, i): slices of rows of columns


def _classic(values, folder: Path, modality="CT", slopes=None, positions=None, orientations=None,
             series_uid=None, description="AX 2.5mm"):
    """One pydicom file per slice of ``values`` (k, j, i) on the oblique grid, real values stored through
    Rescale Slope/Intercept; ``positions``/``orientations`` (LPS) override a slice's plane."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    intercept = -1024.0 if modality == "CT" else 0.0
    files = []
    for k in range(values.shape[0]):
        slope = slopes[k] if slopes else 1.0
        stored = np.round((values[k] - intercept) / slope)
        assert 0 <= stored.min() and stored.max() < 65536 and np.allclose(stored * slope + intercept, values[k])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.71", series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.72"
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = modality, "MF^Test", "MF1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20260101", "120000", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID, ds.PositionReferenceIndicator = "", "", "1", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 3, k + 1, 1
        ds.Manufacturer, ds.SeriesDescription = "test", description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        d = orientations[k] if orientations is not None else DIRECTION
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
        pos = positions[k] if positions is not None else ORIGIN + k * SPACING[2] * DIRECTION[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [f"{SPACING[1]:g}", f"{SPACING[0]:g}"]  # between rows, between columns
        ds.SliceThickness = "3"
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        if modality == "CT":
            ds.KVP, ds.RescaleType = "120", "HU"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = "90", "3000", 1, "3"
        ds.PixelData = stored.astype("<u2").tobytes()
        files.append(folder / f"IM{k:04d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def _enhanced(files, out: Path, order=None, modality="CT") -> Path:
    """A Legacy Converted Enhanced CT/MR file of the slice files, frames in ``order`` (None: highdicom sorts
    them into a volume and writes Spacing Between Slices)."""
    datasets = [pydicom.dcmread(f) for f in files]
    if order is not None:
        datasets = [datasets[i] for i in order]
    cls = hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's notes about attributes our small slices lack
        image = cls(datasets, series_instance_uid=generate_uid(), series_number=4, sop_instance_uid=generate_uid(),
                    instance_number=1, include_dimension_index=order is None)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)
    return out


def _frame_planes(path: Path):
    """(positions along the slice normal, rescale slopes) of a multi-frame file's frames, in file order."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot(normal, [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]))
             for f in ds.PerFrameFunctionalGroupsSequence]
    slopes = [float(f.PixelValueTransformationSequence[0].RescaleSlope) for f in ds.PerFrameFunctionalGroupsSequence]
    return np.array(along), slopes


SLOPES = [0.5 if k % 3 == 0 else 1.0 for k in range(16)]  # every third slice rescaled differently
LAYOUTS = ["classic series", "enhanced, spatial order", "enhanced, reversed", "enhanced, shuffled"]


def _make(shared_data, tmp_path, layout, modality):
    values = _crop(shared_data, modality)
    n = values.shape[0]
    files = _classic(values, tmp_path / "classic", modality, slopes=SLOPES[:n])
    if layout == "classic series":
        return values, tmp_path / "classic", files[n // 2]
    order = {"enhanced, spatial order": None, "enhanced, reversed": list(range(n))[::-1],
             "enhanced, shuffled": list(np.random.default_rng(1).permutation(n))}[layout]
    out = _enhanced(files, tmp_path / "enhanced" / "scan.dcm", order, modality)
    along, slopes = _frame_planes(out)
    assert len(set(slopes)) == 2  # the rescale is per frame, and differs between frames
    if layout == "enhanced, shuffled":  # the frames really are out of spatial order
        assert not (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0))
    return values, out.parent, out


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_volume_voxels_and_geometry_match_the_scan(shared_data, tmp_path, layout, modality):
    values, folder, one_file = _make(shared_data, tmp_path, layout, modality)
    truth = values.transpose(2, 1, 0)  # engine order (i, j, k)
    for path in (folder, one_file):
        vol = load_volume(path)
        assert vol.shape == truth.shape, path
        # origin, both pixel spacings (not swapped), 2.5 mm between slices (not the 3 mm thickness, not 1 mm),
        # the oblique direction, slices increasing along the normal
        np.testing.assert_allclose(vol.affine, _truth_affine(), atol=1e-4, err_msg=str(path))
        # every frame in its place, in real units through its own rescale
        np.testing.assert_allclose(vol.data, truth, atol=1e-3, err_msg=str(path))
        assert (vol.modality, vol.modality_source) == (modality, "file")
        assert not vol.notes


def test_enhanced_file_reads_like_its_classic_series(shared_data, tmp_path):
    values = _crop(shared_data, "CT")
    files = _classic(values, tmp_path / "classic", slopes=SLOPES[: values.shape[0]])
    order = list(np.random.default_rng(5).permutation(len(files)))
    series, enhanced = load_volume(tmp_path / "classic"), load_volume(_enhanced(files, tmp_path / "mf.dcm", order))
    np.testing.assert_allclose(enhanced.affine, series.affine, atol=1e-5)
    np.testing.assert_array_equal(enhanced.data, series.data)


def _broken(values, kind):
    """Positions / orientations (LPS) of slices that make no evenly spaced stack of parallel slices."""
    n = values.shape[0]
    positions = [ORIGIN + k * SPACING[2] * DIRECTION[:, 2] for k in range(n)]
    orientations = [DIRECTION] * n
    keep = list(range(n))
    if kind == "missing slice":
        keep.remove(6)
    elif kind == "two frames at one position":  # e.g. two echoes of one slice
        positions[7] = positions[6]
    elif kind == "not parallel":
        orientations[5] = _rotation(30, -15, 30)
    elif kind == "off the line":
        positions[4] = positions[4] + 5.0 * DIRECTION[:, 0]
    return values[keep], [positions[k] for k in keep], [orientations[k] for k in keep]


@pytest.mark.parametrize("kind, says_enhanced, says_series", [
    ("missing slice", r"not evenly spaced: frames \d+ and \d+ lie 5 mm apart along the slice normal, the others 2\.5",
     r"not evenly spaced: IM0005\.dcm and IM0006\.dcm lie 5 mm apart, the others 2\.5 mm"),
    ("two frames at one position", r"not evenly spaced: frames \d+ and \d+ lie 0 mm apart",
     r"IM000\d\.dcm and IM000\d\.dcm lie at the same position"),
    ("not parallel", r"not parallel: frame 1 has orientation \[.*\], frame \d+ \[",
     r"not parallel: IM0000\.dcm has orientation \[.*\], IM0005\.dcm \["),
    ("off the line", r"do not lie on one line: frame \d+ is 5 mm off",
     r"IM0004\.dcm lies 5 mm beside the line from the first slice to the last"),
])
@pytest.mark.parametrize("layout", ["classic series", "enhanced, shuffled"])
def test_slices_that_make_no_volume_are_refused_naming_the_file(shared_data, tmp_path, layout, kind, says_enhanced,
                                                                says_series):
    values, positions, orientations = _broken(_crop(shared_data, "CT"), kind)
    files = _classic(values, tmp_path / "slices", positions=positions, orientations=orientations)
    if layout == "classic series":
        # a series used to be read with a tilted or shifted slice put on the first slice's plane, silently
        paths, says = (files[0].parent, files[2]), rf"DICOM slices? .*{says_series}"
    else:
        out = _enhanced(files, tmp_path / "enhanced" / "broken.dcm",
                        list(np.random.default_rng(2).permutation(len(files))))
        paths, says = (out, out.parent), rf"the frames of multi-frame DICOM broken\.dcm .*{says_enhanced}"
    for path in paths:
        with pytest.raises(VolumeError, match=rf"{path}: {says}"):
            load_volume(path)


def test_series_split_over_several_multiframe_files_is_refused_naming_them(shared_data, tmp_path):
    values = _crop(shared_data, "CT")
    files = _classic(values, tmp_path / "slices")
    first = _enhanced(files[:7], tmp_path / "split" / "a.dcm")
    second = _enhanced(files[7:], tmp_path / "split" / "b.dcm")
    ds = pydicom.dcmread(second)
    ds.SeriesInstanceUID = pydicom.dcmread(first).SeriesInstanceUID  # one series, written as two instances
    ds.save_as(second)
    for path in (first.parent, first):  # was "cannot reshape array ... the file is corrupt"
        with pytest.raises(VolumeError, match=r"is split over 2 multi-frame files \(a\.dcm, b\.dcm\)"):
            load_volume(path)


def test_gantry_tilted_enhanced_ct_is_sheared_like_its_series(shared_data, tmp_path):
    values = _crop(shared_data, "CT")
    n = values.shape[0]
    positions = [ORIGIN + np.array([0.0, 0.0, 2.5 * k]) for k in range(n)]  # the table moves along z, not the normal
    files = _classic(values, tmp_path / "classic", positions=positions)
    vol = load_volume(_enhanced(files, tmp_path / "mf.dcm", list(range(n))[::-1]))
    series = load_volume(tmp_path / "classic")
    assert is_sheared(vol.affine)
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-4)
    np.testing.assert_allclose(vol.affine @ [0, 0, n - 1, 1], LPS @ [*positions[-1], 1], atol=1e-4)
    np.testing.assert_array_equal(vol.data, series.data)


def test_folder_with_a_series_and_an_enhanced_file_names_both_and_each_file_reads_its_own(shared_data, tmp_path):
    ct = _crop(shared_data, "CT")
    mr = _crop(shared_data, "MR")
    export = tmp_path / "export"
    _classic(ct, export, description="AX CT")
    mr_files = _classic(mr, tmp_path / "mr_slices", modality="MR", description="T2 SAG")
    _enhanced(mr_files, export / "MR_ENH.dcm", list(np.random.default_rng(3).permutation(len(mr_files))), "MR")
    with pytest.raises(VolumeError, match=r"holds 2 DICOM series") as refused:  # listed in UID order
        load_volume(export)
    assert "'AX CT' CT, 14 files, e.g. IM0000.dcm" in str(refused.value)
    assert "'T2 SAG (enhanced conversion)' MR, 1 file, e.g. MR_ENH.dcm" in str(refused.value)
    np.testing.assert_allclose(load_volume(export / "MR_ENH.dcm").data, mr.transpose(2, 1, 0), atol=1e-3)
    np.testing.assert_allclose(load_volume(export / "IM0003.dcm").data, ct.transpose(2, 1, 0), atol=1e-3)


def test_compressed_frames_pydicom_cannot_decode_are_read_by_gdcm_when_one_rescale_holds(shared_data, tmp_path,
                                                                                           monkeypatch):
    values = _crop(shared_data, "CT")
    n = values.shape[0]
    order = list(np.random.default_rng(4).permutation(n))
    uniform = _enhanced(_classic(values, tmp_path / "a"), tmp_path / "uniform.dcm", order)
    per_frame = _enhanced(_classic(values, tmp_path / "b", slopes=SLOPES[:n]), tmp_path / "per_frame.dcm", order)

    def no_decoder(self):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoder))
    vol = load_volume(uniform)
    np.testing.assert_allclose(vol.affine, _truth_affine(), atol=1e-4)
    np.testing.assert_allclose(vol.data, values.transpose(2, 1, 0), atol=1e-3)
    with pytest.raises(VolumeError, match=r"per_frame\.dcm rescales each frame differently"):
        load_volume(per_frame)


def test_predict_writes_the_mask_on_the_grid_of_the_enhanced_input(shared_data, tmp_path):
    from engine.cli import main
    from train_support import tiny_ct_model_and_scan

    ckpt, _ = tiny_ct_model_and_scan(tmp_path / "model", (16, 18, 16), "scan.mha")
    values = _crop(shared_data, "CT")
    files = _classic(values, tmp_path / "slices", slopes=SLOPES[: values.shape[0]])
    scan = _enhanced(files, tmp_path / "CT1" / "scan.dcm", list(np.random.default_rng(6).permutation(len(files))))
    shutil.rmtree(tmp_path / "slices")
    # a file into a named file; the series folder into a folder of outputs (named as the folder, NIfTI)
    for src, dst, written in ((scan, f"{tmp_path}/out/mask.nrrd", tmp_path / "out" / "mask.nrrd"),
                              (scan.parent, f"{tmp_path}/labels/", tmp_path / "labels" / "CT1.nii.gz")):
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(dst),
                     "--device", "cpu", "--quiet"]) == 0
        mask = load_volume(written)
        assert mask.shape == values.transpose(2, 1, 0).shape
        np.testing.assert_allclose(mask.affine, _truth_affine(), atol=1e-4)


def test_a_copied_slice_is_named_as_a_duplicate_not_as_a_gap(shared_data, tmp_path):
    """A new user's report: one slice copied under another name (sorted by GDCM in file-name order once two slices
    share a position) was refused as 'IM00000.dcm and IM00922.dcm lie 38 mm apart ... restore the missing files'."""
    folder = tmp_path / "dup"
    _classic(_crop(shared_data, "CT"), folder)
    first = sorted(folder.glob("*.dcm"))[0]
    shutil.copy(first, folder / f"zz_copy_of_{first.name}")
    with pytest.raises(VolumeError, match=rf"{first.name} and zz_copy_of_{first.name} lie at the same position"):
        load_volume(folder)


def test_a_tilted_series_with_a_missing_slice_is_refused_for_its_gap(shared_data, tmp_path):
    """A reviewer's find: the off-line check placed each slice on the first-to-last line by its index, so a gantry-tilted
    series with one slice missing was refused as 'IM0006.dcm lies 0.335 mm beside the line' instead of for its gap."""
    values = _crop(shared_data, "CT")
    tilt = np.tan(np.radians(15))
    planes = [ORIGIN + k * 2.5 * (DIRECTION[:, 2] + tilt * DIRECTION[:, 1]) for k in range(values.shape[0])]
    keep = [k for k in range(values.shape[0]) if k != 6]
    _classic(values[keep], tmp_path / "s", positions=[planes[k] for k in keep])
    with pytest.raises(VolumeError, match=r"not evenly spaced: IM0005\.dcm and IM0006\.dcm lie 5 mm apart"):
        load_volume(tmp_path / "s")
    _classic(values, tmp_path / "whole", positions=planes)
    assert is_sheared(load_volume(tmp_path / "whole").affine)  # the whole tilted series reads (sheared grid)
