"""A server holding its maximum of sessions answers a new upload with 503 before reading and decoding it (a 2 GiB
upload was read, inflated and decoded only to be refused at the end). A real server on localhost."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "full-server-token-123456"


def _post(url: str, body: bytes) -> tuple:
    req = urllib.request.Request(f"{url}/sessions?format=nifti", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_server_refuses_an_upload_as_busy_before_decoding_it(tmp_path):
    with cpu_server(tmp_path, TOKEN, max_sessions=1) as (url, _app):
        garbage = b"not a NIfTI file at all" * 100
        status, answer = _post(url, garbage)
        assert status == 400 and answer["error"] == "invalid_input", answer  # with room: decoded and refused
        client = connected_client(url, TOKEN)
        held = client.create_session(np.zeros((8, 9, 10), np.float32), np.eye(4), name="held")
        status, answer = _post(url, garbage)
        # full: refused as busy, so the bytes were never decoded (they would have been a 400 above)
        assert status == 503 and answer["error"] == "busy" and "maximum of 1 sessions" in answer["detail"], answer
        client.close_session(held.session_id)
        status, answer = _post(url, garbage)
        assert status == 400, answer  # room again
