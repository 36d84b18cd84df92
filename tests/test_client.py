"""The pure-Python client package: wire format, geometry, errors, and that it never needs torch."""
from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mambahome_client import (Client, PackError, PayloadTooLargeError, ServerUnavailableError, pack_array,
                              unpack_array)
from mambahome_client.geometry import (affine_from_nrrd_header, clip_voxels, ijk_to_kji, kji_to_ijk,
                                       world_to_voxel)
from mambahome_client.wire import (MAX_HEADER_BYTES, PackReceiver, bbox_from_json, bbox_to_json, body_size,
                                   class_colors, pack_parts, read_pack_header)
from server_support import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64, bool])
def test_pack_round_trip_keeps_values_dtype_and_meta(dtype, level):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(7, 5, 3)) * 100).astype(dtype)
    packed = pack_array(a, {"affine": np.eye(4).tolist(), "name": "x"}, level=level)
    out, meta = unpack_array(packed)
    assert meta["codec"] == ("raw" if level == 0 else "zlib")
    assert out.dtype == a.dtype and out.shape == a.shape and np.array_equal(out, a)
    assert meta["name"] == "x" and meta["affine"][3] == [0, 0, 0, 1]


def test_pack_of_a_non_contiguous_big_endian_view():
    a = np.arange(60, dtype=">i4").reshape(3, 4, 5).transpose(2, 1, 0)
    out, _ = unpack_array(pack_array(a))
    assert np.array_equal(out, a) and out.dtype == np.dtype("<i4")


def test_bad_packs_are_refused_clearly():
    good = pack_array(np.ones((10, 10, 10), np.float32))
    with pytest.raises(PackError, match="magic"):
        unpack_array(b"PK\x03\x04" + good[4:])
    with pytest.raises(PackError, match="truncated"):
        unpack_array(good[:10])
    with pytest.raises(PackError, match="holds"):
        unpack_array(good[:-5])
    with pytest.raises(PackError, match="larger than the limit"):  # checked before decompressing
        unpack_array(good, max_bytes=100)
    raw = pack_array(np.ones((10, 10, 10), np.float32), level=0)
    with pytest.raises(PackError, match="holds 3996 bytes"):
        unpack_array(raw[:-4])
    with pytest.raises(PackError, match="unknown pack codec"):
        unpack_array(raw.replace(b'"codec": "raw"', b'"codec": "lz4"'))
    with pytest.raises(PackError, match="cannot pack dtype"):
        pack_array(np.array([object()] * 3))
    header, start = read_pack_header(good)
    bomb = good[:start] + zlib.compress(b"\0" * 10_000)  # same header, payload of the wrong length
    with pytest.raises(PackError, match="expected 4000"):
        unpack_array(bomb)
    # A pack may not smuggle an object dtype in its header.
    evil = pack_array(np.ones(3, np.uint8)).replace(b'"|u1"', b'"|O" ')
    with pytest.raises(PackError):
        unpack_array(evil)


def feed_in_pieces(body: bytes, piece: int, **kw) -> tuple:
    r = PackReceiver(**kw)
    for i in range(0, len(body), piece):
        r.feed(body[i:i + piece])
    return r.finish()


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("piece", [1, 7, 4096, 10 ** 7])
def test_pack_receiver_decodes_a_pack_arriving_in_pieces(level, piece):
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(9, 11, 13)).astype(np.int16)
    body = pack_array(arr, {"affine": np.eye(4).tolist(), "name": "ct"}, level=level)
    out, meta = feed_in_pieces(body, piece, max_bytes=arr.nbytes, total=len(body))
    assert out.dtype == arr.dtype and np.array_equal(out, arr)
    assert meta["name"] == "ct" and meta["affine"] == np.eye(4).tolist()
    if level == 0:  # written into its own aligned, writable array, not a view of the body
        assert out.flags.writeable and out.flags.aligned and out.flags.c_contiguous


def test_pack_receiver_refuses_bad_bodies_before_allocating():
    arr = np.ones((10, 10, 10), np.float32)
    raw = pack_array(arr, level=0)
    with pytest.raises(PackError, match="larger than the limit"):  # from the header alone
        PackReceiver(max_bytes=100).feed(raw[:200])
    with pytest.raises(PackError, match=f"the body is {len(raw) + 5} bytes"):  # Content-Length disagrees
        PackReceiver(total=len(raw) + 5).feed(raw[:200])
    with pytest.raises(PackError, match="longer than"):
        feed_in_pieces(raw + b"xxxx", 1000)
    with pytest.raises(PackError, match="holds 3996 bytes"):
        feed_in_pieces(raw[:-4], 1000)
    with pytest.raises(PackError, match="cut off"):
        feed_in_pieces(raw[:20], 5)
    with pytest.raises(PackError, match="magic"):
        feed_in_pieces(b"PK\x03\x04" + raw[4:], 100)
    with pytest.raises(PackError, match="header of"):
        PackReceiver().feed(b"MHPK" + (MAX_HEADER_BYTES + 1).to_bytes(4, "little"))
    with pytest.raises(PackError, match="expected 4000"):
        feed_in_pieces(pack_array(arr)[:-30], 100)


def test_pack_parts_send_the_array_without_a_copy():
    arr = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    parts = pack_parts(arr, {"name": "x"}, level=0)
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.int16), arr)
    assert b"".join(parts) == pack_array(arr, {"name": "x"}, level=0) and body_size(parts) == len(b"".join(parts))


def test_a_connected_client_refuses_an_upload_over_the_server_limit_without_sending():
    c = Client(f"http://127.0.0.1:{free_port()}", timeout=2)  # nothing listens: sending would be unreachable
    c.server_info = {"limits": {"max_upload_bytes": 1000}}
    with pytest.raises(PayloadTooLargeError, match="ct: .* over the server's upload limit of 1000 bytes") as exc:
        c.create_session(np.zeros((20, 20, 20), np.int16), np.eye(4), name="ct")
    assert exc.value.status == 413


def test_bbox_and_colors():
    box = (slice(1, 4), slice(0, 2), slice(5, 9))
    assert bbox_from_json(bbox_to_json(box)) == box
    with pytest.raises(PackError):
        bbox_from_json([[0, 1]])
    cols = class_colors(["background", "a", "b"])
    assert len(cols) == 3 and cols[0] == (0.0, 0.0, 0.0) and cols[1] != cols[2]
    assert class_colors(["bg", "a"], [[0, 0, 0], [1, 0, 0]])[1] == (1.0, 0.0, 0.0)


def test_slicer_axis_order_and_world_coordinates():
    a = np.arange(24).reshape(2, 3, 4)  # (I, J, K)
    kji = ijk_to_kji(a)
    assert kji.shape == (4, 3, 2) and kji[3, 2, 1] == a[1, 2, 3]
    assert np.array_equal(kji_to_ijk(kji), a)
    affine = np.array([[0, -2.0, 0, 10], [-1.5, 0, 0, 20], [0, 0, 3, -5], [0, 0, 0, 1]])
    ijk = np.array([[1, 2, 3], [4, 0, 2]])
    ras = (affine @ np.c_[ijk, np.ones(2)].T).T[:, :3]
    assert np.array_equal(world_to_voxel(ras + 0.2, affine), ijk)
    assert clip_voxels([[0, 0, 0], [5, 0, 0]], (4, 4, 4)).tolist() == [[0, 0, 0]]
    assert clip_voxels([[9, 9, 9]], (4, 4, 4)) is None


def test_nrrd_header_lps_becomes_the_nifti_ras_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    nrrd = pytest.importorskip("nrrd")
    affine = np.array([[0, -0.8, 0, 30], [-0.9, 0, 0, 12], [0, 0, 2.5, -40], [0, 0, 0, 1]])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    data = np.random.default_rng(0).integers(0, 100, (6, 5, 4)).astype(np.int16)
    nrrd.write(str(tmp_path / "x.nrrd"), data, {"space": "left-posterior-superior",
                                                "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    read, header = nrrd.read(str(tmp_path / "x.nrrd"))
    np.testing.assert_allclose(affine_from_nrrd_header(header), affine)
    assert np.array_equal(read, data)
    with pytest.raises(ValueError, match="space directions"):
        affine_from_nrrd_header({"sizes": [2, 2, 2]})
    with pytest.raises(ValueError, match="space-time"):
        affine_from_nrrd_header({"space": "left-posterior-superior-time", "space directions": np.eye(3)})
    with pytest.raises(ValueError, match="'martian'.*not a 3D space"):
        affine_from_nrrd_header({"space": "martian", "space directions": np.eye(3)})
    del nib


@pytest.mark.parametrize("space", ["RAS", "left-anterior-superior", "LPS", "scanner-xyz", "3D-right-handed",
                                   "3D-left-handed", None])
def test_nrrd_spaces_are_read_as_the_engine_reads_them(tmp_path, space):
    # a file in any space the engine opens must land on the same RAS grid in the client, or a Slicer user's
    # labels would come back mirrored against what the server segmented
    nrrd = pytest.importorskip("nrrd")
    from engine.io import load_volume
    directions = np.array([[0.0, -0.8, 0.1], [-0.9, 0.0, 0.0], [0.0, 0.2, 2.5]])
    header = {"space directions": directions, "space origin": np.array([30.0, 12.0, -40.0])}
    if space is not None:
        header["space"] = space
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    nrrd.write(str(tmp_path / "x.nrrd"), data, header)
    _, read_header = nrrd.read(str(tmp_path / "x.nrrd"))
    np.testing.assert_allclose(affine_from_nrrd_header(read_header), load_volume(tmp_path / "x.nrrd").affine,
                               atol=1e-9)


def test_unreachable_server_is_a_clear_error():
    c = Client(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(ServerUnavailableError, match="no MambaHoME server answered"):
        c.health()


def test_client_package_imports_neither_torch_nor_the_engine():
    code = ("import sys, mambahome_client, mambahome_client.geometry; "
            "bad = [m for m in ('torch', 'engine', 'fastapi', 'nibabel') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
