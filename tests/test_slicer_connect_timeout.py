"""**Connect** in the 3D Slicer module, and its other quick requests, against a server that takes the connection and
never answers (a process stopped with ``kill -STOP``, a dead SSH tunnel that still accepts connections, another program
on the port).

Found in review: Connect ran off the GUI thread, but waited for the client's 600 s: "Connecting..." for ten minutes.
Now Connect, the model list, a model's selection and roll back, and a fine-tune job's state and cancel give up after
the module's :data:`CHECK_TIMEOUT_S`, Connect with a message naming the URL and what to check; uploads, Segment and the
start of a fine-tune keep the long timeout.

A real listening socket that never answers (the kernel completes the TCP handshake from its backlog), a short limit
set on the module as loaded; a live server for the connection that must be kept.
"""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import load_module, slicer  # noqa: F401 - skips first

from server_support import echo_server  # noqa: E402
from test_slicer_walk5_hung_server import silent_server, timed  # noqa: E402

TOKEN = "slicer-connect-timeout"
SHORT_S = 1.0


def test_connect_to_a_server_that_never_answers_gives_up_at_the_check_timeout_and_keeps_the_connection(tmp_path):
    """Connected to a working server, the user presses Connect for a dead tunnel's port: after the short limit (not 600
    s) an error names the URL, says the server did not answer in that time and what to check; the working connection
    and its sessions stay as they were."""
    from mambahome_client.client import ServerTimeoutError, ServerUnavailableError

    mod = load_module()
    stated = getattr(mod, "CHECK_TIMEOUT_S", None)
    mod.CHECK_TIMEOUT_S = SHORT_S  # read at each Connect
    with echo_server(tmp_path, TOKEN) as (url, _), silent_server() as dead:
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        working = logic.client
        session = working.create_session(np.zeros((8, 8, 8), np.int16), np.eye(4))
        logic._sessions["vol"] = (session, ("stamp",), None)

        box, elapsed = timed(20, logic.connect, dead.replace("http://", ""), TOKEN)  # typed without http://
        err = box.get("error")
        assert isinstance(err, ServerTimeoutError) and isinstance(err, ServerUnavailableError), box
        assert SHORT_S - 0.1 <= elapsed < SHORT_S + 4, elapsed
        text = str(err)
        assert text.startswith(f"Connect: {dead} took the connection but did not answer within {SHORT_S:g} s"), text
        assert "mambahome serve" in text and "kill -STOP" in text and "SSH tunnel" in text, text
        assert f"the connection to {url} is kept" in text, text
        assert logic.client is working and "vol" in logic._sessions  # nothing of the working connection changed
        assert logic.models()["models"]
        assert working.check_timeout == SHORT_S and working.prompt_timeout == mod.PROMPT_TIMEOUT_S
        assert working.timeout == 600.0  # Segment of a whole volume, uploads: as long as before
    assert stated is not None and 5 <= stated <= 15  # the module's own limit: a few times a working server's slowest


def test_the_quick_requests_of_a_connection_whose_server_stopped_answering_give_up_at_the_check_timeout(tmp_path):
    """Connected, then the tunnel dies (the client's URL now reaches a port that never answers): the model list, a
    model's selection and roll back, a job's state and its cancel each give up after the short limit; Segment and the
    start of a fine-tune wait the long one."""
    from mambahome_client.client import ServerTimeoutError

    mod = load_module()
    mod.CHECK_TIMEOUT_S = SHORT_S
    with echo_server(tmp_path, TOKEN) as (url, _), silent_server() as dead:
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.client.timeout = 6.0  # the long limit, shortened for the test
        logic.client.url = dead
        quick = [logic.models, logic.prompt_models, lambda: logic.select_model("echo"), logic.rollback_model,
                 lambda: logic.finetune_state("job1"), lambda: logic.cancel_finetune("job1"), logic.client.health]
        for call in quick:
            box, elapsed = timed(20, call)
            assert isinstance(box.get("error"), ServerTimeoutError), box
            assert SHORT_S - 0.1 <= elapsed < SHORT_S + 3, elapsed
            assert f"{dead} did not answer within {SHORT_S:g} s" in str(box["error"])
        for call in (lambda: logic.segment_session("s1"), lambda: logic.start_finetune(10)):
            box, elapsed = timed(30, call)
            assert isinstance(box.get("error"), ServerTimeoutError) and elapsed >= 5.9, (box, elapsed)
