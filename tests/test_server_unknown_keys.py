"""Request bodies refuse keys they do not know (``422 invalid_request`` naming each), as fine-tune settings do. A
reviewer's find: ``{"model": "hip"}`` (for ``model_id``) segmented with the active model and answered 200."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "unknown-keys-token-1234"


def _post(url: str, path: str, body: dict):
    from mambahome_client.wire import PROTOCOL_VERSION

    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers={
        "X-MambaHoME-Protocol": str(PROTOCOL_VERSION), "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_mistyped_key_is_refused_by_name(tmp_path):
    from server_support import connected_client, cpu_server

    with cpu_server(tmp_path, TOKEN) as (url, _app):
        client = connected_client(url, TOKEN)
        session = client.create_session(np.zeros((16, 16, 16), np.float32), np.eye(4), name="blank")
        sid = session.session_id
        for path, body in ((f"/sessions/{sid}/segment", {"model": "hip"}),
                           (f"/sessions/{sid}/prompts", {"type": "point", "voxel": [1, 2, 3], "positive": True,
                                                        "postive": False}),
                           ("/models/select", {"model_id": "default", "extra": 1})):
            status, raw = _post(url, path, body)
            answer = json.loads(raw)
            assert status == 422 and answer["error"] == "invalid_request", (path, status, answer)
            wrong = next(k for k in body if k in ("model", "postive", "extra"))
            assert wrong in answer["detail"], answer
        # the same requests without the stray key still work
        status, _ = _post(url, f"/sessions/{sid}/segment", {})
        assert status == 200
