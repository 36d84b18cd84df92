"""Reviewer-reproduced defects in reading NRRD and NIfTI files.

- A NRRD header with a huge ``line skip`` (``line skip: 100000000`` in a 100-byte file) held a CPU for minutes, a larger
  number for ever: ``engine.formats`` and pynrrd each called ``readline()`` once per skipped line, past the end of the
  file. Such a header is now refused in milliseconds, naming the file, on disk and through the server's upload path;
  a ``byte skip`` past the end of the data likewise.
- A ``.nii.gz`` whose gzip CRC was wrong (a flipped bit in its voxels) or whose 8-byte trailer was missing was read as
  sound: nibabel stops after the voxels and never reaches the trailer. It is now refused as corrupt or truncated.
- A float64 NIfTI with finite values near 1e300 was refused as "8000 of 8000 voxels are NaN or infinite", which the
  file does not hold: they overflow float32. The message now names the float32 range and the file's minimum and
  maximum.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import signal
import time

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("nrrd")

from engine.io import VolumeError, load_volume  # noqa: E402

HUGE = 10**15  # lines a header asks to skip: for ever at one readline() per line


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail (rather than hang the suite, as the old readline() loop did) when the block runs past ``seconds``."""
    def expired(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _nrrd_header(encoding: str, extra: str = "", sizes: str = "2 3 4", dtype: str = "int16") -> bytes:
    return (f"NRRD0004\ntype: {dtype}\ndimension: 3\nsizes: {sizes}\nendian: little\nencoding: {encoding}\n"
            f"space: left-posterior-superior\n{extra}\n").encode()


def _payload(encoding: str, values: np.ndarray) -> bytes:
    raw = np.asarray(values, dtype="<i2").tobytes(order="F")
    if encoding == "gzip":
        return gzip.compress(raw)
    if encoding == "bzip2":
        return bz2.compress(raw)
    if encoding == "ascii":
        return " ".join(str(int(v)) for v in np.asarray(values).ravel(order="F")).encode() + b"\n"
    return raw


VALUES = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5


def _refused_quickly(path, *needles, seconds: float = 2.0) -> str:
    start = time.perf_counter()
    with _deadline(10.0), pytest.raises(VolumeError) as info:
        load_volume(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < seconds, f"refusal took {elapsed:.2f} s"
    assert path.name in message
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------- NRRD line skip / byte skip
@pytest.mark.parametrize("encoding", ["raw", "ascii", "gzip", "bzip2"])
@pytest.mark.parametrize("skip", [100_000_000, HUGE])
def test_nrrd_line_skip_past_the_end_is_refused_in_milliseconds(tmp_path, encoding, skip):
    path = tmp_path / "skip.nrrd"
    path.write_bytes(_nrrd_header(encoding, f"line skip: {skip}\n") + _payload(encoding, VALUES))
    message = _refused_quickly(path, f"line skip: {skip}", "skips more lines than")
    assert "not read" in message


def test_seg_nrrd_line_skip_past_the_end_is_refused_before_slicerio_reads(tmp_path):
    # slicerio reads through pynrrd, whose readline() loop is the same: checked before it is called
    path = tmp_path / "labels.seg.nrrd"
    path.write_bytes(_nrrd_header("raw", f"line skip: {HUGE}\n", dtype="uint8")
                     + np.zeros(24, np.uint8).tobytes())
    _refused_quickly(path, "line skip", "skips more lines than")


def test_detached_nhdr_line_skip_past_the_end_names_the_data_file(tmp_path):
    (tmp_path / "scan.raw").write_bytes(_payload("raw", VALUES))
    path = tmp_path / "scan.nhdr"
    path.write_bytes(_nrrd_header("raw", f"data file: scan.raw\nline skip: {HUGE}\n"))
    _refused_quickly(path, "line skip", "scan.raw")


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_nrrd_byte_skip_past_the_end_is_refused(tmp_path, encoding):
    path = tmp_path / "bskip.nrrd"
    path.write_bytes(_nrrd_header(encoding, "byte skip: 1000000\n") + _payload(encoding, VALUES))
    _refused_quickly(path, "byte skip: 1000000", "past the end")


@pytest.mark.parametrize("encoding", ["raw", "ascii", "gzip", "bzip2"])
def test_nrrd_lines_really_present_are_still_skipped(tmp_path, encoding):
    # what 'line skip' is for: text lines (a comment block, an old header) between the header and the voxels
    path = tmp_path / "lines.nrrd"
    path.write_bytes(_nrrd_header(encoding, "line skip: 3\n") + b"first\n\nthird line\n" + _payload(encoding, VALUES))
    with _deadline(10.0):
        vol = load_volume(path)
    np.testing.assert_array_equal(vol.data, VALUES)


def test_nrrd_skipping_lines_spread_over_several_search_chunks(tmp_path, monkeypatch):
    import engine.formats as formats

    monkeypatch.setattr(formats, "_SKIP_CHUNK_BYTES", 7)  # line ends found across many reads
    path = tmp_path / "lines.nrrd"
    skipped = b"".join(b"x" * (i % 11) + b"\n" for i in range(40))
    path.write_bytes(_nrrd_header("raw", "line skip: 40\n") + skipped + _payload("raw", VALUES))
    np.testing.assert_array_equal(load_volume(path).data, VALUES)
    path.write_bytes(_nrrd_header("raw", "line skip: 41\n") + skipped)
    _refused_quickly(path, "line skip: 41", "(40 lines)")


@pytest.mark.parametrize("extra, tail", [("byte skip: 5\n", b"12345"), ("byte skip: -1\n", b"")])
def test_nrrd_raw_byte_skip_still_reads(tmp_path, extra, tail):
    path = tmp_path / "bytes.nrrd"
    junk = b"" if tail else b"leading junk the -1 skips"
    path.write_bytes(_nrrd_header("raw", "line skip: 1\n" + extra) + b"skip me\n" + tail + junk
                     + _payload("raw", VALUES))
    np.testing.assert_array_equal(load_volume(path).data, VALUES)


@pytest.mark.parametrize("encoding", ["raw", "gzip", "bzip2"])
def test_server_upload_with_huge_line_skip_is_refused_in_milliseconds(encoding):
    # a compressed upload's size is checked as it inflates, after its lines are skipped: that skip took 21 s for
    # line skip 1e8, and for ever beyond
    from engine.server.volumes import volume_from_nrrd_bytes

    body = _nrrd_header(encoding, f"line skip: {HUGE}\n") + _payload(encoding, VALUES)
    start = time.perf_counter()
    with _deadline(10.0), pytest.raises(VolumeError) as info:
        volume_from_nrrd_bytes(body, "scan.nrrd", 10**6)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "scan.nrrd" in message and "line skip" in message and "mambahome-upload" not in message


# ----------------------------------------------------------------------------- .nii.gz integrity
def _nifti_gz(tmp_path, name="scan.nii.gz", level=0):
    """A ``.nii.gz`` stored uncompressed inside its gzip stream (level 0), so a flipped byte lands in the voxels."""
    data = (np.arange(20 * 20 * 20, dtype=np.int16) % 500).reshape(20, 20, 20)
    plain = tmp_path / "scan.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(plain))
    raw = plain.read_bytes()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw, compresslevel=level))
    return path, data, raw


def test_nii_gz_with_a_flipped_voxel_bit_is_refused_as_crc_failure(tmp_path):
    path, _, raw = _nifti_gz(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) - 8 - 100] ^= 0x04  # a voxel byte near the end of the (stored) data
    path.write_bytes(bytes(blob))
    message = _refused_quickly(path, "corrupt: gzip CRC check failed")
    assert "cannot read NIfTI" in message


def test_nii_gz_with_a_wrong_crc_field_is_refused(tmp_path):
    path, _, _ = _nifti_gz(tmp_path, level=6)
    blob = bytearray(path.read_bytes())
    blob[-8] ^= 0xFF
    path.write_bytes(bytes(blob))
    _refused_quickly(path, "gzip CRC check failed")


def test_nii_gz_without_its_gzip_trailer_is_refused_as_truncated(tmp_path):
    path, _, _ = _nifti_gz(tmp_path, level=6)
    path.write_bytes(path.read_bytes()[:-8])
    _refused_quickly(path, "truncated", "trailer")


@pytest.mark.parametrize("tail", [bytes(64), b"trailing garbage"])
def test_nii_gz_sound_stream_with_bytes_after_it_still_reads(tmp_path, tail):
    # zero padding and bytes after the member are ignored, as gzip -d ignores them; the member's CRC was checked
    path, data, _ = _nifti_gz(tmp_path, level=6)
    path.write_bytes(path.read_bytes() + tail)
    np.testing.assert_array_equal(load_volume(path).data, data)


def test_mixed_case_nii_gz_damage_is_refused_too(tmp_path):
    path, _, _ = _nifti_gz(tmp_path, name="Scan.Nii.Gz", level=6)
    path.write_bytes(path.read_bytes()[:-8])
    _refused_quickly(path, "truncated")


def test_sound_nii_gz_reads_the_same_values(tmp_path):
    path, data, _ = _nifti_gz(tmp_path, level=6)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.data, data)
    assert type(vol.data) is np.ndarray  # read into memory, not a memory map of the compressed file


def test_nii_gz_crc_failure_through_server_upload(tmp_path):
    from engine.server.volumes import volume_from_nifti_bytes

    path, _, _ = _nifti_gz(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) - 8 - 100] ^= 0x04
    with pytest.raises(VolumeError) as info:
        volume_from_nifti_bytes(bytes(blob), "scan.nii.gz", 10**6)
    assert "scan.nii.gz" in str(info.value) and "gzip CRC check failed" in str(info.value)


# ----------------------------------------------------------------------------- beyond float32
def test_float64_nifti_beyond_float32_range_says_so_not_nan(tmp_path):
    data = np.full((20, 20, 20), 1e300)
    data[0, 0, 0] = -3e299
    path = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(VolumeError) as info:
        load_volume(path)
    message = str(info.value)
    assert "huge.nii.gz" in message and "outside the float32 range" in message
    assert "-3e+299" in message and "1e+300" in message
    assert "NaN" not in message


def test_scaled_nifti_beyond_float32_range_says_so(tmp_path):
    img = nib.Nifti1Image(np.full((20, 20, 20), 30000, np.int16), np.eye(4))
    img.header.set_slope_inter(1e38, 0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(VolumeError, match="outside the float32 range.*3e\\+42.*scl_slope"):
        load_volume(path)


def test_float64_nifti_with_real_nan_still_says_nan(tmp_path):
    data = np.zeros((20, 20, 20))
    data[1, 2, 3] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(VolumeError, match="1 of 8000 voxels are NaN or infinite"):
        load_volume(path)
