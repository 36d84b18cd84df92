"""Two clients prompting one server session: every change of the object bumps the session's revision, and a client
whose own change answers with another revision than its last + 1 is told (SessionChangedError) instead of patching a
stale mask; it catches up with object_mask. A server without revisions is not checked."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("engine.interactive")

from mambahome_client import MaskUpdate, SessionChangedError  # noqa: E402
from mambahome_client.wire import bbox_to_json, pack_array  # noqa: E402

TOKEN = "revision-token-123456"


def test_two_clients_on_one_session_are_told_when_the_other_changed_it(tmp_path, shared_data):
    from server_support import connected_client, cpu_server, echo_interactive_model

    image = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    with cpu_server(tmp_path, TOKEN) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        a, b = connected_client(url, TOKEN), connected_client(url, TOKEN)
        s = a.upload_file(image, modality="MR")
        sid = s.session_id
        mask_a = np.zeros(s.shape, bool)
        mask_b = np.zeros(s.shape, bool)

        start = b.object_mask(sid)  # B joins: the whole object (empty) and its revision
        assert start.revision == 0 and not start.mask.any() and start.mask.shape == s.shape
        start.apply(mask_b)

        u = a.add_point(sid, [10, 20, 15], model_id="echo")
        assert u.revision == 1
        u.apply(mask_a)
        assert mask_a[10, 20, 15]

        # B prompts without knowing of A's point: the server applies it, B is told instead of patching silently
        with pytest.raises(SessionChangedError) as exc:
            b.add_point(sid, [25, 30, 20], model_id="echo")
        err = exc.value
        assert (err.expected, err.revision, err.session_id) == (1, 2, sid)
        assert "another client changed session" in str(err) and err.status == 409
        assert isinstance(err.update, MaskUpdate) and err.update.revision == 2
        assert not mask_b.any()  # B's mask untouched: nothing was applied to it

        # B catches up and goes on; its own next change is then checked from there
        now = b.object_mask(sid)
        assert now.revision == 2
        now.apply(mask_b)
        assert mask_b[10, 20, 15] and mask_b[25, 30, 20]
        u = b.add_box(sid, [2, 2, 2], [5, 5, 5], model_id="echo")
        assert u.revision == 3
        u.apply(mask_b)
        np.testing.assert_array_equal(mask_b, b.object_mask(sid).mask)

        # A's undo, reset and initial mask each count as changes: A last saw 1, so its undo (revision 4) is caught
        with pytest.raises(SessionChangedError) as exc:
            a.undo(sid, model_id="echo")
        assert (exc.value.expected, exc.value.revision) == (2, 4)
        mask_a = a.object_mask(sid).mask.copy()
        assert mask_a[25, 30, 20] and not mask_a[3, 3, 3]  # B's box undone, both points kept
        init = np.zeros(s.shape, np.uint8)
        init[0:4, 0:4, 0:4] = 1
        assert a.set_initial_mask(sid, init, model_id="echo").revision == 5
        assert a.reset(sid, model_id="echo").revision == 6
        with pytest.raises(SessionChangedError):  # B last saw 3
            b.add_point(sid, [1, 1, 1], model_id="echo")

        # a refused prompt changes nothing, and its revision does not move
        with pytest.raises(Exception) as refused:
            a.add_point(sid, [999, 0, 0], model_id="echo")
        assert not isinstance(refused.value, SessionChangedError)
        assert app.state.sessions.get(sid).revision == 7
        with pytest.raises(SessionChangedError):  # A last saw 6; B's point made it 7
            a.add_point(sid, [3, 3, 3], model_id="echo")
        assert a.add_point(sid, [4, 4, 4], model_id="echo").revision == 9  # one client alone: no error
        a.close_session(sid)


def test_a_server_without_revisions_is_not_checked():
    """Answers without ``revision`` (an older server) are taken as they come, and forget what was known."""
    from mambahome_client import Client

    c = Client("http://127.0.0.1:1")
    c._revisions["s1"] = 5
    old = pack_array(np.ones((2, 2, 2), np.uint8), {"bbox": bbox_to_json((slice(0, 2),) * 3), "engine_s": 0.0})
    u = c._changed("s1", old, 0.0)
    assert u.revision is None and u.mask.all() and "s1" not in c._revisions
    new = pack_array(np.ones((2, 2, 2), np.uint8), {"bbox": bbox_to_json((slice(0, 2),) * 3), "engine_s": 0.0,
                                                    "revision": 9})
    assert c._changed("s1", new, 0.0).revision == 9  # nothing known: the first revision is taken as it is
    with pytest.raises(SessionChangedError):
        c._changed("s1", new, 0.0)  # 9 again, expected 10
