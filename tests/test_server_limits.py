"""A real server (uvicorn on 127.0.0.1) against careless and hostile clients: a body that stalls or lies about its
length, a client opening session after session, an idle session that expires, malformed JSON and prompts of the
wrong types. Each is answered with a status and a sentence naming what is wrong; the server keeps serving."""
from __future__ import annotations

import gc
import time
import tracemalloc
import weakref
from typing import Tuple

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig, ServerConfigError  # noqa: E402
from mambahome_client import Client, NotFoundError, ServerError  # noqa: E402
from mambahome_client.wire import pack_array  # noqa: E402
from server_support import raw_exchange, running_server  # noqa: E402

TOKEN = "limits-token-0123456789"


def _config(**settings) -> ServerConfig:
    base = dict(token=TOKEN, device="cpu", busy_wait_s=0.2, max_sessions=4, body_timeout_s=0.5)
    return ServerConfig(**{**base, **settings})


def _raw(port: int, head: bytes, body: bytes = b"", wait_s: float = 20.0,
         source: str = "127.0.0.1") -> Tuple[int, dict]:
    """:func:`raw_exchange` until the server closes the connection: a refused body must also end its connection."""
    return raw_exchange(port, head, body, wait_s, source, until_close=True)


def _post_head(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\r\n").encode()


def _session(client: Client, shape=(8, 8, 8)) -> str:
    return client.create_session(np.zeros(shape, np.float32), np.eye(4), name="tiny").session_id


@pytest.mark.parametrize("path, content_type", [("/sessions?format=nifti", "application/octet-stream"),
                                                ("/sessions/{sid}/prompts", "application/json")])
def test_a_body_shorter_than_its_content_length_gets_408_and_the_connection_is_closed(path, content_type):
    """uvicorn has no read timeout: a client that declared 150000 bytes and sent 10 held its connection (and the
    upload's buffer) for as long as the server ran, answered nothing."""
    with running_server(_config()) as (url, _):
        sid = _session(Client(url, token=TOKEN))
        status, answer = _raw(
            int(url.rsplit(":", 1)[1]),
            _post_head(path.format(sid=sid), f"Content-Type: {content_type}\r\nContent-Length: 150000\r\n"),
            b"0123456789")
        assert status == 408 and answer["error"] == "timeout", answer
        assert "stalled" in answer["detail"] and "10 bytes of the 150000" in answer["detail"], answer
        assert "--body-timeout" in answer["detail"]
        assert Client(url, token=TOKEN).health()["status"] == "ok"


def test_a_chunked_upload_that_stops_sending_gets_408():
    with running_server(_config()) as (url, app):
        status, answer = _raw(int(url.rsplit(":", 1)[1]),
                                 _post_head("/sessions?format=nifti", "Transfer-Encoding: chunked\r\n"),
                                 b"5\r\nhello\r\n")
        assert status == 408 and "after 5 bytes" in answer["detail"], answer
        assert len(app.state.sessions) == 0


def test_a_declared_size_is_not_allocated_before_the_bytes_arrive():
    """The body was read into a buffer of its declared Content-Length, allocated first: a client declaring the upload
    limit and sending one byte made the server allocate that much (2 GiB by default) per connection."""
    declared = 96 * 2**20
    with running_server(_config(max_upload_bytes=128 * 2**20)) as (url, _):
        tracemalloc.start()
        try:
            status, answer = _raw(int(url.rsplit(":", 1)[1]),
                                     _post_head("/sessions?format=nifti", f"Content-Length: {declared}\r\n"), b"x")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert status == 408, answer
        assert peak < declared // 4, f"the server allocated {peak} bytes for a body of 1 byte"


def test_one_client_over_its_session_cap_gets_429_naming_the_option_while_others_are_not_refused():
    with running_server(_config(max_sessions=4, max_sessions_per_client=2)) as (url, app):
        client = Client(url, token=TOKEN)
        assert client.connect()["limits"]["max_sessions_per_client"] == 2  # told before it is met
        first = _session(client)
        _session(client)
        with pytest.raises(ServerError) as exc:
            _session(client)
        assert exc.value.status == 429 and exc.value.code == "too_many_sessions"
        assert "--max-sessions-per-client 2" in str(exc.value) and "127.0.0.1" in str(exc.value)
        assert len(app.state.sessions) == 2
        client.close_session(first)  # closing one makes room again
        _session(client)
        # the cap is per address, not the server's: another machine (here a second loopback address) still gets one
        pack = pack_array(np.zeros((4, 4, 4), np.int16), {"affine": np.eye(4).tolist()})
        status, answer = _raw(int(url.rsplit(":", 1)[1]), _post_head(
            "/sessions?format=pack", f"Content-Length: {len(pack)}\r\nConnection: close\r\n"), pack,
            source="127.0.0.2")
        assert status == 200 and answer["session_id"], answer


def test_serve_reads_the_new_limits_from_the_command_line_with_the_dataclass_defaults():
    from engine.cli import build_parser
    from engine.server.cli import config_from_args

    parse = build_parser().parse_args
    default = config_from_args(parse(["serve"]))
    assert default.max_sessions_per_client == ServerConfig().max_sessions_per_client
    assert default.body_timeout_s == ServerConfig().body_timeout_s
    cfg = config_from_args(parse(["serve", "--max-sessions-per-client", "3", "--body-timeout", "7.5"]))
    assert (cfg.max_sessions_per_client, cfg.body_timeout_s) == (3, 7.5)
    for bad in (dict(max_sessions_per_client=0), dict(body_timeout_s=0)):
        with pytest.raises(ServerConfigError, match=next(iter(bad))):
            ServerConfig(**bad).validate()


def test_an_idle_session_expires_frees_its_volume_and_the_client_is_told_it_is_gone():
    with running_server(_config(idle_timeout_s=0.3)) as (url, app):
        client = Client(url, token=TOKEN)
        sid = _session(client)
        held = weakref.ref(app.state.sessions.get(sid).source.data)
        deadline = time.monotonic() + 30
        while app.state.sessions.ids() and time.monotonic() < deadline:  # the reaper, no request touching it
            time.sleep(0.05)
        assert app.state.sessions.ids() == []
        gc.collect()
        assert held() is None, "the expired session's volume is still held"
        with pytest.raises(NotFoundError) as exc:
            client.add_point(sid, [1, 1, 1])
        assert exc.value.status == 404 and "expired" in str(exc.value) and "upload the volume again" in str(exc.value)
        assert client.health()["status"] == "ok"


@pytest.mark.parametrize("body, field", [
    ({"type": "point", "voxel": [True, 1, 2]}, "voxel.0"),
    ({"type": "point", "voxel": ["7", 1, 2]}, "voxel.0"),
    ({"type": "point", "voxel": [1.5, 1, 2]}, "voxel.0"),
    ({"type": "point", "voxel": {"i": 1}}, "voxel"),
    ({"type": "point", "voxel": [1, 2, 3], "positive": "false"}, "positive"),
    ({"type": "box", "corner_a": [0, 0, 0], "corner_b": [2, 2, None]}, "corner_b.2"),
    ({"type": "scribble", "voxels": [[1, 2, "3"]]}, "voxels.0.2"),
    ({"type": 5}, "type"),
    ({"type": "point", "voxel": [1, 2, 3], "model_id": 7}, "model_id"),
])
def test_a_prompt_of_the_wrong_types_is_refused_naming_the_field_and_changes_nothing(body, field):
    """Lax parsing read [true, 1, 2] as voxel [1, 1, 2], ["7", 1, 2] as [7, 1, 2] and "positive": "false" as
    a negative click: a client's bug drew a prompt instead of being told."""
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        sid = _session(client)
        with pytest.raises(ServerError) as exc:
            client._request("POST", f"/sessions/{sid}/prompts", json_body=body)
        assert exc.value.status == 422 and f"body.{field}" in str(exc.value), str(exc.value)
        assert client.object_mask(sid).revision == 0  # nothing was applied


def test_malformed_json_gets_400_saying_where_it_breaks():
    with running_server(_config()) as (url, _):
        sid = _session(Client(url, token=TOKEN))
        text = b'{"type": "point", "voxel": [1, 2'
        status, answer = _raw(int(url.rsplit(":", 1)[1]), _post_head(
            f"/sessions/{sid}/prompts",
            f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\nConnection: close\r\n"), text)
        assert status == 400 and answer["error"] == "invalid_json", answer
        assert "not valid JSON" in answer["detail"] and "character" in answer["detail"], answer


def test_napari_says_a_per_client_cap_in_words_a_user_can_act_on():
    """napari passed the server's "close one (DELETE /sessions/<id>)" on as it was: advice for a program."""
    from napari_mambahome.remote import UploadCache, explain

    with running_server(_config(max_sessions_per_client=1)) as (url, _):
        uploads = UploadCache(Client(url, token=TOKEN))
        uploads.session_for(np.zeros((6, 6, 6), np.float32), np.eye(4), name="first")
        with pytest.raises(ServerError) as exc:
            uploads.session_for(np.ones((6, 6, 6), np.float32), np.eye(4), name="second")
        text = explain(exc.value, url)
        assert "holds as many images for this computer as it allows" in text and "expires" in text, text


def test_a_refused_upload_whose_send_broke_still_gets_the_servers_429(monkeypatch):
    """The server refuses a new session before reading the upload and closes the connection: the client's send
    broke (Broken pipe) and it reported "no server answered" instead of the 429 (seen in CI, timing-dependent).
    Here the send always breaks, as it does when the refusal wins the race."""
    import urllib.error
    import urllib.request

    with running_server(_config(max_sessions=4, max_sessions_per_client=1)) as (url, _app):
        client = Client(url, token=TOKEN)
        client.connect()
        _session(client)
        real = urllib.request.urlopen

        def broken_upload(req, *args, **kwargs):
            if req.get_method() == "POST" and req.full_url.split("?")[0].endswith("/sessions"):
                raise urllib.error.URLError(BrokenPipeError(32, "Broken pipe"))
            return real(req, *args, **kwargs)

        monkeypatch.setattr(urllib.request, "urlopen", broken_upload)
        with pytest.raises(ServerError) as exc:
            _session(client)
        assert exc.value.status == 429 and "--max-sessions-per-client 1" in str(exc.value)


def test_a_single_slice_is_refused_at_upload_in_every_format_with_the_way_out(tmp_path):
    # it was kept as a session, and only Segment or a prompt said it is 2D: the client held a volume it could not use
    import nibabel as nib
    import nrrd

    slice_ = np.random.default_rng(0).random((32, 24, 1), dtype=np.float32)
    nib.save(nib.Nifti1Image(slice_, np.eye(4)), str(tmp_path / "slice.nii.gz"))
    nrrd.write(str(tmp_path / "slice.nrrd"), slice_, {"space": "left-posterior-superior",
                                                      "space directions": np.eye(3), "space origin": np.zeros(3)})
    with running_server(_config()) as (url, _app):
        client = Client(url, token=TOKEN, timeout=60)
        client.connect()
        uploads = [lambda: client.create_session(slice_, np.eye(4), name="one-slice"),
                   lambda: client.upload_file(tmp_path / "slice.nii.gz"),
                   lambda: client.upload_file(tmp_path / "slice.nrrd")]
        for upload in uploads:
            with pytest.raises(ServerError) as err:
                upload()
            assert err.value.status == 400, err.value
            message = str(err.value)
            assert "single slice" in message and "whole 3D scan" in message, message
            assert "upload" not in message.split("HTTP 400:")[-1].split(":")[0], message  # named, not the temp file
        assert _session(client) is not None  # and a real volume is still taken


@pytest.mark.parametrize("route, text, key", [
    ("prompts", b'{"type": "point", "voxel": [1, 2, 3], "voxel": [7, 7, 7]}', "'voxel'"),
    ("segment", b'{"model_id": "a", "model_id": "b"}', "'model_id'"),
])
def test_a_json_key_sent_twice_is_refused_by_name_and_changes_nothing(route, text, key):
    # JSON readers keep the last value without a word: the point went where no reader of the request would look
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        sid = _session(client)
        status, answer = _raw(int(url.rsplit(":", 1)[1]), _post_head(
            f"/sessions/{sid}/{route}",
            f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\nConnection: close\r\n"), text)
        assert status == 400 and answer["error"] == "invalid_request", answer
        assert key in answer["detail"] and "more than once" in answer["detail"], answer
        assert client.object_mask(sid).revision == 0  # nothing was applied


def test_a_prompt_on_a_volume_far_finer_than_the_model_is_a_400_naming_it_not_a_500():
    # 1e-6 mm voxels (a header in the wrong unit): the prompt's window overflowed torch's storage size (500 internal);
    # at 0.05 mm it would have asked ~29 GB of the server for one click
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN, timeout=120)
        sid = client.create_session(np.random.default_rng(0).random((35, 51, 35), dtype=np.float32),
                                    np.diag([1e-6, 1e-6, 1e-6, 1.0]), name="wrong-unit").session_id
        with pytest.raises(ServerError) as err:
            client.add_point(sid, (10, 10, 10))
        assert err.value.status == 400, err.value
        assert "wrong-unit" in str(err.value) and "finer than the model's" in str(err.value), err.value


def test_a_pack_header_key_the_request_does_not_read_or_names_twice_is_refused_and_nothing_is_saved(tmp_path):
    # a misspelt "case_ID" saved the case as "upload.nifti", answered 200; "case_id" twice saved it under the second
    cases = tmp_path / "cases"
    with running_server(_config(cases_dir=cases)) as (url, _):
        client = Client(url, token=TOKEN, timeout=60)
        sid = _session(client)
        labels = np.zeros((8, 8, 8), np.uint8)
        labels[2:5, 2:5, 2:5] = 1
        meta = {"class_names": ["background", "organ"], "modality": "MR", "overwrite": False}
        sent = [(f"/sessions/{sid}/cases", pack_array(labels, {**meta, "case_ID": "my_case"}), "'case_ID'"),
                (f"/sessions/{sid}/initial-mask", pack_array(labels, {"foo": 1}), "'foo'"),
                ("/sessions?format=pack", pack_array(np.zeros((8, 8, 8), np.float32),
                                                     {"affine": np.eye(4).tolist(), "nmae": "typo"}), "'nmae'")]
        import struct

        pack = pack_array(labels, {**meta, "case_id": "dupA"})
        (n,) = struct.unpack("<I", pack[4:8])
        header = pack[8:8 + n].replace(b'"case_id": "dupA"', b'"case_id": "dupA", "case_id": "dupB"')
        twice = pack[:4] + struct.pack("<I", len(header)) + header + pack[8 + n:]
        sent.append((f"/sessions/{sid}/cases", twice, "more than once"))
        for path, body, said in sent:
            with pytest.raises(ServerError) as err:
                client._request("POST", path, body=body, content_type="application/x-mambahome-pack")
            assert err.value.status == 400 and said in str(err.value), (path, err.value)
        assert client.cases() == [] and client.object_mask(sid).revision == 0
        record = client.save_case(sid, labels, ["background", "organ"], "MR", case_id="my_case")  # as sent rightly
        assert record["case_id"] == "my_case"
