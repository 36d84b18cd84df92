"""A prompt session normalises its image by the modality the user gave for it.

Before: the server built a session's promptable model on the uploaded volume without the session's modality (the
client's ``?modality=``), so a CT declared as such was normalised by the model's default rule (MR percentiles for
the bundled model) for prompts while Segment windowed it in Hounsfield units. (The napari side of the same rule:
tests/test_annotator_walk_mri.py.)
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client  # noqa: E402
from server_support import running_server  # noqa: E402


@pytest.mark.parametrize("declared", ["CT", "MR"])
def test_a_server_prompt_session_uses_the_modality_the_client_declared(shared_data, monkeypatch, declared):
    from engine.interactive.session import InteractiveSession

    used = []
    normalize = InteractiveSession._normalize

    def recording(data, metadata, modality):
        used.append(modality)
        return normalize(data, metadata, modality)

    monkeypatch.setattr(InteractiveSession, "_normalize", staticmethod(recording))
    with running_server(ServerConfig(device="cpu")) as (url, _app):
        client = Client(url, timeout=300)
        client.connect()
        s = client.upload_file(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz", modality=declared)
        client.add_point(s.session_id, [d // 2 for d in s.shape])
    assert used == [declared]
