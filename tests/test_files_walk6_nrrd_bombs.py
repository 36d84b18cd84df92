"""Compressed NRRD voxel data read from disk is inflated no further than its header declares (files walk 6).

pynrrd inflates a whole gzip or bzip2 payload into memory before it compares its size with the header: a 100 KB gzip
``.nrrd`` declaring 4x4x4 voxels took 100 MB (1100x the file passes the deflate-ratio check), and a 200-byte bzip2
one as much as its maker liked. The server already refused such uploads (tests/test_walk_server_bombs.py); a file
opened in napari or given to ``predict`` now is refused the same way, naming the file, with a megabyte or so read.
"""
from __future__ import annotations

import bz2
import tracemalloc
import zlib

import numpy as np
import pytest

nrrd = pytest.importorskip("nrrd")

from engine.io import VolumeError, load_label, load_volume  # noqa: E402

ZEROS = 64 << 20  # inflated bytes of the bombs: 64 MiB, for 256 declared


def _compressed(encoding: str, zeros: int, head: bytes = b"") -> bytes:
    """``head`` then ``zeros`` zero bytes, compressed without holding the zeros at once."""
    co = bz2.BZ2Compressor(9) if encoding == "bzip2" else zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [co.compress(head)]
    chunk = bytes(1 << 20)
    for left in range(zeros, 0, -len(chunk)):
        parts.append(co.compress(chunk[:min(left, len(chunk))]))
    parts.append(co.flush())
    return b"".join(parts)


def _header(encoding: str, extra: str = "") -> bytes:
    return (f"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nendian: little\nencoding: {encoding}\n"
            f"space: left-posterior-superior\n{extra}\n").encode()


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd"])
@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_payload_inflating_past_its_declared_size_is_refused_before_it_inflates(tmp_path, encoding, suffix):
    path = tmp_path / f"bomb{suffix}"
    path.write_bytes(_header(encoding) + _compressed(encoding, ZEROS))
    caught = []

    def read():
        with pytest.raises(VolumeError) as info:
            load_volume(path)
        caught.append(str(info.value))

    peak = _peak_while(read)
    assert caught[0].startswith(f"{path}: its {encoding} voxel data inflates past ")
    assert "more than its header declares" in caught[0]
    assert peak < 8 << 20, f"{peak} bytes allocated for 256 declared"


def test_a_detached_data_file_is_bounded_too(tmp_path):
    (tmp_path / "scan.raw.gz").write_bytes(_compressed("gzip", ZEROS))
    path = tmp_path / "scan.nhdr"
    path.write_bytes(_header("gzip", "data file: scan.raw.gz\n"))
    with pytest.raises(VolumeError, match=r"scan\.nhdr: its gzip voxel data inflates past"):
        load_label(path)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
@pytest.mark.parametrize("endian", ["little", "big"])
def test_real_compressed_files_read_as_pynrrd_reads_them(tmp_path, encoding, endian):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 3000, (9, 7, 5)).astype(np.int16)
    path = tmp_path / "ct.nrrd"
    nrrd.write(str(path), data, {"encoding": encoding, "endian": endian, "space": "left-posterior-superior",
                                 "space directions": np.diag([0.7, 0.8, 2.5]), "space origin": [1.0, 2.0, 3.0]},
               index_order="F")
    vol = load_volume(path)
    expected, _ = nrrd.read(str(path), index_order="F")
    np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 2.5))
    detached = tmp_path / "ct.nhdr"
    nrrd.write(str(detached), data, {"encoding": encoding, "endian": endian}, detached_header=True, index_order="F")
    np.testing.assert_array_equal(load_volume(detached).data, expected.astype(np.float32))


def test_byte_skip_is_followed_as_pynrrd_follows_it(tmp_path):
    """``byte skip: -1`` keeps the voxels at the end of the inflated stream; a positive one is skipped (pynrrd) in the
    compressed bytes and again in the inflated ones."""
    data = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    voxels = data.T.tobytes()  # NRRD's fastest axis first
    tail = tmp_path / "tail.nrrd"
    tail.write_bytes(_header("gzip", "byte skip: -1\n") + _compressed("gzip", 0, b"leading junk" + voxels))
    skip = tmp_path / "skip.nrrd"
    skip.write_bytes(_header("gzip", "byte skip: 3\n") + b"xyz" + _compressed("gzip", 0, b"abc" + voxels))
    for path in (tail, skip):
        expected, _ = nrrd.read(str(path), index_order="F")
        np.testing.assert_array_equal(expected, data)
        np.testing.assert_array_equal(load_volume(path).data, data)


def test_a_truncated_payload_is_named_with_both_sizes(tmp_path):
    data = np.random.default_rng(1).normal(size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / "cut.nrrd"
    nrrd.write(str(path), data, {"encoding": "gzip", "endian": "little"}, index_order="F")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(VolumeError, match=r"cut\.nrrd: cannot read this \.nrrd file: its gzip voxel data inflates "
                                          r"to \d+ bytes but its header declares 480 .*truncated"):
        load_volume(path)
