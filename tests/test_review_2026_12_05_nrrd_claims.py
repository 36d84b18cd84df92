"""Review of the "claimed size" checks (engine/formats.py, 2026-12-05): legitimate NRRD files they refused.

1. A detached header whose data file name holds a space (``data file: MR head.raw.gz``: what ITK, 3D Slicer and this
   engine's own writer put in a header saved as ``MR head.nhdr``) was refused as "spreads the voxels over several data
   files"; pynrrd reads it. Only ``LIST`` and the ``<format> <min> <max> <step>`` form name several files.
2. A text (``encoding: ascii``) NRRD whose last value has no separator after it (n values in 2n - 1 bytes) was
   refused as truncated."""
from __future__ import annotations

import numpy as np
import pytest

from engine.io import VolumeError, load_label, load_volume, save_volume

GEOMETRY = ["space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,1)", "space origin: (0,0,0)"]


def _ref(shape):
    from engine.io import Volume

    return Volume.from_array(np.zeros(shape, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))


def test_engine_writes_and_reads_back_a_detached_nrrd_named_with_a_space(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    save_volume(tmp_path / "MR head.nhdr", arr, _ref(arr.shape))
    assert np.array_equal(load_volume(tmp_path / "MR head.nhdr").data, arr)


def test_detached_nrrd_whose_data_file_name_has_a_space_reads(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(4, 3, 2)  # z, y, x
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "MR head.nhdr"), True)
    assert "data file: MR head.raw.gz" in (tmp_path / "MR head.nhdr").read_text()
    label = load_label(tmp_path / "MR head.nhdr")
    assert np.array_equal(np.asarray(label.data), arr.transpose(2, 1, 0))


def test_detached_nrrd_with_a_space_written_by_hand_raw(tmp_path):
    arr = np.arange(8, dtype=np.uint8)
    (tmp_path / "my scan.raw").write_bytes(arr.tobytes())
    (tmp_path / "my scan.nhdr").write_text("NRRD0004\n" + "\n".join(["type: unsigned char", "dimension: 3", *GEOMETRY,
                                           "sizes: 2 2 2", "encoding: raw", "data file: my scan.raw"]) + "\n")
    assert np.array_equal(np.asarray(load_volume(tmp_path / "my scan.nhdr").data).ravel(order="F"), arr)


def test_numbered_data_files_are_still_refused(tmp_path):
    (tmp_path / "s.nhdr").write_text("NRRD0004\n" + "\n".join(["type: unsigned char", "dimension: 3", *GEOMETRY,
                                     "sizes: 2 2 2", "encoding: raw", "data file: slice%03d.raw 1 2 1 2"]) + "\n")
    with pytest.raises(VolumeError, match="several data files"):
        load_volume(tmp_path / "s.nhdr")


def test_ascii_nrrd_without_a_separator_after_its_last_value_reads(tmp_path):
    header = "NRRD0004\n" + "\n".join(["type: uint8", "dimension: 3", *GEOMETRY, "sizes: 2 2 2",
                                       "encoding: ascii"]) + "\n\n"
    for name, body in (("spaces.nrrd", "0 1 0 1 0 1 0 1"), ("lines.nrrd", "0\n1\n0\n1\n0\n1\n0\n1")):
        (tmp_path / name).write_bytes((header + body).encode())
        assert np.array_equal(np.asarray(load_label(tmp_path / name).data).ravel(order="F"), [0, 1] * 4)
    # one value short is still a truncated file
    (tmp_path / "short.nrrd").write_bytes((header + "0 1 0 1 0 1 0").encode())
    with pytest.raises(VolumeError):
        load_label(tmp_path / "short.nrrd")
