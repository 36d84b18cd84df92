"""A new user's hostile requests against the server (their /tmp/newuser/srv scripts), each told what the docs say.

Before the fix:
- a point prompt without ``positive`` was drawn as a positive click, though docs/SERVER.md lists the field;
- a point prompt without ``voxel`` got ``400 invalid_prompt`` ("point must be three voxel indices"), not the documented
  ``422 invalid_request`` naming the field (``body.voxel``);
- ``?modality=XRAY`` became "other" without a word (the command line prints a note for the same name);
- a model id ``/etc/passwd`` was told back as "invalid model id 'passwd'": the message's server-path naming cut the
  client's own id down to its last part;
- a pack whose affine was scaled by 1e300 was refused as "singular (axes are not independent)": its spacing
  overflowed, the axes are independent; the value is out of range.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client, ServerError  # noqa: E402
from mambahome_client.wire import PACK_MEDIA_TYPE, pack_array  # noqa: E402
from server_support import running_server  # noqa: E402

TOKEN = "newuser-token-0123456789"


def _config() -> ServerConfig:
    return ServerConfig(token=TOKEN, device="cpu", busy_wait_s=0.2, max_sessions=4)


def _session(client: Client) -> str:
    return client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="tiny").session_id


@pytest.mark.parametrize("body, missing", [
    ({"type": "point", "voxel": [1, 2, 3]}, ["positive"]),
    ({"type": "point", "positive": True}, ["voxel"]),
    ({"type": "point"}, ["voxel", "positive"]),
    ({"type": "box", "corner_a": [0, 0, 0], "positive": False}, ["corner_b"]),
    ({"type": "box", "corner_a": [0, 0, 0], "corner_b": [2, 2, 2]}, ["positive"]),
    ({"type": "scribble", "voxels": [[1, 1, 1]]}, ["positive"]),
    ({"type": "scribble", "positive": True}, ["voxels"]),
])
def test_a_prompt_missing_a_required_field_is_a_422_naming_it_and_changes_nothing(body, missing):
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        sid = _session(client)
        with pytest.raises(ServerError) as exc:
            client._request("POST", f"/sessions/{sid}/prompts", json_body=body)
        assert exc.value.status == 422 and exc.value.code == "invalid_request", (exc.value.status, str(exc.value))
        for field in missing:
            assert f"body.{field}: Field required" in str(exc.value), str(exc.value)
        assert client.object_mask(sid).revision == 0  # nothing was applied


@pytest.mark.parametrize("body, field", [
    ({"type": "point", "voxel": [1, 2], "positive": True}, "body.voxel"),
    ({"type": "point", "voxel": [1, 2, 3, 4], "positive": True}, "body.voxel"),
    ({"type": "scribble", "voxels": [], "positive": True}, "body.voxels"),
    ({"type": "point", "voxel": [1, 2, 3], "positive": None}, "body.positive"),
])
def test_a_voxel_that_is_not_three_indices_or_a_null_positive_is_a_422_naming_the_field(body, field):
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        sid = _session(client)
        with pytest.raises(ServerError) as exc:
            client._request("POST", f"/sessions/{sid}/prompts", json_body=body)
        assert exc.value.status == 422 and field in str(exc.value), (exc.value.status, str(exc.value))


def test_the_clients_send_positive_with_every_point_box_and_scribble():
    """The strict contract must not break a client: mambahome_client (which 3D Slicer's module and napari's remote
    backend prompt through) sends ``positive`` with every point, box and scribble, also by default."""
    sent = []

    class Recording(Client):
        def _prompt(self, session_id, prompt, model_id):  # noqa: ANN001 - records the body instead of sending it
            sent.append(prompt)

    c = Recording("http://127.0.0.1:1", token=TOKEN)
    c.add_point("s" * 16, (1, 2, 3))
    c.add_box("s" * 16, (0, 0, 0), (2, 2, 2))
    c.add_scribble("s" * 16, np.array([[1, 1, 1]]))
    c.add_scribble("s" * 16, np.array([[1, 1, 1]]), positive=False, joined=False)
    assert [p["positive"] for p in sent] == [True, True, True, False]


@pytest.mark.parametrize("query, pack_modality, noted", [
    ("XRAY", None, "?modality="),
    (None, "XRAY", "the pack's 'modality'"),
    ("MRI", None, None),
    ("other", None, None),
])
def test_an_unknown_modality_is_taken_as_other_and_said_in_the_answers_notes(query, pack_modality, noted):
    with running_server(_config()) as (url, app):
        client = Client(url, token=TOKEN)
        body = pack_array(np.zeros((8, 8, 8), np.float32), {"affine": np.eye(4).tolist(), "name": "tiny",
                                                             "modality": pack_modality})
        answer = client._json("POST", "/sessions", body=body, content_type=PACK_MEDIA_TYPE,
                              query={"format": "pack", "modality": query})
        notes = [n for n in answer["notes"] if "intensity rule" in n]
        if noted is None:
            assert notes == [], answer
            assert answer["modality"] in ("MR", "other")
        else:
            assert answer["modality"] == "other" and answer["modality_source"] == "client", answer
            assert len(notes) == 1 and "'XRAY'" in notes[0] and noted in notes[0] and "'other'" in notes[0], notes
            # kept with the session's volume: every segmentation's notes repeat it
            assert notes[0] in app.state.sessions.get(answer["session_id"]).source.notes


@pytest.mark.parametrize("how", ["select", "segment", "prompt"])
def test_a_model_id_that_looks_like_a_path_is_named_as_the_client_sent_it(how):
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        with pytest.raises(ServerError) as exc:
            if how == "select":
                client._request("POST", "/models/select", json_body={"model_id": "/etc/passwd"})
            elif how == "segment":
                client._request("POST", f"/sessions/{_session(client)}/segment", json_body={"model_id": "/etc/passwd"})
            else:
                client._request("POST", f"/sessions/{_session(client)}/prompts",
                                json_body={"type": "point", "voxel": [1, 1, 1], "positive": True,
                                           "model_id": "/etc/passwd"})
        assert exc.value.status == 400 and exc.value.code == "invalid_id", str(exc.value)
        assert "invalid model id '/etc/passwd'" in str(exc.value), str(exc.value)


def test_server_paths_in_a_message_are_still_named_as_clients_know_them():
    """What the client sent is kept; any other absolute path of the server is still cut to its file name."""
    from engine.server.state import ServerPaths

    paths = ServerPaths(None, None)
    assert paths.name("no model '/etc/passwd' in /srv/secret/models.txt", keep=("'/etc/passwd'",)) == \
        "no model '/etc/passwd' in models.txt"
    assert paths.name("in /srv/secret/models.txt") == "in models.txt"


def _pack_with_affine(affine_json: str) -> bytes:
    header = ('{"dtype": "<f4", "shape": [8, 8, 8], "codec": "raw", "affine": ' + affine_json + '}').encode()
    return b"MHPK" + struct.pack("<I", len(header)) + header + np.zeros((8, 8, 8), "<f4").tobytes()


@pytest.mark.parametrize("scale", [1e300, 1e12])
def test_an_affine_out_of_range_is_said_so_not_called_singular(scale):
    affine = np.eye(4)
    affine[0, 0] = scale
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        with pytest.raises(ServerError) as exc:
            client._request("POST", "/sessions", body=_pack_with_affine(json.dumps(affine.tolist())),
                            content_type=PACK_MEDIA_TYPE, query={"format": "pack"})
        text = str(exc.value)
        assert exc.value.status == 400 and "out of range" in text and "singular" not in text, text
        # an ordinary affine still opens a session
        assert _session(client)


def test_an_nrrd_upload_with_huge_space_directions_is_out_of_range(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    path = tmp_path / "big.nrrd"
    nrrd.write(str(path), np.zeros((8, 8, 8), np.float32),
               {"space": "left-posterior-superior", "space directions": np.diag([1e300, 1.0, 1.0]),
                "space origin": np.zeros(3)})
    with running_server(_config()) as (url, _):
        client = Client(url, token=TOKEN)
        with pytest.raises(ServerError) as exc:
            client.upload_file(path)
        text = str(exc.value)
        assert exc.value.status == 400 and "out of range" in text and "singular" not in text, text
