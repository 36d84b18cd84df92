"""Small requests that made a server work for minutes or take gigabytes: a scribble whose joined lines run across the
volume over and over, and a case naming a hundred thousand classes.

- A joined scribble's points are joined by straight lines, voxel by voxel, before the model runs: 100,000 points
  alternating between two corners of a 36x52x38 hippocampus (a 1.2 MB body, far under the 16 MiB JSON limit) held the
  GPU lock for 50 s and grew the server by 600 MB; the limit's 1.4 million points on a 512x512 CT ask for tens of GB.
- A case's class names are checked for repeats pair by pair: 20,000 names took 13 s, 100,000 (an 830 KB pack header)
  over 5 minutes of a CPU, during which Ctrl-C could not stop the server (its worker thread ran on).
Both are now refused at once, with a 400 saying what the limit is and what to send instead.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("engine.interactive")

from mambahome_client.client import ServerError  # noqa: E402
from server_support import connected_client, echo_server  # noqa: E402

TOKEN = "walk-server-sizes-token"
SHAPE = (64, 64, 64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with echo_server(tmp_path_factory.mktemp("walk-sizes"), TOKEN) as served:
        yield served


@pytest.fixture()
def client(server):
    return connected_client(server[0], TOKEN)


@pytest.fixture()
def session(client):
    volume = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    s = client.create_session(volume, np.eye(4), name="noise", modality="MR")
    yield s
    client.close_session(s.session_id)


def test_a_joined_scribble_running_across_the_volume_again_and_again_is_refused_at_once(client, session):
    far = [n - 1 for n in SHAPE]
    voxels = np.array([[0, 0, 0] if i % 2 == 0 else far for i in range(20001)])  # 20000 lines of 63 voxels
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        client.add_scribble(session.session_id, voxels, model_id="echo")
    assert time.monotonic() - t0 < 10
    assert err.value.status == 400 and err.value.code == "invalid_prompt", err.value
    text = str(err.value)
    assert "1260001 voxels" in text and "1048576" in text and "joined" in text, text
    # refused: the object is as it was
    assert client.object_mask(session.session_id).revision == 0


def test_scribbles_of_real_strokes_are_answered(client, session):
    stroke = np.array([[10, 10, 30], [50, 12, 30], [52, 50, 30], [12, 48, 30], [10, 10, 30]])  # drawn on a slice
    u = client.add_scribble(session.session_id, stroke, model_id="echo")
    assert u.mask.any()
    painted = np.argwhere(np.ones((64, 64, 1), bool)) + [0, 0, 40]  # a whole painted slice, as it is
    u = client.add_scribble(session.session_id, painted, joined=False, model_id="echo")
    assert u.mask.any()


def test_a_case_naming_more_classes_than_any_model_has_is_refused_at_once(client, session):
    labels = np.zeros(SHAPE, np.uint8)
    labels[20:30, 20:30, 20:30] = 1
    names = ["background"] + [f"{i:x}" for i in range(20000)]
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        client.save_case(session.session_id, labels, names, "MR", case_id="many")
    assert time.monotonic() - t0 < 10
    assert err.value.status == 400 and err.value.code == "invalid_input", err.value
    assert "20001 class names" in str(err.value) and "1000" in str(err.value), str(err.value)
    assert client.cases() == []
    rec = client.save_case(session.session_id, labels, ["background", "blob"], "MR", case_id="few")
    assert rec["class_names"] == ["background", "blob"]
