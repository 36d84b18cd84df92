"""napari's remote prompting when another client changed the same server object meanwhile: the answer is not a
patch of the stale mask; the whole object is fetched from the server and the annotator is told."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("engine.interactive")

TOKEN = "changed-token-123456"


def test_a_prompt_after_another_clients_change_shows_the_servers_whole_object(tmp_path, shared_data):
    from engine.io import load_volume
    from napari_mambahome.remote import RemotePromptBackend
    from server_support import connected_client, cpu_server, echo_interactive_model

    volume = load_volume(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    with cpu_server(tmp_path, TOKEN) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        backend = RemotePromptBackend(connected_client(url, TOKEN), volume, name="hippo", modality="MR",
                                      model_id="echo")
        mask = np.zeros(volume.shape, np.uint8)
        first = backend.add_point([10, 20, 15])
        mask[first.bbox] = first.mask
        assert first.note is None and mask[10, 20, 15]

        other = connected_client(url, TOKEN)  # a second annotator (Slicer) on the same session
        other.object_mask(backend._session_id)
        other.add_point(backend._session_id, [25, 30, 20], model_id="echo")

        answer = backend.add_point([5, 6, 7])
        assert answer.note and "another client changed this object" in answer.note
        assert answer.mask.shape == volume.shape  # the whole object, not a patch of the stale one
        mask[answer.bbox] = answer.mask
        assert mask[10, 20, 15] and mask[25, 30, 20] and mask[5, 6, 7]
        np.testing.assert_array_equal(mask, other.object_mask(backend._session_id).mask.astype(np.uint8))

        after = backend.add_point([3, 3, 3])  # counting goes on from the server's revision: no note again
        assert after.note is None
