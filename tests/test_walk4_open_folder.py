"""An annotator picks Mamba-HoME in napari's reader question for a folder that is not a DICOM series: napari used to
say only "Reader 'napari-mambahome' ... refused the file". Now the reader says why and what to open instead."""
from __future__ import annotations

import shutil

import pytest

from napari_mambahome._reader import get_reader


def _open(folder):
    return get_reader(str(folder))(str(folder))


def test_a_folder_of_volume_files_points_to_file_open(tmp_path):
    for name in ("a.nii.gz", "b.nrrd", "c.mha", "d.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        _open(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "not a DICOM series folder" in message
    assert "4 volume file(s) (a.nii.gz, b.nrrd, c.mha, ...)" in message and "File > Open File(s)" in message


def test_a_folder_of_series_folders_points_to_one_series(tmp_path):
    series = tmp_path / "patient" / "t1"
    series.mkdir(parents=True)
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"subfolder\(s\) t1/ hold DICOM series: open one of those folders"):
        _open(tmp_path / "patient")


def test_a_folder_of_other_files_says_what_it_lacks(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="holds no volume files .* and no DICOM files$"):
        _open(tmp_path)


def test_napari_shows_the_reason(make_napari_viewer, tmp_path):
    """Through napari's own open path, the message reaches the user (napari wraps the reader's error)."""
    from plugin_support import needs_display

    needs_display()
    viewer = make_napari_viewer()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception) as info:
        viewer.open(str(empty), plugin="napari-mambahome")
    assert "not a DICOM series folder" in str(info.value) and "it is empty" in str(info.value)
    assert len(viewer.layers) == 0
