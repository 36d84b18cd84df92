"""Hostile files uploaded to a real server (uvicorn on 127.0.0.1, ``POST /sessions?format=nifti|nrrd``): each gets a
4xx naming the client's file (never a server path), nothing big is allocated, and the server keeps serving.

Found: a gzip NIfTI whose header claims 600^3 voxels (under ``--max-voxels``) over 16 KiB of gzip was inflated
whole before nibabel compared sizes, and refused as "Expected 216000000 bytes, got 16777568 bytes from  - could the
file be damaged?" (the scrubbed server path left a hole); a gzip NRRD likewise. Now the header's claim is compared
with what the body can hold before anything is inflated."""
from __future__ import annotations

import gzip
import json
import tracemalloc
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")

from engine.server.config import ServerConfig  # noqa: E402
from server_support import running_server  # noqa: E402

TOKEN = "hostile-files-token-0123456789"
BIG = 64 << 20
GEOMETRY = "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n"


def _nifti(shape, body: bytes, dtype=np.int16, gz: bool = True, **fields) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    for key, value in fields.items():
        header[key] = value
    blob = header.binaryblock + b"\0" * 4 + body
    return gzip.compress(blob) if gz else blob


def _deflated_zeros(n: int) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    return co.compress(b"\0" * n) + co.flush()


def _nifti_image(data: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def _post(url: str, path: str, body: bytes):
    """``(status, JSON answer)`` of a raw upload (urllib: the client library would check some of it itself)."""
    request = urllib.request.Request(url + path, data=body, method="POST", headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _cases():
    bomb_header = nib.Nifti1Header()
    bomb_header.set_data_dtype(np.uint8)
    bomb_header.set_data_shape((600, 600, 600))  # under the default --max-voxels: only the file's size can tell
    nan = np.zeros((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    cut = _nifti_image(np.random.default_rng(0).integers(0, 999, (32, 32, 32)).astype(np.int16))
    return [
        ("giant.nii.gz", "nifti", _nifti((32767, 32767, 32767), b"\0" * 64), 422, "voxels"),
        ("bomb.nii.gz", "nifti", gzip.compress(bomb_header.binaryblock + b"\0" * 4 + b"\0" * (16 << 20)), 400,
         "gzip-compressed data cannot hold"),
        ("bomb.nrrd", "nrrd", (f"NRRD0004\ntype: unsigned char\ndimension: 3\n{GEOMETRY}sizes: 600 600 600\n"
                               "encoding: gzip\n\n").encode() + _deflated_zeros(16 << 20), 400,
         "gzip-compressed data cannot hold"),
        ("liar.nrrd", "nrrd", (f"NRRD0004\ntype: short\ndimension: 3\n{GEOMETRY}sizes: 600 600 600\nendian: little\n"
                               "encoding: raw\n\n").encode() + b"\0" * 64, 400, "is truncated or its header is wrong"),
        ("cut.nii.gz", "nifti", cut[: len(cut) // 2], 400, "truncated"),
        ("nan.nii.gz", "nifti", _nifti_image(nan), 400, "NaN or infinite"),
        ("4d.nii.gz", "nifti", _nifti_image(np.zeros((8, 8, 8, 3), np.float32)), 400, "4D"),
        ("flat.nii", "nifti", _nifti((8, 8, 8), np.zeros(512, np.int16).tobytes(), gz=False,
                                     pixdim=[1, 1, 0, 1, 1, 1, 1, 1]), 400, "must be finite and > 0"),
        ("escape.nhdr", "nrrd", (f"NRRD0004\ntype: unsigned char\ndimension: 3\n{GEOMETRY}sizes: 2 2 2\n"
                                 "encoding: raw\ndata file: ../../etc/passwd\n").encode(), 400, "detached"),
    ]


def test_hostile_uploads_are_refused_naming_the_file_and_allocating_nothing_big():
    cases = _cases()
    with running_server(ServerConfig(token=TOKEN, device="cpu", max_sessions=4)) as (url, _):
        for name, fmt, body, status, phrase in cases:
            tracemalloc.start()
            try:
                got, answer = _post(url, f"/sessions?format={fmt}&name={name}", body)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            detail = answer.get("detail", "")
            assert got == status, (name, got, detail)
            assert name in detail and phrase in detail, (name, detail)
            assert "mambahome-upload" not in detail and "/tmp" not in detail, (name, detail)
            assert peak < BIG + 2 * len(body), f"{name}: {peak} bytes allocated to refuse it"
        got, answer = _post(url, "/sessions?format=nifti&name=ok.nii.gz", _nifti_image(np.ones((8, 8, 8), np.float32)))
        assert got == 200 and answer["shape"] == [8, 8, 8], answer
