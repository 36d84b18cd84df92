"""Closing a session while the server segments it stops the segmentation at its next check: the GPU is free for the
other clients at once (it was held for the whole run, 71 s of a CT on a CPU, every other client answered "busy
(segmenting session X)" naming a session that no longer existed), and the closed session's request gets a 404 saying
so. A real server on localhost; the prediction is replaced by one that only waits for its cancel."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client, NotFoundError  # noqa: E402
from server_support import running_server  # noqa: E402

TOKEN = "close-token-0123456789"


def test_closing_a_session_stops_its_segmentation_and_frees_the_gpu(monkeypatch):
    import engine.inference
    from engine.progress import check

    started = threading.Event()

    def slow_predict(self, volume, modality=None, progress=None, cancel=None, return_probabilities=False):
        started.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # a long segmentation: a window at a time
            check(cancel)
            time.sleep(0.05)
        raise AssertionError("the segmentation was not stopped")

    monkeypatch.setattr(engine.inference.Predictor, "predict", slow_predict)
    with running_server(ServerConfig(token=TOKEN, device="cpu", busy_wait_s=0.2)) as (url, app):
        client = Client(url, token=TOKEN)
        sid = client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="tiny").session_id
        other = client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="other").session_id
        answer = {}

        def segment():
            try:
                client.segment(sid)
            except Exception as exc:  # noqa: BLE001 - what the closed session's client is told
                answer["error"] = exc

        worker = threading.Thread(target=segment)
        worker.start()
        assert started.wait(60)
        t0 = time.monotonic()
        client.close_session(sid)
        worker.join(30)
        assert not worker.is_alive() and time.monotonic() - t0 < 10
        error = answer.get("error")
        assert isinstance(error, NotFoundError), answer
        assert "was closed while it was being segmented" in str(error) and "nothing was kept" in str(error)
        assert app.state.gpu.holder is None and client.health()["status"] == "ok"
        # the other session is served: the lock is free (its own prediction is the stand-in too: stopped by closing)
        started.clear()
        worker = threading.Thread(target=lambda: answer.update(other=_segment_quietly(client, other)))
        worker.start()
        assert started.wait(30)  # it got the GPU, not a 503 busy
        client.close_session(other)
        worker.join(30)
        assert isinstance(answer["other"], NotFoundError)


def _segment_quietly(client, sid):
    try:
        return client.segment(sid)
    except Exception as exc:  # noqa: BLE001
        return exc
