"""Decompression bombs in uploads (NIfTI, NRRD, label and mask packs): refused with a 400 naming what is wrong, before
they inflate.

A 1.4 MB ``.nii.gz`` whose header put its voxels 1.5 GB past the header (the space between holds NIfTI extensions,
which nibabel reads into memory whole) grew a server by 1.5 GB and took 22 s; a 1 MB gzip ``.nrrd`` declaring 4x4x4
voxels grew it by 1 GB (pynrrd inflates the whole payload before comparing sizes), and bzip2 inflates a thousand times
more from the same bytes. The limits on voxels (``--max-voxels``) and uploads (``--max-upload-mb``) bound neither.
"""
from __future__ import annotations

import bz2
import json
import struct
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")

from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "walk-server-bombs-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("walk-bombs"), TOKEN) as served:
        yield served


@pytest.fixture()
def client(server):
    return connected_client(server[0], TOKEN)


def _zeros_gz(head: bytes, zeros: int) -> bytes:
    """``head`` then ``zeros`` zero bytes, gzip-compressed without ever holding the zeros at once."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [co.compress(head)]
    chunk = bytes(1 << 20)
    left = zeros
    while left > 0:
        parts.append(co.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    parts.append(co.flush())
    return b"".join(parts)


def _nifti_header(vox_offset: float, extension: bool) -> bytes:
    """The 348-byte header of a 4x4x4 float32 NIfTI-1 image whose voxels start at ``vox_offset``, and the 4 bytes
    that say whether extensions follow."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    head = bytearray(img.header.binaryblock)
    struct.pack_into("<f", head, 108, float(vox_offset))
    return bytes(head) + (b"\x01\x00\x00\x00" if extension else b"\x00\x00\x00\x00")


def _post(url: str, body: bytes, fmt: str, name: str):
    req = urllib.request.Request(f"{url}/sessions?format={fmt}&name={name}", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.monotonic() - t0


def _still_serves(url: str, client) -> None:
    """The server answers and takes a real, valid upload after the bomb."""
    img = nib.Nifti1Image(np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    status, answer, _ = _post(url, img.to_bytes(), "nifti", "fine.nii")
    assert status == 200, answer
    client.close_session(answer["session_id"])
    assert client.health()["status"] == "ok"


def test_a_nifti_whose_extensions_would_inflate_to_gigabytes_is_refused_unread(server, client):
    url, _ = server
    # 200 MiB of "extension" between the header and the voxels, 200 KB on the wire
    ext = 200 * 2**20
    body = _zeros_gz(_nifti_header(352 + ext, extension=True) + struct.pack("<ii", ext, 0), ext - 8 + 256)
    assert len(body) < 300_000
    status, answer, seconds = _post(url, body, "nifti", "bomb.nii.gz")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert "bomb.nii.gz" in answer["detail"] and "extension" in answer["detail"], answer["detail"]
    assert str(ext + 352) in answer["detail"] or "MiB" in answer["detail"], answer["detail"]
    assert seconds < 10, f"took {seconds:.1f} s: the file was inflated before it was refused"
    _still_serves(url, client)


def test_a_nifti_reading_extensions_to_the_end_of_its_stream_is_refused(server, client):
    """vox_offset 0 with the extension flag set: nibabel reads extensions until the stream ends, however long, and the
    session kept them (its header's extensions) for as long as it lived."""
    url, _ = server
    ext = 100 * 2**20
    body = _zeros_gz(_nifti_header(0, extension=True) + struct.pack("<ii", ext, 0), ext - 8)
    status, answer, _ = _post(url, body, "nifti", "ext-to-end.nii.gz")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert "ext-to-end.nii.gz" in answer["detail"] and "extension" in answer["detail"], answer["detail"]
    _still_serves(url, client)


def test_a_nifti_whose_voxels_start_gigabytes_past_its_header_is_refused(server, client):
    """No extensions, but voxels 1e12 bytes in: nibabel inflates and drops everything up to there (CPU, not memory)."""
    url, _ = server
    body = _zeros_gz(_nifti_header(1e12, extension=False), 64 * 2**20)
    status, answer, seconds = _post(url, body, "nifti", "far.nii.gz")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert "far.nii.gz" in answer["detail"], answer["detail"]
    assert seconds < 10
    _still_serves(url, client)


def _nrrd(encoding: str, payload: bytes, extra: str = "") -> bytes:
    return (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 4\n"
            f"space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
            f"encoding: {encoding}\nspace origin: (0,0,0)\n{extra}\n").encode() + payload


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_nrrd_whose_payload_inflates_past_its_sizes_is_refused_before_it_inflates(server, client, encoding):
    url, _ = server
    inflated = 100 * 2**20  # 4x4x4 float32 is 256 bytes
    if encoding == "gzip":
        payload = _zeros_gz(b"", inflated)
    else:
        co = bz2.BZ2Compressor(9)
        chunk = bytes(1 << 24)
        payload = b"".join([co.compress(chunk) for _ in range(inflated // len(chunk))] + [co.flush()])
    status, answer, seconds = _post(url, _nrrd(encoding, payload), "nrrd", f"bomb-{encoding}.nrrd")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert f"bomb-{encoding}.nrrd" in answer["detail"] and "256 bytes" in answer["detail"], answer["detail"]
    assert seconds < 10
    _still_serves(url, client)


def test_a_line_skip_does_not_hide_a_nrrd_bomb(server, client):
    url, _ = server
    payload = b"a line pynrrd skips\n" + _zeros_gz(b"", 100 * 2**20)
    status, answer, _ = _post(url, _nrrd("gzip", payload, "line skip: 1\n"), "nrrd", "skipped.nrrd")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert "skipped.nrrd" in answer["detail"], answer["detail"]


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_compressed_nrrd_and_nifti_of_the_right_size_still_upload(server, client, encoding, tmp_path):
    import nrrd

    data = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    path = tmp_path / f"ok-{encoding}.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.eye(3) * 2.0,
                                 "space origin": [1.0, 2.0, 3.0], "kinds": ["domain"] * 3, "encoding": encoding})
    s = client.upload_file(path)
    assert s.shape == (6, 7, 8)
    client.close_session(s.session_id)
    gz = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(gz))
    s = client.upload_file(gz)
    assert s.shape == (6, 7, 8)
    client.close_session(s.session_id)


def _labels_pack(shape, payload: bytes, meta: dict) -> bytes:
    head = json.dumps({"dtype": "|u1", "shape": list(shape), "codec": "zlib", **meta}).encode()
    return b"MHPK" + struct.pack("<I", len(head)) + head + payload


@pytest.mark.parametrize("endpoint, noun", [("cases", "labels"), ("initial-mask", "initial mask")])
def test_labels_or_a_mask_larger_than_the_session_are_refused_before_they_inflate(server, client, endpoint, noun):
    """Labels and masks lie on the session's grid: a zlib pack is inflated no further than the session's volume, not
    the server's largest (``--max-voxels`` x 8 bytes). A 1 MB labels pack declaring 512^3 float64 grew a server holding
    a 35x51x35 session by 2 GB before it was told its shape was wrong. Here the pack declares 64^3 for an 8^3 session
    and carries a cut-off payload: refused for its shape, it was never inflated (inflating it says it is cut off)."""
    s = client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="small")
    try:
        body = _labels_pack((64, 64, 64), zlib.compress(bytes(100)), {"class_names": ["background", "a"]})
        req = urllib.request.Request(f"{server[0]}/sessions/{s.session_id}/{endpoint}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/x-mambahome-pack"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        answer = json.loads(err.value.read())
        assert err.value.code == 400 and answer["error"] == "invalid_input", answer
        assert answer["detail"].startswith(f"{noun} of shape (64, 64, 64)") and "(8, 8, 8)" in answer["detail"], answer
    finally:
        client.close_session(s.session_id)


def test_a_4d_nifti_is_refused_from_its_header_before_its_voxels_are_read(server, client):
    """Only the first three axes were counted against ``--max-voxels``: a 1 MB ``.nii.gz`` of 64^3 x 1000 float32 grew
    the server by 2 GB (6 s) before it was told it is 4D. Now the header alone refuses it: here the voxels are cut off
    after a few bytes, which reading them would report instead."""
    url, _ = server
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    head = bytearray(img.header.binaryblock)
    struct.pack_into("<8h", head, 40, 4, 64, 64, 64, 1000, 1, 1, 1)
    struct.pack_into("<f", head, 108, 352.0)
    body = _zeros_gz(bytes(head) + bytes(4), 4096)
    status, answer, _ = _post(url, body, "nifti", "series.nii.gz")
    assert status == 400 and answer["error"] == "invalid_input", answer
    assert answer["detail"].startswith("series.nii.gz: is 4D with shape (64, 64, 64, 1000)"), answer["detail"]
    _still_serves(url, client)
