"""A refused prompt changes nothing, also when it names another promptable model than the session's object: the
server started the new model's object before it checked the prompt, so a point outside the volume (or a flat box, a
broken initial mask) sent with another model dropped the current object's history. A real server on localhost with
two deterministic promptable stand-ins (``tests/server_support.py``)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("engine.interactive")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client, ServerError, pack_array  # noqa: E402
from server_support import echo_interactive_model, running_server  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with running_server(ServerConfig(device="cpu")) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        app.state.models.add_in_memory("fill", *echo_interactive_model(fill=True))
        c = Client(url, timeout=300)
        c.connect()
        yield c


def full_mask(updates, shape):
    mask = np.zeros(shape, bool)
    for u in updates:
        u.apply(mask)
    return mask


def refused(call, status=400):
    with pytest.raises(ServerError) as err:
        call()
    assert err.value.status == status, err.value
    return err.value


def test_a_refused_prompt_naming_another_model_keeps_the_current_object(client):
    shape = (24, 24, 24)
    s = client.create_session(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4), name="vol")
    sid = s.session_id
    first = client.add_point(sid, (5, 5, 5), model_id="echo")
    after_first = full_mask([first], shape)
    second = client.add_point(sid, (15, 15, 15), model_id="echo")
    assert second.model_id == "echo" and full_mask([first, second], shape).sum() > after_first.sum()

    assert "lies outside the volume" in str(refused(lambda: client.add_point(sid, (99, 5, 5), model_id="fill")))
    assert "zero size" in str(refused(lambda: client.add_box(sid, (3, 3, 3), (3, 3, 3), model_id="fill")))
    assert "lies outside" in str(refused(lambda: client.add_scribble(sid, np.array([[1, 2, 30]]), model_id="fill")))
    nan_mask = pack_array(np.full(shape, np.nan, np.float32), {"model_id": "fill"})
    with pytest.raises(ServerError) as err:
        client._request("POST", f"/sessions/{sid}/initial-mask", body=nan_mask,
                        content_type="application/x-mambahome-pack")
    assert err.value.status == 400 and "NaN" in str(err.value)

    # the echo object still has both points: Undo takes back the second, and the mask is the first's again
    undo = client.undo(sid, model_id="echo")
    assert undo.model_id == "echo"
    mask = full_mask([first, second], shape)
    undo.apply(mask)
    assert np.array_equal(mask, after_first)
    again = client.undo(sid, model_id="echo")
    again.apply(mask)
    assert not mask.any()
    refused(lambda: client.undo(sid, model_id="echo"))  # nothing left: the history was the echo object's two points

    # a valid prompt with the other model still starts its own object
    fill = client.add_point(sid, (5, 5, 5), model_id="fill")
    assert fill.model_id == "fill" and fill.mask.sum() > first.mask.sum()
    client.close_session(sid)
