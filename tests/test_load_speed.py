"""``load_volume`` without wasted full-size passes (napari calls readers on its GUI thread).

What it returns is unchanged: the values, dtype and memory order nibabel's own scaling followed by a float32 cast
give. What it no longer does: make a float64 copy of a scaled integer volume, or look for NaN in integers.
Timings are in BENCHMARKS.md, not asserted here.
"""
from __future__ import annotations

import gzip
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

import engine.io as eio
from engine.formats import guess_modality
from engine.io import VolumeError, check_finite_voxels, load_volume

SHAPE = (48, 40, 30)


def _nifti(path, data, slope=None, inter=None):
    """A NIfTI file holding ``data``; ``slope``/``inter`` written into the header as stored (nibabel would
    otherwise choose its own scaling for integer data)."""
    img = nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0]))
    img.header.set_data_dtype(data.dtype)
    plain = path.with_name(path.name.replace(".gz", ""))
    nib.save(img, plain)
    raw = bytearray(plain.read_bytes())
    if slope is not None:
        raw[112:120] = struct.pack("<ff", slope, inter)  # scl_slope, scl_inter of the NIfTI-1 header
    if path.name.endswith(".gz"):
        plain.unlink()
        with gzip.open(path, "wb") as f:
            f.write(bytes(raw))
    else:
        plain.write_bytes(bytes(raw))
    return path


def _reference(path):
    """What load_volume returned before: nibabel's scaled array (float64 for scaled integers), then float32."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    return guess_modality(data), np.asarray(data, dtype=np.float32)


def _ct(rng):
    data = rng.integers(-1024, 1500, size=SHAPE).astype(np.int16)
    data[:, :8] = -1024  # air: the CT guess needs it
    return data


@pytest.mark.parametrize("name, dtype, slope, inter", [
    ("int16.nii.gz", np.int16, None, None),
    ("scaled.nii.gz", np.int16, 1.0, -1024.0),
    ("fractional.nii.gz", np.int16, 0.37, -1024.5),
    ("scaled_uint16.nii", np.uint16, 2.0, -2048.0),
    ("float32.nii.gz", np.float32, None, None),
    ("float32_scaled.nii.gz", np.float32, 3.0, 1.5),
])
def test_values_dtype_order_and_modality_are_nibabels(tmp_path, monkeypatch, name, dtype, slope, inter):
    monkeypatch.setattr(eio, "_SCALE_BLOCK_VOXELS", 1000)  # many blocks, uneven last one
    rng = np.random.default_rng(0)
    data = _ct(rng) + (1024 if dtype == np.uint16 else 0)
    path = _nifti(tmp_path / name, data.astype(dtype), slope, inter)
    modality, expected = _reference(path)
    vol = load_volume(path)
    assert vol.data.dtype == np.float32 and vol.data.shape == SHAPE
    assert np.array_equal(vol.data.view(np.uint32), expected.view(np.uint32))  # bit for bit
    assert vol.data.flags.f_contiguous == expected.flags.f_contiguous
    assert vol.modality == modality


def test_a_scaled_integer_volume_gets_no_float64_copy(tmp_path, monkeypatch):
    import engine.formats

    monkeypatch.setattr(eio, "_SCALE_BLOCK_VOXELS", 4096)
    # the modality guess's float64 sample (the whole of a small volume) is not what this test measures
    monkeypatch.setattr(engine.formats, "guess_modality", lambda data: None)
    monkeypatch.setattr(engine.formats, "intensity_sample", lambda data: None)
    data = np.tile(_ct(np.random.default_rng(1)), (2, 3, 2))
    path = _nifti(tmp_path / "scaled.nii", data, 1.0, -1024.0)  # .nii: no gzip buffers
    n = data.size
    load_volume(path)  # imports and caches first
    tracemalloc.start()
    try:
        vol = load_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert vol.data.dtype == np.float32
    # the stored int16 and the float32 result (6 bytes a voxel) plus small blocks; nibabel's float64 scaling made
    # 8 bytes a voxel more, twice
    assert peak < (2 + 4 + 4) * n, peak


def test_integer_volumes_skip_the_nan_check_and_float_ones_keep_it(tmp_path, monkeypatch):
    checked = []  # the voxels' finiteness counted (load_volume counts, then refuses or, for viewing, notes)
    real = eio.count_nonfinite
    monkeypatch.setattr(eio, "count_nonfinite", lambda data: checked.append(data.shape) or real(data))
    data = _ct(np.random.default_rng(2))
    load_volume(_nifti(tmp_path / "int.nii.gz", data))
    assert checked == []
    load_volume(_nifti(tmp_path / "scaled.nii.gz", data, 2.0, 0.0))  # scaling can overflow float32
    load_volume(_nifti(tmp_path / "float.nii.gz", data.astype(np.float32)))
    assert len(checked) == 2

    bad = data.astype(np.float32)
    bad[3, 4, 5], bad[10, 0, 0], bad[0, 0, 29] = np.nan, np.inf, -np.inf
    path = _nifti(tmp_path / "bad.nii.gz", bad)
    with pytest.raises(VolumeError, match=rf"{path}: 3 of {bad.size} voxels are NaN or infinite"):
        load_volume(path)


def test_check_finite_voxels_counts_exactly():
    check_finite_voxels(np.arange(10, dtype=np.int64), "ints")
    check_finite_voxels(np.full((4, 5, 6), 60000, np.float16), "big float16")  # the sum overflows, no voxel is inf
    check_finite_voxels(np.full(3, 3e38, np.float32), "big float32")
    a = np.zeros((4, 5, 6), np.float32, order="F")
    a[1, 2, 3] = np.nan
    a[3, 4, 5] = -np.inf
    with pytest.raises(VolumeError, match=r"^x: 2 of 120 voxels are NaN or infinite$"):
        check_finite_voxels(a, "x")
    with pytest.raises(ValueError, match=r"^y: 1 of 3 voxels"):
        check_finite_voxels(np.array([1.0, np.nan, 2.0]), "y", ValueError)
    with pytest.raises(VolumeError, match=r"^z: 1 of 1 voxels"):
        check_finite_voxels(np.float64(np.inf), "z")
