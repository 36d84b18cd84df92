"""What a remote user met driving a real server (uvicorn on localhost) with the client: a CT sent as a pack without a
modality, zlib bodies inflated on the event loop, a JSON body as large as a volume, ids echoed whole, ids that leave
their URL segment."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
nib = pytest.importorskip("nibabel")

from engine.server.app import JSON_BODY_LIMIT  # noqa: E402
from mambahome_client import Client, PayloadTooLargeError, ServerError  # noqa: E402
from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "remote-token-123456"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("remote-server"), TOKEN) as served:
        yield served


@pytest.fixture
def client(server):
    return connected_client(server[0], TOKEN)


def test_a_ct_sent_as_a_pack_without_a_modality_is_recognised_as_ct(client, shared_data):
    """3D Slicer and Python clients send arrays, not files: the Hounsfield units made a file upload a CT
    ("guessed"), but a pack went through the model's default (MR) rule, with a warning to pass --modality CT."""
    ct_file = shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"
    if not ct_file.is_file():
        pytest.skip(f"{ct_file} not present")
    img = nib.load(str(ct_file))
    ct = np.asarray(img.dataobj).astype(np.int16)  # as Slicer holds it
    s = client.create_session(ct, img.affine, name="ct")
    assert (s.modality, s.modality_source) == ("CT", "guessed")
    as_file = client.upload_file(ct_file)
    assert (as_file.modality, as_file.modality_source) == ("CT", "guessed")
    named = client.create_session(ct, img.affine, name="ct", modality="MR")  # the client's word wins
    assert (named.modality, named.modality_source) == ("MR", "client")
    mr = client.create_session(np.abs(ct).astype(np.float32) + 0.5, img.affine, name="not ct")
    assert (mr.modality, mr.modality_source) == (None, None)
    for sid in (s.session_id, as_file.session_id, named.session_id, mr.session_id):
        client.close_session(sid)


def _health_latencies(url: str, while_running, n: int = 4) -> list:
    """Seconds /health took, asked while ``while_running()`` runs in another thread."""
    worker = threading.Thread(target=while_running)
    worker.start()
    time.sleep(0.5)
    took = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url + "/health", timeout=30) as resp:
            resp.read()
        took.append(time.perf_counter() - t0)
    worker.join(timeout=60)
    return took


def test_a_zlib_upload_being_inflated_does_not_stall_other_requests(server, client, monkeypatch):
    """A zlib pack of a large volume takes seconds to inflate; done on the event loop, every other request (/health,
    other users' prompts) waited for it. A slow inflate stands in for a large one."""
    import engine.server.app as app_module
    from mambahome_client import wire

    slow_s = 2.5

    class SlowReceiver(wire.PackReceiver):
        def finish(self):
            time.sleep(slow_s)
            return super().finish()

    def slow_unpack(data, max_bytes=None):
        time.sleep(slow_s)
        return wire.unpack_array(data, max_bytes)

    monkeypatch.setattr(app_module, "PackReceiver", SlowReceiver)
    monkeypatch.setattr(app_module, "unpack_array", slow_unpack)
    image = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    created = {}

    def upload():
        created["s"] = client.create_session(image, np.eye(4), name="slow")

    took = _health_latencies(server[0], upload)
    assert "s" in created and max(took) < 1.0, took
    sid = created["s"].session_id
    answers = {}

    def save():
        try:
            client.save_case(sid, np.zeros((16, 16, 16), np.uint8), ["background", "organ"], "MR", case_id="slow1")
        except ServerError as exc:  # the labels have no class 1: refused after unpacking, which is what is timed
            answers["error"] = exc

    took = _health_latencies(server[0], save)
    assert max(took) < 1.0, took
    client.close_session(sid)


def test_an_id_of_a_megabyte_is_refused_without_echoing_it(client):
    s = client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="small")
    with pytest.raises(ServerError) as err:
        client.segment(s.session_id, model_id="m" * 1_000_000)
    assert err.value.status == 400 and err.value.code == "invalid_id"
    assert len(str(err.value)) < 400 and "mmm..." in str(err.value)
    client.close_session(s.session_id)


@pytest.mark.parametrize("bad", ["a/../../models/select", "abc?model_id=x", "..", "", "x" * 200, "a b"])
def test_the_client_refuses_an_id_that_would_leave_its_url_segment(monkeypatch, bad):
    """An id is one path segment: "abc?x=1" sent a query, "a/b" another endpoint. Refused before anything is sent."""
    c = Client("http://127.0.0.1:9")
    monkeypatch.setattr(c, "_request", lambda *a, **k: pytest.fail(f"sent a request for id {bad!r}"))
    for call in (lambda: c.segment(bad), lambda: c.close_session(bad), lambda: c.undo(bad), lambda: c.job(bad),
                 lambda: c.cancel_job(bad), lambda: c.add_point(bad, (1, 2, 3))):
        with pytest.raises(ValueError, match="invalid (session|job) id"):
            call()


def _refused_unread(url: str, path: str, size: int) -> dict:
    """The answer to a POST declaring ``size`` bytes of JSON, of which none is sent (refused unread, or it hangs)."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            piece = conn.recv(65536)
            if not piece:
                break
            raw += piece
    head, _, body = raw.partition(b"\r\n\r\n")
    return {"status": int(head.split()[1]), **json.loads(body)}


def test_a_json_request_as_large_as_a_volume_is_refused_before_it_is_read(server, client):
    """Prompts and settings shared the volume's limit (2 GiB by default): parsed, a 2 GiB scribble takes tens of GiB.
    A body over the JSON limit is 413 from its Content-Length; the session answers prompts as before."""
    url, app = server
    assert client.server_info["limits"]["max_json_bytes"] == JSON_BODY_LIMIT < app.state.config.max_upload_bytes
    s = client.create_session(np.random.default_rng(1).random((16, 16, 16), dtype=np.float32), np.eye(4), name="v")
    for path in (f"/sessions/{s.session_id}/prompts", "/finetune", "/models/select"):
        answer = _refused_unread(url, path, JSON_BODY_LIMIT + 1)
        assert answer["status"] == 413 and answer["error"] == "too_large", answer
        assert "not an upload" in answer["detail"] and f"{JSON_BODY_LIMIT} bytes" in answer["detail"]
    # the client says so before sending: a scribble of two million voxels
    huge = np.tile(np.array([[1, 2, 3]]), (2_000_000, 1))
    with pytest.raises(PayloadTooLargeError, match="not an upload"):
        client.add_scribble(s.session_id, huge)
    # an upload larger than the JSON limit is a volume: under the upload limit, accepted
    big = np.ones((170, 170, 170), np.float32)
    assert big.nbytes > JSON_BODY_LIMIT
    up = client.create_session(big, np.eye(4), name="big")
    assert tuple(up.shape) == big.shape
    client.close_session(up.session_id)
    # refused, nothing changed: the session still takes a scribble of a few voxels
    u = client.add_scribble(s.session_id, np.array([[1, 2, 3], [2, 2, 3]]))
    assert u.mask.shape == tuple(b.stop - b.start for b in u.bbox)
    client.close_session(s.session_id)


def test_a_client_without_the_json_limit_is_told_413_not_that_the_server_is_gone(server):
    """A client that never connected (no limits known) sends the body; the server refuses it by its Content-Length
    and closes: the broken send was reported as "no MambaHoME server answered"."""
    c = Client(server[0], token=TOKEN, timeout=300)
    s = Client(server[0], token=TOKEN).create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="w")
    with pytest.raises(PayloadTooLargeError):
        c.add_scribble(s.session_id, np.tile(np.array([[1, 2, 3]]), (2_000_000, 1)))


def _post(url: str, path: str, body: bytes, content_type=None) -> tuple:
    import urllib.error

    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("content_type, status", [("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                                                  ("application/octet-stream", 415)])
def test_json_sent_with_another_content_type_is_told_which_header_to_send(server, content_type, status):
    """It was "body: Input should be a valid dictionary or object to extract fields from", naming no header."""
    code, answer = _post(server[0], "/models/select", b'{"model_id": "default"}', content_type)
    assert code == status and answer["error"] == "invalid_request", answer
    assert "Content-Type: application/json" in answer["detail"] and "/models/select" in answer["detail"]
    assert content_type in answer["detail"]
    code, answer = _post(server[0], "/models/select", b'{"model_id": "default"}', "application/json; charset=utf-8")
    assert code == 200 and answer["active"] == "default"  # the same body as JSON: accepted
    code, answer = _post(server[0], "/models/select", b'{"model_id": 5}', "application/json")
    assert code == 422 and answer["detail"].startswith("body.model_id:")  # a field's error still names the field


def test_json_nested_too_deep_is_an_invalid_request_not_a_bare_error(server):
    code, answer = _post(server[0], "/finetune", b'{"steps": 5, "settings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                         "application/json")
    assert code == 400 and answer["error"] == "invalid_request", answer
