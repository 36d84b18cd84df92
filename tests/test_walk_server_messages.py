"""An endpoint a message names is told as it is: the server-path scrubber cut "POST /sessions/<id>/prompts" to
"POST prompts" (the last part of what looked like an absolute path), so a Slicer or script user asking a promptable
model to segment was pointed to an endpoint that does not exist."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mambahome_client.client import ServerError  # noqa: E402
from server_support import connected_client, cpu_server  # noqa: E402

TOKEN = "walk-server-messages-token"


def test_the_refusal_to_segment_with_a_promptable_model_names_the_prompts_endpoint(tmp_path):
    with cpu_server(tmp_path, TOKEN) as (url, _):
        client = connected_client(url, TOKEN)
        s = client.create_session(np.zeros((8, 8, 8), np.float32), np.eye(4), name="zeros")
        with pytest.raises(ServerError) as err:
            client.segment(s.session_id, model_id="interactive")
        assert err.value.status == 400 and err.value.code == "not_segmentation", err.value
        assert f"(POST /sessions/{s.session_id}/prompts)" in str(err.value), str(err.value)
