"""A painted scribble's voxels are taken as a set, not joined as a drawn line.

A scribble given as ``(N, 3)`` voxels is a drawn stroke: consecutive voxels are joined by straight lines. A painted
stroke (napari's brush, a mask) is sent as its voxels, found in raster order: joined, each row's first and last
voxel of a curved stroke were connected and the inside of a U was scribbled too (a positive one grew the object
there, a negative one erased it). ``joined=False`` keeps the voxels as they are, in the engine, over the server
(a ``"joined": false`` field) and from napari's remote backend. Checked with the deterministic echoing stand-in
network of tests/server_support.py, whose object is exactly what the prompts drew.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.interactive.prompts import make_scribble

SHAPE = (24, 24, 24)


def _u_stroke() -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[12, 4:18, 5] = m[12, 4:18, 15] = m[12, 17, 5:16] = True
    return m


def test_voxels_as_a_set_are_the_stroke_and_joined_they_fill_the_u():
    stroke = _u_stroke()
    voxels = np.argwhere(stroke)  # raster order, as a painted stroke's voxels are found
    as_set = make_scribble(voxels, SHAPE, joined=False)
    np.testing.assert_array_equal(np.unique(as_set.voxels, axis=0), voxels)
    joined = make_scribble(voxels, SHAPE)  # a drawn line through the same points, the default
    assert len(joined.voxels) > 2 * len(voxels)  # every row joined across the U
    assert [12, 10, 10] in joined.voxels.tolist() and [12, 10, 10] not in as_set.voxels.tolist()
    # a mask gives the same set
    np.testing.assert_array_equal(np.unique(make_scribble(stroke, SHAPE).voxels, axis=0), voxels)
    with pytest.raises(Exception, match="outside the volume"):
        make_scribble(np.array([[1, 2, 30]]), SHAPE, joined=False)


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from engine.server.config import ServerConfig
    from mambahome_client import Client
    from server_support import echo_interactive_model, running_server

    with running_server(ServerConfig(device="cpu")) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        c = Client(url, timeout=300)
        c.connect()
        yield c


def _object(update) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    update.apply(mask)
    return mask


def test_the_server_takes_a_painted_scribble_as_its_voxels(client):
    stroke = _u_stroke()
    volume = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    session = client.create_session(volume, np.eye(4), name="u")
    painted = _object(client.add_scribble(session.session_id, np.argwhere(stroke), model_id="echo", joined=False))
    assert painted[stroke].all() and not painted[12, 6:16, 10].any()  # the inside of the U stays out
    client.reset(session.session_id, model_id="echo")
    drawn = _object(client.add_scribble(session.session_id, np.argwhere(stroke), model_id="echo"))
    assert drawn[12, 6:16, 10].all()  # the default stays a drawn line, as older clients send it


def test_napari_remote_backend_sends_a_mask_as_its_voxels(client):
    from napari_mambahome.remote import RemotePromptBackend

    stroke = _u_stroke()
    volume = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    backend = RemotePromptBackend(client, volume, name="u remote", modality="MR", model_id="echo")
    painted = np.zeros(SHAPE, bool)
    update = backend.add_scribble(stroke)
    painted[update.bbox] = update.mask != 0
    assert painted[stroke].all() and not painted[12, 6:16, 10].any()
