"""Upper- and mixed-case suffixes read and write like lower-case ones, and a killed pair write leaves nothing for long.

Three problems found with the all-or-nothing header + data write (commit 532799c):

1. ITK picks its reader by the suffix in lower case only: ``SEG.MHD`` (which the engine writes when asked to) and a
   Windows/PACS export's ``SCAN.MHA`` were "Unable to determine ImageIO reader"; nibabel opens another name for a
   mixed-case suffix (``scan.Nii.Gz`` -> ``scan.nii.Gz``, ``T1.Mgz``), "No such file or directory".
2. ``save_volume("X.MHA")``: ITK, given a temporary ``.X.tmp-....MHA``, wrote a detached ``.mhd`` + ``.zraw`` pair
   instead; the save failed with "No such file or directory" and left both hidden files behind.
3. A process killed outright during a header + data write leaves its hidden ``.<name>.tmp-XXXXXXXX/`` folder;
   ``remove_stale_temps`` swept stale temporary files only.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.io import (TEMP_FOLDER_PATTERN, OutputExistsError, Volume, WriteError, atomic_write, load_label,
                       load_volume, read_grid, remove_stale_temps, save_volume)

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("nrrd")

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.array([[-0.8, 0.0, 0.0, 12.0], [0.0, -0.9, 0.0, -7.5], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])


def _reference():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) - 100.0
    return Volume(data=data, affine=AFFINE.copy(), spacing=(0.8, 0.9, 2.5), header=None, path=None)


def _labels():
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:4, 2:5, 1:6] = 1
    labels[2, 3, 3] = 2
    return labels


def _files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def _same_volume(vol, data, affine=AFFINE):
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)


# ----------------------------------------------------------------------------- 1. reading any case
# (lower-case suffix the engine writes, the same file named otherwise): every format the engine reads
READ_CASES = [
    (".mha", ".MHA"), (".mha", ".Mha"), (".mhd", ".MHD"), (".mhd", ".Mhd"),
    (".nii.gz", ".NII.GZ"), (".nii.gz", ".Nii.Gz"), (".nii.gz", ".nii.GZ"), (".nii", ".NII"), (".nii", ".Nii"),
    (".mgz", ".MGZ"), (".mgz", ".Mgz"), (".mgh", ".Mgh"),
    (".nrrd", ".NRRD"), (".nrrd", ".Nrrd"), (".nhdr", ".NHDR"), (".nhdr", ".Nhdr"), (".seg.nrrd", ".SEG.NRRD"),
]


@pytest.mark.parametrize("written,named", READ_CASES, ids=[named for _, named in READ_CASES])
def test_a_file_named_in_any_case_reads_like_its_lower_case_twin(tmp_path, written, named):
    ref = _reference()
    labels = _labels()
    save_volume(tmp_path / f"scan{written}", labels, ref)
    os.rename(tmp_path / f"scan{written}", tmp_path / f"SCAN{named}")  # a detached header keeps naming its data file
    vol = load_volume(tmp_path / f"SCAN{named}")
    _same_volume(vol, labels)
    _same_volume(load_label(tmp_path / f"SCAN{named}"), labels)
    shape, affine = read_grid(tmp_path / f"SCAN{named}")
    assert shape == labels.shape
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)


def test_a_mixed_case_nifti2_reads_as_nifti2(tmp_path):
    data = _reference().data
    nib.save(nib.Nifti2Image(data, AFFINE), str(tmp_path / "n2.nii.gz"))
    os.rename(tmp_path / "n2.nii.gz", tmp_path / "N2.Nii.Gz")
    vol = load_volume(tmp_path / "N2.Nii.Gz")
    assert isinstance(vol.header, nib.Nifti2Header)
    _same_volume(vol, data)


def test_a_mixed_case_gzipped_nii_still_gets_the_rename_advice(tmp_path):
    save_volume(tmp_path / "scan.nii.gz", _labels(), _reference())
    os.rename(tmp_path / "scan.nii.gz", tmp_path / "Scan.Nii")
    with pytest.raises(Exception, match=r"gzip-compressed but named Scan\.Nii; rename it to Scan\.Nii\.gz"):
        load_volume(tmp_path / "Scan.Nii")


def test_a_dicom_series_with_upper_case_file_names_reads(tmp_path):
    from tests.test_formats import write_dicom_series

    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.7, 0.7, 2.0))
    folder = write_dicom_series(image, tmp_path / "series", modality="MR")
    for f in folder.iterdir():
        f.rename(f.with_name(f.stem.upper() + ".DCM"))
    for where in (folder, folder / "SLICE000.DCM"):
        vol = load_volume(where)
        np.testing.assert_array_equal(vol.data, sitk.GetArrayFromImage(image).transpose(2, 1, 0))


# ----------------------------------------------------------------------------- 1 and 2. writing any case
WRITE_CASES = [
    ("SEG.MHA", ["SEG.MHA"]), ("Seg.Mha", ["Seg.Mha"]), ("SEG.MHD", ["SEG.MHD", "SEG.zraw"]),
    ("SEG.NHDR", ["SEG.NHDR", "SEG.raw.gz"]), ("SEG.NRRD", ["SEG.NRRD"]), ("SEG.SEG.NRRD", ["SEG.SEG.NRRD"]),
    ("SEG.NII.GZ", ["SEG.NII.GZ"]), ("Seg.Nii.Gz", ["Seg.Nii.Gz"]), ("SEG.NII", ["SEG.NII"]),
    ("SEG.MGZ", ["SEG.MGZ"]), ("Seg.Mgz", ["Seg.Mgz"]),
]


@pytest.mark.parametrize("name,files", WRITE_CASES, ids=[name for name, _ in WRITE_CASES])
def test_save_volume_writes_the_name_asked_for_in_any_case_and_reads_it_back(tmp_path, name, files):
    labels = _labels()
    out = tmp_path / "out"
    assert save_volume(out / name, labels, _reference()) == out / name
    assert _files(out) == files  # nothing else: no hidden temporary file, no .mhd/.zraw for an .MHA
    _same_volume(load_label(out / name), labels)
    head = (out / name).read_bytes()[:2]
    if name.upper().endswith((".GZ", ".MGZ")):
        assert head == b"\x1f\x8b"  # compressed as the suffix says, whatever its case
    # written again over itself, and refused without overwrite
    save_volume(out / name, labels * 2, _reference())
    _same_volume(load_label(out / name), labels * 2)
    with pytest.raises(OutputExistsError):
        save_volume(out / name, labels, _reference(), overwrite=False)
    assert _files(out) == files


def test_an_upper_case_mha_is_one_attached_metaimage(tmp_path):
    save_volume(tmp_path / "X.MHA", _labels(), _reference())
    header = (tmp_path / "X.MHA").read_bytes().split(b"\n")
    assert b"ElementDataFile = LOCAL" in header
    assert _files(tmp_path) == ["X.MHA"]


def test_raw_writer_itself_writes_an_upper_case_mha_as_one_file(tmp_path):
    from engine.formats import raw_writer

    raw_writer(tmp_path / "X.MHA", _labels(), AFFINE)(str(tmp_path / "X.MHA"))
    assert _files(tmp_path) == ["X.MHA"]
    _same_volume(load_label(tmp_path / "X.MHA"), _labels())


def test_a_failed_upper_case_mha_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    save_volume(tmp_path / "X.MHA", _labels(), _reference())
    before = (tmp_path / "X.MHA").read_bytes()

    def full_disk(image, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(WriteError, match="disk is full"):
        save_volume(tmp_path / "X.MHA", _labels() * 2, _reference())
    assert _files(tmp_path) == ["X.MHA"]
    assert (tmp_path / "X.MHA").read_bytes() == before


def _writes_other_names(tmp: str) -> None:
    """A writer that, like ITK given a suffix it does not know, writes a header and a data file of other names."""
    base = tmp[: -len(".mha")]
    Path(base + ".mhd").write_text("ElementDataFile = x.zraw\n")
    Path(base + ".zraw").write_bytes(b"voxels")


def test_a_writer_that_writes_other_names_fails_clearly_and_leaves_nothing(tmp_path):
    (tmp_path / "keep.mhd").write_text("a user's file")
    with pytest.raises(WriteError, match=r"X\.mha.*made no file under the name it was given.*\.mhd.*\.zraw"):
        atomic_write(tmp_path / "X.mha", _writes_other_names)
    assert _files(tmp_path) == ["keep.mhd"]


def test_a_writer_failing_after_writing_other_names_leaves_nothing(tmp_path):
    def fails(tmp: str) -> None:
        _writes_other_names(tmp)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="disk is full"):
        atomic_write(tmp_path / "sub" / "X.mha", fails)
    assert _files(tmp_path) == []  # the folder it made is gone too


# ----------------------------------------------------------------------------- 3. stale temporary folders
def _pair_folder(root: Path, name: str = "seg.mhd", files=("seg.mhd", "seg.zraw"), age_s: float = 0.0) -> Path:
    folder = root / f".{name}.tmp-0123abcd"
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(b"x")
    if age_s:
        old = time.time() - age_s
        for f in files:
            os.utime(folder / f, (old, old))
        os.utime(folder, (old, old))
    return folder


def test_a_pair_write_killed_outright_leaves_a_folder_that_the_sweep_removes(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np
        import engine.formats as formats
        from engine.io import Volume, save_volume

        real = formats._write_itk
        def killed(path, *args):
            real(path, *args)  # both files written in the hidden folder, none moved into place yet
            os.kill(os.getpid(), signal.SIGKILL)
        formats._write_itk = killed
        ref = Volume(data=np.zeros((5, 6, 7), np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0), header=None,
                     path=None)
        save_volume({str(tmp_path / "SEG.MHD")!r}, np.ones((5, 6, 7), np.uint8), ref)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".SEG.MHD.tmp-") and TEMP_FOLDER_PATTERN.match(left.name)
    assert _files(left) == ["SEG.mhd", "SEG.zraw"]
    assert remove_stale_temps(tmp_path, older_than_s=3600) == []  # fresh: possibly a write in progress
    assert remove_stale_temps(tmp_path) == [left]
    assert _files(tmp_path) == []


def test_stale_pair_folders_are_swept_by_age_like_files(tmp_path):
    old = _pair_folder(tmp_path / "a", age_s=7200)
    fresh = _pair_folder(tmp_path / "b")
    nhdr = _pair_folder(tmp_path / "c", "SEG.NHDR", ("SEG.nhdr", "SEG.raw.gz"), age_s=7200)
    for root, folder in ((tmp_path / "a", old), (tmp_path / "c", nhdr)):
        assert remove_stale_temps(root, older_than_s=3600) == [folder]
        assert _files(root) == []
    assert remove_stale_temps(tmp_path / "b", older_than_s=3600) == []
    assert remove_stale_temps(tmp_path / "b") == [fresh]


def test_a_pair_folder_with_a_file_still_being_written_is_kept(tmp_path):
    folder = _pair_folder(tmp_path, age_s=7200)
    (folder / "seg.zraw").write_bytes(b"more")  # the writer is still filling the data file
    assert remove_stale_temps(tmp_path, older_than_s=3600) == []
    assert _files(folder) == ["seg.mhd", "seg.zraw"]


def test_folders_not_of_the_pair_pattern_or_content_are_kept(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.nii.gz").write_bytes(b"data")
    root = tmp_path / "root"
    keep = [
        _pair_folder(root, "seg.nii.gz", ("seg.nii.gz",), age_s=7200),  # not a header + data pair's folder
        _pair_folder(root, "notes.txt", ("notes.txt",), age_s=7200),
    ]
    for name in ("seg.mhd.tmp-0123ABCD", ".seg.mhd.tmp-0123abc", ".seg.mhd.tmp-0123abcd.bak", ".tmp-0123abcd"):
        (root / name).mkdir()
        (root / name / "f").write_bytes(b"x")
        keep.append(root / name)
    with_sub = _pair_folder(root, "a.mhd", ("a.mhd",), age_s=7200)
    (with_sub / "inner").mkdir()  # the pair's writer makes no folders: not ours
    with_link = _pair_folder(root, "b.mhd", ("b.mhd",), age_s=7200)
    (with_link / "b.zraw").symlink_to(outside / "precious.nii.gz")
    link = root / ".c.mhd.tmp-0123abcd"
    link.symlink_to(outside, target_is_directory=True)
    assert remove_stale_temps(root) == []
    for folder in keep + [with_sub, with_link]:
        assert folder.is_dir()
    assert _files(with_sub) == ["a.mhd", "inner"]
    assert link.is_symlink() and _files(outside) == ["precious.nii.gz"]

