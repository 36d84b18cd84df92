"""A DICOM series read whole or refused: a missing slice (uneven positions) or a corrupt/truncated slice
file, which GDCM silently leaves out of the series, used to give a volume with fewer slices spread evenly
over the scan (every slice after the gap misplaced, no warning); and empty files got 'StopIteration: no
detail' or ITK's 'Unable to determine ImageIO reader'."""
from __future__ import annotations

import numpy as np
import pytest

from engine.io import VolumeError, load_volume

sitk = pytest.importorskip("SimpleITK")

from tests.test_formats import write_dicom_series  # noqa: E402


def _series(tmp_path, name="series"):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-100, 100, size=(12, 16, 14)).astype(np.int16))  # (k, j, i)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-10.0, 5.0, 30.0))
    return image, write_dicom_series(image, tmp_path / name, modality="MR")


def test_complete_series_still_reads(tmp_path):
    image, folder = _series(tmp_path)
    vol = load_volume(folder)
    assert vol.shape == (14, 16, 12)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.5), atol=1e-6)


def test_series_with_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    _, folder = _series(tmp_path)
    (folder / "slice005.dcm").unlink()
    with pytest.raises(VolumeError, match=r"not evenly spaced.*slice00[46]\.dcm.*slice00[46]\.dcm.*5 mm"):
        load_volume(folder)
    with pytest.raises(VolumeError, match="not evenly spaced"):
        load_volume(folder / "slice000.dcm")  # one file of the series names the same series


def test_series_with_a_truncated_slice_is_refused_naming_the_file(tmp_path):
    _, folder = _series(tmp_path)
    bad = folder / "slice007.dcm"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(VolumeError, match=r"slice007\.dcm.*corrupt, truncated or empty"):
        load_volume(folder)


def test_non_dicom_files_beside_a_series_are_ignored(tmp_path):
    _, folder = _series(tmp_path)
    (folder / "notes.txt").write_text("scanned on Tuesday")
    assert load_volume(folder).shape == (14, 16, 12)


@pytest.mark.parametrize("name", ["scan.nrrd", "scan.mha", "scan.mhd", "scan.mgz"])
def test_empty_file_says_empty(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(VolumeError, match=rf"{name}: is an empty file \(0 bytes\)"):
        load_volume(tmp_path / name)


def test_a_dicomdir_beside_the_series_is_not_taken_for_a_broken_slice(tmp_path):
    # an export from a PACS or a CD puts a DICOMDIR index (DICOM magic, no image) beside the slices
    _, folder = _series(tmp_path)
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64)
    assert load_volume(folder).shape == (14, 16, 12)


def test_a_dicom_folder_is_told_by_suffix_or_by_the_dicm_magic(tmp_path):
    from engine.formats import is_dicom_folder

    magic = b"\0" * 128 + b"DICM" + b"\0" * 16
    named, bare, other = (tmp_path / n for n in ("named", "bare", "other"))
    for folder in (named, bare, other):
        folder.mkdir()
    (named / "IM0001.DCM").write_bytes(b"not read: the suffix says it")
    (bare / "IM0001").write_bytes(magic)  # a PACS export: no suffix, the part-10 magic at byte 128
    (other / "notes.txt").write_bytes(b"x" * 200)
    (other / "IM0001").write_bytes(b"\0" * 128 + b"NOPE")
    assert is_dicom_folder(named) and is_dicom_folder(bare) and not is_dicom_folder(other)
    assert not is_dicom_folder(named / "IM0001.DCM") and not is_dicom_folder(tmp_path / "missing")
    # only the first ``probe`` files (sorted) are looked at, so a large folder is judged quickly
    (other / "zz").write_bytes(magic)
    assert is_dicom_folder(other) and not is_dicom_folder(other, probe=2)
