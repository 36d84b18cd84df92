"""Damaged compressed volumes other than ``.nii.gz`` (whose gzip CRC is checked since tests/test_formats_review.py).

Before:
- a ``.mgz`` with a flipped bit in its voxels, a wrong CRC or no 8-byte gzip trailer was read as sound (the flipped
  bit as a wrong voxel): nibabel stops after the voxels and tags and never reaches the trailer;
- a gzip (or bzip2) NRRD whose stream ended before its end-of-stream marker (no trailer) was read as sound: the
  voxels were all there, their CRC unchecked; a damaged one was refused, in zlib's words only;
- a compressed MetaImage (``.mha``, ``.mhd`` + ``.zraw``) with a flipped bit, a wrong Adler-32 check or no check was
  read as sound, a flipped bit as wrong voxels: ITK prints "Uncompress failed" on stderr and returns what it inflated.

Now each is refused with a message naming the file and saying it is corrupt or truncated; sound files read the same.
"""
from __future__ import annotations

import bz2
import gzip
import zlib

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")

from engine.io import VolumeError, load_volume  # noqa: E402

DATA = (np.arange(20 * 20 * 20, dtype=np.int16) % 500).reshape(20, 20, 20)
RAW = DATA.astype("<i2").tobytes(order="F")


def _refused(path, *needles):
    with pytest.raises(VolumeError) as info:
        load_volume(path)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _flip(blob: bytes, at: int) -> bytes:
    damaged = bytearray(blob)
    damaged[at] ^= 0x04
    return bytes(damaged)


# ----------------------------------------------------------------------------- .mgz
def _mgh_bytes(tmp_path):
    plain = tmp_path / "plain.mgh"
    nib.save(nib.MGHImage(DATA, np.eye(4)), str(plain))
    return plain.read_bytes()


def _mgz(tmp_path, level=6, name="scan.mgz"):
    path = tmp_path / name
    path.write_bytes(gzip.compress(_mgh_bytes(tmp_path), compresslevel=level))
    return path


def test_mgz_with_a_flipped_voxel_bit_is_refused_as_crc_failure(tmp_path):
    path = _mgz(tmp_path, level=0)  # stored: a flipped byte lands in the voxels, not in the deflate codes
    path.write_bytes(_flip(path.read_bytes(), 10 + 5 + 284 + 1000))  # gzip header, block header, MGH header
    _refused(path, "cannot read this .mgz file: it is corrupt: gzip CRC check failed")


def test_mgz_with_a_wrong_crc_field_is_refused(tmp_path):
    path = _mgz(tmp_path)
    path.write_bytes(_flip(path.read_bytes(), -8))
    _refused(path, "gzip CRC check failed")


@pytest.mark.parametrize("name", ["scan.mgz", "Scan.Mgz", "SCAN.MGZ"])
def test_mgz_without_its_gzip_trailer_is_refused_as_truncated(tmp_path, name):
    path = _mgz(tmp_path, name=name)
    path.write_bytes(path.read_bytes()[:-8])
    _refused(path, "truncated", "trailer")


@pytest.mark.parametrize("tail", [b"", bytes(64), b"trailing garbage"], ids=["bare", "zero-padded", "garbage-after"])
def test_sound_mgz_reads_the_same_values(tmp_path, tail):
    path = _mgz(tmp_path)
    path.write_bytes(path.read_bytes() + tail)  # bytes after the member are ignored, as gzip -d ignores them
    np.testing.assert_array_equal(load_volume(path).data, DATA)


def test_mgz_written_by_the_engine_reads_back(tmp_path):
    from engine.io import Volume, save_volume

    path = save_volume(tmp_path / "out.mgz", DATA, Volume.from_array(DATA.astype(np.float32), np.eye(4)))
    np.testing.assert_array_equal(load_volume(path).data, DATA)


# ----------------------------------------------------------------------------- NRRD, gzip and bzip2
def _nrrd(tmp_path, payload: bytes, encoding="gzip", name="scan.nrrd", extra=""):
    header = (f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 20 20 20\nendian: little\nencoding: {encoding}\n"
              f"space: left-posterior-superior\n{extra}\n").encode()
    path = tmp_path / name
    path.write_bytes(header + payload)
    return path


def test_gzip_nrrd_without_its_trailer_is_refused_as_truncated(tmp_path):
    path = _nrrd(tmp_path, gzip.compress(RAW)[:-8])
    _refused(path, "truncated", "8-byte trailer")


def test_bzip2_nrrd_cut_before_its_end_is_refused_as_truncated(tmp_path):
    path = _nrrd(tmp_path, bz2.compress(RAW)[:-4], encoding="bzip2")
    _refused(path, "truncated", "bzip2 stream ends before its end-of-stream marker")


def test_detached_gzip_nrrd_data_without_its_trailer_is_refused(tmp_path):
    (tmp_path / "scan.raw.gz").write_bytes(gzip.compress(RAW)[:-8])
    header = _nrrd(tmp_path, b"", name="scan.nhdr", extra="data file: scan.raw.gz\n")
    _refused(header, "truncated")


def test_gzip_nrrd_with_a_flipped_voxel_bit_is_refused_as_corrupt(tmp_path):
    payload = gzip.compress(RAW, compresslevel=0)
    path = _nrrd(tmp_path, _flip(payload, len(payload) - 8 - 100))
    _refused(path, "cannot read this .nrrd file: it is corrupt: its gzip data is damaged", "incorrect data check")


def test_seg_nrrd_without_its_gzip_trailer_is_refused(tmp_path):
    from engine.io import Volume, save_volume

    labels = np.zeros((12, 10, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    path = save_volume(tmp_path / "seg.seg.nrrd", labels, Volume.from_array(labels.astype(np.float32), np.eye(4)),
                       segments=[{"value": 1, "name": "organ"}])
    np.testing.assert_array_equal(np.asarray(load_volume(path).data), labels)
    path.write_bytes(path.read_bytes()[:-8])
    _refused(path, "truncated")


def test_sound_gzip_and_bzip2_nrrd_read_the_same_values(tmp_path):
    for encoding, payload in (("gzip", gzip.compress(RAW)), ("bzip2", bz2.compress(RAW))):
        np.testing.assert_array_equal(load_volume(_nrrd(tmp_path, payload, encoding)).data, DATA)


def test_gzip_nrrd_upload_without_its_trailer_is_refused_naming_the_upload(tmp_path):
    from engine.server.volumes import volume_from_nrrd_bytes

    body = _nrrd(tmp_path, gzip.compress(RAW)[:-8]).read_bytes()
    with pytest.raises(VolumeError) as info:
        volume_from_nrrd_bytes(body, "scan.nrrd", 10**6)
    message = str(info.value)
    assert message.startswith("scan.nrrd: ") and "truncated" in message and "mambahome-upload" not in message


# ----------------------------------------------------------------------------- compressed MetaImage
def _metaimage_header(size: int, data_file: str) -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = True\n"
            f"CompressedDataSize = {size}\nDimSize = 20 20 20\nElementType = MET_SHORT\n"
            f"ElementDataFile = {data_file}\n").encode()


def _mha(tmp_path, stream: bytes, name="scan.mha"):
    path = tmp_path / name
    path.write_bytes(_metaimage_header(len(stream), "LOCAL") + stream)
    return path


def test_mha_with_a_flipped_voxel_bit_is_refused_as_corrupt(tmp_path):
    stream = zlib.compress(RAW, 0)
    path = _mha(tmp_path, _flip(stream, len(stream) - 4 - 100))
    _refused(path, "cannot read this .mha file: it is corrupt: its compressed voxel data is damaged",
             "incorrect data check")


def test_itk_written_mha_with_a_wrong_adler_check_is_refused(tmp_path):
    path = tmp_path / "itk.mha"
    sitk.WriteImage(sitk.GetImageFromArray(DATA.transpose(2, 1, 0)), str(path), True)
    np.testing.assert_array_equal(load_volume(path).data, DATA)
    path.write_bytes(_flip(path.read_bytes(), -1))
    _refused(path, "corrupt", "incorrect data check")


def test_mha_without_its_adler_check_is_refused_as_truncated(tmp_path):
    path = _mha(tmp_path, zlib.compress(RAW)[:-4])
    _refused(path, "truncated", "Adler-32")


def test_mha_with_gzip_wrapped_data_and_a_wrong_crc_is_refused(tmp_path):
    path = _mha(tmp_path, _flip(gzip.compress(RAW), -8))  # ITK reads a gzip header too
    _refused(path, "corrupt")


def test_mhd_with_a_damaged_zraw_is_refused_naming_the_header(tmp_path):
    stream = zlib.compress(RAW, 0)
    (tmp_path / "scan.zraw").write_bytes(_flip(stream, len(stream) - 4 - 100))
    header = tmp_path / "scan.mhd"
    header.write_bytes(_metaimage_header(len(stream), "scan.zraw"))
    _refused(header, "corrupt", "incorrect data check")


def test_sound_compressed_metaimages_read_the_same_values(tmp_path):
    np.testing.assert_array_equal(load_volume(_mha(tmp_path, zlib.compress(RAW))).data, DATA)
    np.testing.assert_array_equal(load_volume(_mha(tmp_path, gzip.compress(RAW), "gz.mha")).data, DATA)
    (tmp_path / "d.zraw").write_bytes(zlib.compress(RAW))
    (tmp_path / "d.mhd").write_bytes(_metaimage_header(len(zlib.compress(RAW)), "d.zraw"))
    np.testing.assert_array_equal(load_volume(tmp_path / "d.mhd").data, DATA)


def test_real_scan_saved_as_mgz_and_mha_reads_back_and_a_damaged_copy_is_refused(shared_data, tmp_path):
    from engine.io import save_volume

    scan = load_volume(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")
    for name in ("t2.mgz", "t2.mha"):
        path = save_volume(tmp_path / name, scan.data, scan)
        np.testing.assert_array_equal(load_volume(path).data, scan.data)
        blob = path.read_bytes()
        path.write_bytes(blob[:-4] + bytes(b ^ 0xFF for b in blob[-4:]))  # gzip's length, zlib's Adler-32
        _refused(path, "corrupt")
