"""Packs from a hostile or broken peer: the client's uploads read by the server, and the server's answers read by the
client (napari, 3D Slicer). Each must be refused with a clear error before it costs memory, never crash the reader
with an unexplained exception, and never be taken as something it is not."""
from __future__ import annotations

import http.server
import json
import struct
import threading
import tracemalloc
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import pytest

from mambahome_client import Client, ServerError
from mambahome_client.wire import (MAGIC, MAX_HEADER_BYTES, PackError, PackReceiver, PackTooLargeError,
                                   bbox_to_json, pack_array, unpack_array)


def _pack(header: Dict[str, Any], payload: bytes = b"", raw_header: bytes = b"") -> bytes:
    head = raw_header or json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload


@contextmanager
def _traced() -> Iterator[Callable[[], int]]:
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- the header
@pytest.mark.parametrize("raw_header, problem", [
    (b'{"dtype": "|u1", "shape": [1], "codec": "raw", "affine": NaN}', "NaN"),
    (b'{"dtype": "|u1", "shape": [1], "codec": "raw", "x": -Infinity}', "-Infinity"),
    (b'{"dtype": "|u1", "shape": [1], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError"),
    (b'{"dtype": "|u1", "shape": [' + b"9" * 10_000 + b"]}", "not valid JSON"),
])
def test_header_json_python_would_choke_on_or_take_as_numbers_is_a_pack_error(raw_header, problem):
    """NaN/Infinity are Python's extension of JSON (an affine of NaN); 100000 nested brackets raised RecursionError
    and 10000 digits the int-conversion ValueError, neither a PackError: the server answered 500."""
    with pytest.raises(PackError, match=problem):
        unpack_array(_pack({}, b"\0", raw_header=raw_header))


def test_a_header_over_the_header_limit_is_refused_unparsed():
    big = _pack({"dtype": "|u1", "shape": [1], "codec": "raw", "pad": "x" * MAX_HEADER_BYTES}, b"\0")
    with pytest.raises(PackError, match="header of .* bytes is over"):
        unpack_array(big)


@pytest.mark.parametrize("dtype", ["float32", "f4," * 50_000 + "f4", "(3,3)<f8", ">f4", "|O", 5, ["<f4"], None])
def test_only_the_listed_dtype_strings_are_read(dtype):
    """np.dtype() was given whatever the header said: "float32" passed, and "f4,f4,..." built a structured dtype of
    50000 fields (a second of CPU per request) before the allow-list refused it."""
    with pytest.raises(PackError, match="dtype .* is not allowed"):
        unpack_array(_pack({"dtype": dtype, "shape": [1], "codec": "raw"}, b"\0\0\0\0"))


@pytest.mark.parametrize("shape, problem", [
    ([1] * 33, "33 axes"),  # numpy's own limit is 32: it was accepted as 33 axes of one, or a ValueError
    ([2**64, 0], "axis longer"),  # 0 bytes in all, so under any limit; numpy's reshape raised ValueError
    ([-1, -1], "negative"),  # the product is 1: one byte
    ({"a": 1}, "list of whole numbers"),  # list({"a": 1}) is ["a"]
    ("1", "list of whole numbers"),
    ([2.0], "whole numbers"),
    ([True], "whole numbers"),
])
def test_a_shape_that_lies_is_a_pack_error(shape, problem):
    with pytest.raises(PackError, match=problem):
        unpack_array(_pack({"dtype": "|u1", "shape": shape, "codec": "raw"}, b"\0"))


def test_a_shape_of_thousands_of_digits_is_refused_as_too_large():
    """``nbytes / 2**20`` of a 12000-digit size raised OverflowError (a float), not the PackTooLargeError."""
    with pytest.raises(PackTooLargeError, match="is larger than the limit"):
        unpack_array(_pack({"dtype": "|u1", "shape": [10**4000] * 3, "codec": "raw"}), max_bytes=2**20)


# ----------------------------------------------------------------------------- the payload
def test_bytes_after_a_zlib_payload_are_refused():
    """The payload's end was its zlib stream's end: whatever followed was dropped unseen."""
    good = pack_array(np.arange(10, dtype=np.uint8))
    assert unpack_array(good)[0].tolist() == list(range(10))
    with pytest.raises(PackError, match="5 bytes after the end of its compressed payload"):
        unpack_array(good + b"extra")
    raw = pack_array(np.arange(10, dtype=np.uint8), level=0)
    with pytest.raises(PackError, match="holds 15 bytes, expected 10"):
        unpack_array(raw + b"extra")


def test_a_truncated_zlib_payload_says_it_is_cut_off():
    good = pack_array(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8))
    with pytest.raises(PackError, match="cut off"):
        unpack_array(good[:-100])


def test_a_decompression_bomb_stops_at_the_declared_size_while_it_inflates():
    """64 MiB of zeros in 64 KiB of zlib under a header that declares 1 MiB: the inflation stops there, the 64 MiB
    are never made."""
    bomb = _pack({"dtype": "|u1", "shape": [2**20], "codec": "zlib"}, zlib.compress(bytes(64 * 2**20), 9))
    with _traced() as peak, pytest.raises(PackError, match="inflates past the size its header declares"):
        unpack_array(bomb, max_bytes=2**20)
    assert peak() < 8 * 2**20, f"{peak()} bytes were allocated to refuse a pack of 1 MiB"


@pytest.mark.parametrize("level", [0, 1])
def test_a_bool_pack_holds_only_0_and_1(level):
    """numpy keeps a bool byte of 2: it prints True, yet ``mask == True`` is False for it."""
    payload = bytes([1, 0, 2])
    body = _pack({"dtype": "|b1", "shape": [3], "codec": "zlib" if level else "raw"},
                 zlib.compress(payload) if level else payload)
    with pytest.raises(PackError, match="bool holds bytes other than 0 and 1"):
        unpack_array(bytes(body))
    receiver = PackReceiver()
    receiver.feed(bytes(body))
    with pytest.raises(PackError, match="bool holds bytes other than 0 and 1"):
        receiver.finish()


# ----------------------------------------------------------------------------- a pack arriving in pieces
@pytest.mark.parametrize("total", [None, "matching"])
def test_a_raw_pack_is_not_allocated_at_its_declared_size_before_its_bytes_arrive(total):
    """The receiver allocated the header's array at once: a chunked upload (no Content-Length) claiming
    ``--max-voxels`` of float64, or one whose Content-Length matched the claim, made the server allocate it all
    for a few bytes and hold it until the body timeout."""
    declared = 256 * 2**20
    head = _pack({"dtype": "|u1", "shape": [declared], "codec": "raw"})
    receiver = PackReceiver(max_bytes=declared, total=len(head) + declared if total else None)
    with _traced() as peak:
        receiver.feed(head)
        receiver.feed(bytes(1000))
        assert peak() < 2**20, f"{peak()} bytes were allocated for 1000 bytes of payload"


@pytest.mark.parametrize("piece", [1, 7, 4096, 70_000, 10**7])
def test_a_growing_raw_array_receives_every_byte_in_place(piece):
    arr = np.random.default_rng(1).random((30, 40, 50)).astype(np.float64)
    body = pack_array(arr, {"affine": np.eye(4).tolist()}, level=0)
    receiver = PackReceiver(max_bytes=arr.nbytes)
    for i in range(0, len(body), piece):
        receiver.feed(body[i:i + piece])
    out, meta = receiver.finish()
    assert np.array_equal(out, arr) and out.dtype == arr.dtype and meta["affine"] == np.eye(4).tolist()
    assert out.base.nbytes == arr.nbytes  # no spare capacity left over from growing
    assert out.ctypes.data % out.dtype.itemsize == 0 and out.flags.writeable


# ----------------------------------------------------------------------------- the server reading uploads
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from server_support import raw_exchange, running_server  # noqa: E402

TOKEN = "hostile-token-0123456789"


def _post(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/x-mambahome-pack\r\n{extra}\r\n").encode()


def _claiming(nbytes: int) -> bytes:
    """The header (and nothing more) of a raw float32 pack of ``nbytes``, a valid volume for the server."""
    return _pack({"dtype": "<f4", "shape": [1, 1, nbytes // 4], "codec": "raw", "affine": np.eye(4).tolist()})


def test_the_server_does_not_allocate_a_chunked_pack_claim_before_its_bytes():
    declared = 96 * 2**20
    with running_server(ServerConfig(token=TOKEN, device="cpu", body_timeout_s=0.5)) as (url, app):
        head = _claiming(declared)
        chunked = f"{len(head):x}\r\n".encode() + head + b"\r\n0\r\n\r\n"
        with _traced() as peak:
            status, answer = raw_exchange(int(url.rsplit(":", 1)[1]),
                                       _post("/sessions?format=pack", "Transfer-Encoding: chunked\r\n"), chunked)
            used = peak()
        assert status == 400 and answer["error"] == "invalid_input", answer
        assert f"holds 0 bytes, expected {declared}" in answer["detail"], answer
        assert used < declared // 4, f"the server allocated {used} bytes for a pack of no voxels"
        assert len(app.state.sessions) == 0


def test_the_server_does_not_allocate_a_pack_whose_content_length_matches_its_claim():
    declared = 96 * 2**20
    with running_server(ServerConfig(token=TOKEN, device="cpu", body_timeout_s=0.5)) as (url, _):
        head = _claiming(declared)
        with _traced() as peak:
            status, answer = raw_exchange(int(url.rsplit(":", 1)[1]),
                                       _post("/sessions?format=pack", f"Content-Length: {len(head) + declared}\r\n"),
                                       head)
            used = peak()
        assert status == 408, answer
        assert used < declared // 4, f"the server allocated {used} bytes for a body of its header alone"


def test_the_server_answers_a_shape_of_thousands_of_digits_with_422():
    """The 422's message wrote the voxel count with str(), which raises for an integer of over 4300 digits: 500."""
    body = _pack({"dtype": "<f4", "shape": [10**4000] * 3, "codec": "raw", "affine": np.eye(4).tolist()}, bytes(32))
    with running_server(ServerConfig(token=TOKEN, device="cpu")) as (url, _):
        status, answer = raw_exchange(int(url.rsplit(":", 1)[1]),
                                   _post("/sessions?format=pack", f"Content-Length: {len(body)}\r\n"), body)
    assert status == 422 and answer["error"] == "too_many_voxels", answer
    assert "--max-voxels" in answer["detail"] and len(answer["detail"]) < 1000, answer


@pytest.mark.parametrize("header, raw_header, problem", [
    ({"dtype": "|u1", "shape": [1] * 33, "codec": "raw"}, b"", "33 axes"),
    ({"dtype": "|u1", "shape": [2**64, 0], "codec": "raw"}, b"", "axis longer"),
    ({}, b'{"dtype": "<f4", "shape": [2, 2, 2], "codec": "raw", "affine": NaN}', "NaN"),
    ({}, b'{"dtype": "<f4", "shape": [2, 2, 2], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "not valid JSON"),
    ({"dtype": "float32", "shape": [2, 2, 2], "codec": "raw"}, b"", "not allowed"),
])
def test_the_server_answers_a_lying_pack_header_with_400_naming_it(header, raw_header, problem):
    """Those reached the server as ValueError/RecursionError (500, "internal error"), or were taken as they came."""
    body = _pack(header, bytes(32), raw_header=raw_header)
    with running_server(ServerConfig(token=TOKEN, device="cpu")) as (url, app):
        status, answer = raw_exchange(int(url.rsplit(":", 1)[1]),
                                   _post("/sessions?format=pack", f"Content-Length: {len(body)}\r\n"), body)
        assert status == 400 and answer["error"] == "invalid_input", answer
        assert problem in answer["detail"] and "the uploaded pack" in answer["detail"], answer
        assert len(app.state.sessions) == 0


# ----------------------------------------------------------------------------- the client reading answers
SHAPE = (8, 8, 8)


class _FakeServer:
    """A server that answers ``POST /sessions`` as a real one would, and every other request with ``answer``:
    ``(status, headers, body)``; body bytes, or a callable writing to the socket itself."""

    def __init__(self) -> None:
        self.answer: Tuple[int, Dict[str, str], Any] = (200, {}, b"")
        self.session: Dict[str, Any] = {"session_id": "s1", "shape": list(SHAPE), "affine": np.eye(4).tolist(),
                                        "expires_after_s": 60.0, "revision": 0}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if self.command == "POST" and self.path.startswith("/sessions?"):
                    status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(fake.session).encode()
                else:
                    status, headers, body = fake.answer
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if callable(body):
                    self.send_header("Connection", "close")
                    self.end_headers()
                    body(self.wfile)
                    self.close_connection = True
                    return
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            do_GET = do_POST = do_DELETE = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake():
    server = _FakeServer()
    yield server
    server.close()


def _client_with_session(fake: _FakeServer) -> Tuple[Client, str]:
    client = Client(fake.url, timeout=20)
    return client, client.create_session(np.zeros(SHAPE, np.int16), np.eye(4)).session_id


def _segmentation(labels: np.ndarray, **meta: Any) -> bytes:
    return pack_array(labels, {"class_names": ["background", "organ"], "model_id": "m", "seconds": 0.1, **meta})


def _invalid(exc: pytest.ExceptionInfo, problem: str) -> None:
    assert exc.value.code == "invalid_answer" and "answer is not valid" in str(exc.value), exc.value
    assert problem in str(exc.value), exc.value


def test_a_segmentation_bomb_is_refused_from_its_header(fake):
    """The client decoded any answer without a limit: a header claiming 256 MiB over 256 KiB of zlib took 256 MiB of
    napari's memory for a session of 512 voxels."""
    client, sid = _client_with_session(fake)
    big = 256 * 2**20
    fake.answer = (200, {}, _pack({"dtype": "|u1", "shape": [big], "codec": "zlib", "class_names": ["b", "o"],
                                   "model_id": "m", "seconds": 0.0}, zlib.compress(bytes(big), 9)))
    with _traced() as peak, pytest.raises(ServerError) as exc:
        client.segment(sid)
    _invalid(exc, "larger than the limit")
    assert peak() < 16 * 2**20, f"{peak()} bytes were allocated for a refused answer"


@pytest.mark.parametrize("labels, problem", [
    (np.full(SHAPE, np.nan, np.float32), "dtype float32"),  # NaN as a label; napari's Labels refuse floats
    (np.zeros((4, 4, 4), np.uint8), "shape (4, 4, 4), expected (8, 8, 8)"),
    (np.full(SHAPE, 7, np.uint8), "values 7..7, but the answer names 2 classes"),
    (np.full(SHAPE, -1, np.int16), "values -1..-1"),
])
def test_a_segmentation_that_is_no_label_map_of_the_session_is_refused(fake, labels, problem):
    client, sid = _client_with_session(fake)
    fake.answer = (200, {}, _segmentation(labels))
    with pytest.raises(ServerError) as exc:
        client.segment(sid)
    _invalid(exc, problem)


@pytest.mark.parametrize("meta, problem", [
    ({"class_names": "background"}, "'class_names'"),
    ({"seconds": "soon"}, "ValueError"),
    ({"colors": [["red"], ["blue"]]}, "ValueError"),
])
def test_a_segmentation_with_broken_fields_is_a_server_error(fake, meta, problem):
    """A missing or mistyped field was a KeyError/ValueError out of Client.segment, not the ServerError the plugins
    show."""
    client, sid = _client_with_session(fake)
    fake.answer = (200, {}, _segmentation(np.zeros(SHAPE, np.uint8), **meta))
    with pytest.raises(ServerError) as exc:
        client.segment(sid)
    _invalid(exc, problem)


@pytest.mark.parametrize("bbox, mask, problem", [
    ([[0, 2], [0, 2], [0, 2]], np.ones((3, 3, 3), np.uint8), "mask has shape (3, 3, 3), expected (2, 2, 2)"),
    ([[0, 9], [0, 8], [0, 8]], np.ones((9, 8, 8), np.uint8), "within the volume (8, 8, 8)"),
    ([[2, 1], [0, 1], [0, 1]], np.ones((0, 1, 1), np.uint8), "'bbox'"),
    ([[0, 1], [0, 1]], np.ones((1, 1, 1), np.uint8), "'bbox'"),
    ([[0, 1], [0, 1], [0, 1]], np.full((1, 1, 1), np.nan), "dtype float64"),  # NaN.astype(bool) is True
])
def test_a_prompt_answer_that_does_not_fit_its_box_is_refused_before_it_is_applied(fake, bbox, mask, problem):
    """``MaskUpdate.apply`` failed later with numpy's broadcast error, or wrote a box outside the volume."""
    client, sid = _client_with_session(fake)
    fake.answer = (200, {}, pack_array(mask, {"bbox": bbox, "engine_s": 0.0, "revision": 1}))
    with pytest.raises(ServerError) as exc:
        client.add_point(sid, (1, 1, 1))
    _invalid(exc, problem)
    fake.answer = (200, {}, pack_array(np.ones((2, 2, 2), np.uint8),
                                       {"bbox": bbox_to_json((slice(0, 2),) * 3), "engine_s": 0.0}))
    assert client.add_point(sid, (1, 1, 1)).mask.all()  # a valid answer still goes through


def test_an_answer_longer_than_its_limit_is_not_read_whole(fake, monkeypatch):
    """``resp.read()`` read whatever came: a server streaming without end filled the client's memory."""
    import mambahome_client.client as client_module

    monkeypatch.setattr(client_module, "MAX_JSON_ANSWER_BYTES", 1 << 20)

    def endless(out: Any) -> None:
        try:
            for _ in range(64):
                out.write(b" " * (1 << 20))
        except OSError:
            pass

    fake.answer = (200, {"Content-Type": "application/json"}, endless)
    with _traced() as peak, pytest.raises(ServerError) as exc:
        Client(fake.url, timeout=20).models()
    _invalid(exc, "longer than the 1048576 bytes")
    assert peak() < 8 * 2**20


def test_an_answer_declaring_more_than_its_limit_or_than_it_sends_is_a_server_error(fake):
    """A Content-Length of 10**12 followed by a few bytes raised http.client.IncompleteRead out of the client."""
    client, sid = _client_with_session(fake)
    fake.answer = (200, {"Content-Length": str(10**12)}, b"MHPK")
    with pytest.raises(ServerError) as exc:
        client.segment(sid)
    _invalid(exc, f"declares {10**12} bytes")
    body = _segmentation(np.zeros(SHAPE, np.uint8))
    fake.answer = (200, {"Content-Length": str(len(body) + 10)}, body)
    with pytest.raises(ServerError) as exc:
        client.segment(sid)
    _invalid(exc, "broke off after")


@pytest.mark.parametrize("change, problem", [
    ({"shape": [512, 512, 512]}, "not the shape of the volume sent, (8, 8, 8)"),
    ({"shape": [8, 8, -8]}, "three positive whole numbers"),
    ({"affine": [[float("nan")] * 4] * 4}, "4x4 matrix of finite numbers"),
    ({"session_id": "../models"}, "invalid session id"),
    ({"expires_after_s": None}, "TypeError"),
])
def test_a_session_answer_that_lies_is_refused(fake, change, problem):
    """The plugins allocate masks of the answer's shape: a server saying 512**3 for an 8**3 upload made them allocate
    it; a NaN affine placed the layers nowhere."""
    fake.session.update(change)
    with pytest.raises(ServerError) as exc:
        Client(fake.url, timeout=20).create_session(np.zeros(SHAPE, np.int16), np.eye(4))
    _invalid(exc, problem)


def test_an_answer_that_is_not_json_is_a_server_error(fake):
    fake.answer = (200, {"Content-Type": "application/json"}, b"<html>proxy error</html>")
    with pytest.raises(ServerError) as exc:
        Client(fake.url, timeout=20).models()
    _invalid(exc, "not JSON")


@pytest.mark.parametrize("answer", [b"[1, 2]", b'{"protocol": 1, "limits": "none"}'])
def test_a_version_answer_that_is_no_description_is_a_server_error(fake, answer):
    """``info.get`` of a list, or ``limits.get`` of a string later, was an AttributeError out of Client.connect."""
    fake.answer = (200, {"Content-Type": "application/json"}, answer)
    with pytest.raises(ServerError) as exc:
        Client(fake.url, timeout=20).connect()
    _invalid(exc, "is not the server's description")
