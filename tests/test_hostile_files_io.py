"""Hostile and broken files handed to :func:`engine.io.load_volume` / :func:`engine.io.load_label`: each is refused with
an error naming the file and what is wrong, and nothing big is allocated (tracemalloc sees numpy's buffers).

Found by this hunt: a NIfTI header claiming a gigantic size over a tiny body went to nibabel/numpy as is (an
allocation of the claimed size: under a 3 GiB address-space cap, "cannot read NIfTI file (MemoryError: )", which
names no size; a 2000^3 int16 claim is 15 GiB that an overcommitting computer hands out before the read fails); a
gzip NRRD whose header lied was inflated whole by pynrrd before its size was compared (a 1 MiB "bomb" took 2 GiB and
28 s); a detached NRRD header's ``data file: ../../etc/passwd`` (or ``/dev/zero``) was
opened and read; a NaN in a NRRD's space directions was called "2 spatial axes"."""
from __future__ import annotations

import gzip
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("nrrd")

from engine import formats  # noqa: E402
from engine.io import VolumeError, load_label, load_volume, read_grid, save_volume  # noqa: E402

BIG = 32 << 20  # no refusal may allocate more than this


def _refused(path: Path, *phrases: str, loader=load_volume) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(VolumeError) as err:
            loader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert peak < BIG, f"{path.name}: {peak} bytes allocated to refuse it"
    return message


def _nifti(path: Path, shape, body: bytes, dtype=np.int16, gz: bool = False, two: bool = False, **forms) -> Path:
    header = (nib.Nifti2Header if two else nib.Nifti1Header)()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    for key, value in forms.items():
        header[key] = value
    blob = header.binaryblock + b"\0" * (4 if not two else 4) + body
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def _nrrd(path: Path, fields, body: bytes = b"") -> Path:
    path.write_bytes(("NRRD0004\n" + "".join(f"{f}\n" for f in fields) + "\n").encode() + body)
    return path


GEOMETRY = ["space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,1)", "space origin: (0,0,0)"]


# ----------------------------------------------------------------------------- sizes a header cannot hold
@pytest.mark.parametrize("gz", [False, True])
def test_nifti_header_claiming_a_gigantic_size_over_a_tiny_body(tmp_path, gz):
    path = _nifti(tmp_path / f"giant.nii{'.gz' if gz else ''}", (32767, 32767, 32767), b"\0" * 64, gz=gz)
    message = _refused(path, "(32767, 32767, 32767)")
    assert ("gzip-compressed data cannot hold" if gz else "is truncated or its header is wrong") in message


def test_nifti2_header_claiming_100000_cubed(tmp_path):
    path = _nifti(tmp_path / "giant2.nii", (100000, 100000, 100000), b"\0" * 64, two=True)
    _refused(path, "(100000, 100000, 100000)")


def test_nrrd_header_claiming_100000_cubed_raw_gzip_and_seg(tmp_path):
    fields = ["type: short", "dimension: 3", *GEOMETRY, "sizes: 100000 100000 100000", "endian: little"]
    _refused(_nrrd(tmp_path / "giant.nrrd", fields + ["encoding: raw"], b"\0" * 64), "the file holds only 64 bytes")
    _refused(_nrrd(tmp_path / "giant_gz.nrrd", fields + ["encoding: gzip"], gzip.compress(b"\0" * 64)),
             "gzip-compressed data cannot hold")
    seg = fields + ["encoding: gzip", "Segment0_ID:a", "Segment0_LabelValue:1", "Segment0_Layer:0", "Segment0_Name:a"]
    _refused(_nrrd(tmp_path / "giant.seg.nrrd", seg, gzip.compress(b"\0" * 64)), "(100000, 100000, 100000)",
             loader=load_label)


def test_gzip_bomb_is_refused_before_anything_is_inflated(tmp_path):
    """8 GiB claimed by 16 KiB of gzip (16 MiB of zeros): before, pynrrd inflated the whole body before comparing."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = co.compress(b"\0" * (16 << 20)) + co.flush()
    fields = ["type: unsigned char", "dimension: 3", *GEOMETRY, "sizes: 2048 2048 2048", "encoding: gzip"]
    _refused(_nrrd(tmp_path / "bomb.nrrd", fields, bomb), "(2048, 2048, 2048)", "8.0 GiB", "nothing was decompressed")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((2048, 2048, 2048))
    with gzip.open(tmp_path / "bomb.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * (16 << 20))
    _refused(tmp_path / "bomb.nii.gz", "(2048, 2048, 2048)", "nothing was decompressed")


def test_a_size_beyond_this_computers_memory_is_refused_unread(tmp_path, monkeypatch):
    """A true header (a consistent file) larger than the memory: refused naming both sizes, nothing read."""
    image = np.zeros((64, 64, 64), np.int16)
    ref = _ref(image.shape)
    save_volume(tmp_path / "ok.nii.gz", image, ref)
    save_volume(tmp_path / "ok.nrrd", image, ref)
    monkeypatch.setattr(formats, "total_memory_bytes", lambda: 1 << 19)
    for name in ("ok.nii.gz", "ok.nrrd"):
        _refused(tmp_path / name, "more than this computer's memory (524288 bytes)", "nothing was read")


def _ref(shape):
    from engine.io import Volume

    return Volume.from_array(np.zeros(shape, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))


# ----------------------------------------------------------------------------- truncated files
def test_truncated_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 1000, (40, 40, 40)).astype(np.int16)
    for name in ("ok.nii.gz", "ok.nii", "ok.nrrd"):
        save_volume(tmp_path / name, arr, _ref(arr.shape))
        blob = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(blob[: len(blob) // 2])
    _refused(tmp_path / "cut_ok.nii.gz", "truncated")
    _refused(tmp_path / "cut_ok.nii", "is truncated or its header is wrong", "128000 bytes")
    _refused(tmp_path / "cut_ok.nrrd", "truncated")


# ----------------------------------------------------------------------------- detached data outside the folder
@pytest.mark.parametrize("data_file, phrase", [
    ("../../etc/passwd", "outside the header's folder"),
    ("/etc/passwd", "outside the header's folder"),
    ("/dev/zero", "outside the header's folder"),
    ("sub/../../secret.raw", "outside the header's folder"),
    ("../../etc/pass%c 1 1 1", "several data files"),
    ("missing.raw", "missing or not a regular file"),
])
def test_detached_nrrd_data_file_outside_its_folder_is_not_read(tmp_path, data_file, phrase):
    (tmp_path / "secret.raw").write_bytes(b"\1" * 8)  # what the header would make us read as voxels
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    header = folder / "evil.nhdr"
    header.write_text("NRRD0004\n" + "\n".join(["type: unsigned char", "dimension: 3", *GEOMETRY, "sizes: 2 2 2",
                                                "encoding: raw", f"data file: {data_file}"]) + "\n")
    _refused(header, phrase)


def test_detached_nrrd_with_its_data_beside_or_below_it_still_reads(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    save_volume(tmp_path / "vol.nhdr", arr, _ref(arr.shape))
    assert np.array_equal(load_volume(tmp_path / "vol.nhdr").data, arr)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "v.raw").write_bytes(arr.astype("<i2").tobytes(order="F"))
    (tmp_path / "sub.nhdr").write_text("NRRD0004\n" + "\n".join(["type: short", "dimension: 3", *GEOMETRY,
                                       "sizes: 2 3 4", "endian: little", "encoding: raw",
                                       "data file: data/v.raw"]) + "\n")
    assert np.array_equal(load_volume(tmp_path / "sub.nhdr").data, arr)


# ----------------------------------------------------------------------------- values and geometry
def test_nan_and_inf_voxels(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3], data[4, 4, 4] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    _refused(tmp_path / "nan.nii.gz", "2 of 512 voxels are NaN or infinite")
    _nrrd(tmp_path / "nan.nrrd", ["type: float", "dimension: 3", *GEOMETRY, "sizes: 2 2 2", "endian: little",
                                  "encoding: raw"], np.array([0, np.nan, np.inf, 1, 1, 1, 1, -np.inf], "<f4").tobytes())
    _refused(tmp_path / "nan.nrrd", "3 of 8 voxels are NaN or infinite")


def test_4d_and_2d_files(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    _refused(tmp_path / "4d.nii.gz", "is 4D", "expected one 3D volume")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "2d.nii.gz"))
    _refused(tmp_path / "2d.nii.gz", "is 2D", "one slice of a scan", "DICOM series folder")
    with pytest.raises(VolumeError, match="DICOM series folder"):
        read_grid(tmp_path / "2d.nii.gz")
    _nrrd(tmp_path / "4d.nrrd", ["type: short", "dimension: 4", "space: left-posterior-superior",
                                 "kinds: list domain domain domain", "space directions: none (1,0,0) (0,1,0) (0,0,1)",
                                 "space origin: (0,0,0)", "sizes: 3 2 2 2", "endian: little", "encoding: raw"],
          b"\0" * 48)
    _refused(tmp_path / "4d.nrrd", "non-spatial axes", "expected one 3D volume")
    _nrrd(tmp_path / "2d.nrrd", ["type: short", "dimension: 2", "sizes: 4 4", "endian: little", "encoding: raw"],
          b"\0" * 32)
    _refused(tmp_path / "2d.nrrd", "expected a 3D volume", "one slice of a scan")
    sitk = pytest.importorskip("SimpleITK")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5), np.float32)), str(tmp_path / "2d.mha"))
    _refused(tmp_path / "2d.mha", "is 2D", "one slice of a scan")


def test_zero_negative_and_non_finite_spacing(tmp_path):
    zero = np.zeros(512, np.int16).tobytes()
    _refused(_nifti(tmp_path / "zero.nii", (8, 8, 8), zero, pixdim=[1, 1, 0, 1, 1, 1, 1, 1]), "must be finite and > 0")
    _refused(_nifti(tmp_path / "neg.nii", (8, 8, 8), zero, pixdim=[1, 1, -2, 1, 1, 1, 1, 1]), "must be finite and > 0")
    flat = np.diag([1.0, 0.0, 1.0, 1.0])
    _refused(_nifti(tmp_path / "flat_sform.nii", (8, 8, 8), zero, sform_code=1, srow_x=flat[0], srow_y=flat[1],
                    srow_z=flat[2]), "has a zero axis")
    nan = _nifti(tmp_path / "nan_sform.nii", (8, 8, 8), zero, sform_code=2, srow_x=[np.nan, 0, 0, 0],
                 srow_y=[0, 1, 0, 0], srow_z=[0, 0, 1, 0])
    _refused(nan, "not a finite 4x4 matrix")
    base = ["type: short", "dimension: 3", "space: left-posterior-superior", "space origin: (0,0,0)", "sizes: 2 2 2",
            "endian: little", "encoding: raw"]
    _refused(_nrrd(tmp_path / "zero.nrrd", base + ["space directions: (1,0,0) (0,0,0) (0,0,1)"], b"\0" * 16),
             "has a zero axis")
    _refused(_nrrd(tmp_path / "nan_dir.nrrd", base + ["space directions: (1,0,0) (0,nan,0) (0,0,1)"], b"\0" * 16),
             "'space directions' for axis 1", "not finite")
    _refused(_nrrd(tmp_path / "zero_spacings.nrrd", ["type: short", "dimension: 3", "spacings: 1 0 1", "sizes: 2 2 2",
                                                      "endian: little", "encoding: raw"], b"\0" * 16), "zero axis")


def test_singular_direction_is_refused_and_a_sheared_one_is_placed_as_written(tmp_path):
    """Axes that are not independent cannot place voxels: refused. A non-orthogonal (sheared) grid, e.g. a CT with
    gantry tilt, is a real geometry: read with its exact affine (a NIfTI one with a note on how ITK tools differ)."""
    zero = np.zeros(512, np.int16).tobytes()
    singular = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    _refused(_nifti(tmp_path / "singular.nii", (8, 8, 8), zero, sform_code=2, srow_x=singular[0],
                    srow_y=singular[1], srow_z=singular[2]), "singular")
    base = ["type: short", "dimension: 3", "space: left-posterior-superior", "space origin: (0,0,0)", "sizes: 2 2 2",
            "endian: little", "encoding: raw"]
    _refused(_nrrd(tmp_path / "singular.nrrd", base + ["space directions: (1,0,0) (1,0,0) (0,0,1)"], b"\0" * 16),
             "singular")
    sheared = _nifti(tmp_path / "sheared.nii", (8, 8, 8), zero, sform_code=2, srow_x=[1, 0.5, 0, 0],
                     srow_y=[0, 1, 0, 0], srow_z=[0, 0, 1, 0])
    vol = load_volume(sheared)
    assert np.allclose(vol.affine[0, :3], [1, 0.5, 0]) and any("sheared" in n for n in vol.notes)
    vol = load_volume(_nrrd(tmp_path / "sheared.nrrd", base + ["space directions: (1,0,0) (0.5,1,0) (0,0,1)"],
                            b"\0" * 16))
    assert np.allclose(vol.affine[:3, 1], [-0.5, -1, 0])  # LPS -> RAS
