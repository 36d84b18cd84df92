"""Review 2026-12-06b: the Slicer module's catch-up after a prompt given up (:data:`PROMPT_TIMEOUT_S`).

``_catch_up`` forgot the given-up prompt before reading the server's object: when that read failed (a resumed server
still busy working off the given-up prompt answers 503 after its ``--busy-wait``; a tunnel restarted refuses the
connection), the next Send did not catch up, and the late answer came back as the false "Another client changed this
object" reload the catch-up exists to avoid."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import load_module, slicer  # noqa: F401 - skips first
from test_slicer_walk5_hung_server import (SHORT_S, TOKEN, _click, scene_logic, server, server_process,  # noqa: F401
                                           settle, stop, timed)


def test_a_failed_catch_up_is_tried_again_at_the_next_prompt(server, scene_logic):
    from mambahome_client import BusyError, Client

    mod, logic, volume, seg, plus = scene_logic
    _click(plus, [3, 4, 5])
    logic.prompt_points(volume, seg, plus, None)
    sid = logic.session_for(volume).session_id

    stop(server, logic)
    _click(plus, [20, 15, 2])
    box, _ = timed(SHORT_S + 15, logic.prompt_points, volume, seg, plus, None)
    assert isinstance(box.get("error"), mod.PromptTimeoutError), box
    server["resume"]()
    settle(Client(server["url"], token=TOKEN), sid)  # the resumed server applied the given-up point

    # the next Send: the server is still busy with the late prompt (503 after its --busy-wait) when the object is read
    real = logic.client.object_mask

    def busy(session_id):
        logic.client.object_mask = real
        raise BusyError("GET /object: HTTP 503: the session is busy", status=503, code="busy")

    logic.client.object_mask = busy
    with pytest.raises(BusyError):
        logic.prompt_points(volume, seg, plus, None)
    assert logic.client.object_mask is real  # the failed read was the catch-up's

    box, _ = timed(60, logic.prompt_points, volume, seg, plus, None)
    assert "result" in box, box
    notice = logic.take_notice() or ""
    assert "Another client" not in notice, notice
    assert "answered a prompt it had not answered in time after all" in notice, notice
    np.testing.assert_array_equal(logic.mask, Client(server["url"], token=TOKEN).object_mask(sid).mask)
