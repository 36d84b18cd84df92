"""A volume over a real server's --max-voxels: the napari user is told about voxels and --max-voxels, not the
upload size (--max-upload-mb would not help)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from napari_mambahome.remote import explain  # noqa: E402
from tests.server_support import connected_client, cpu_server  # noqa: E402


def test_a_volume_over_the_servers_voxel_limit_names_voxels_and_max_voxels(tmp_path):
    with cpu_server(tmp_path, "secret-token-1", max_voxels=1000) as (url, _):
        client = connected_client(url, "secret-token-1")
        with pytest.raises(Exception) as caught:
            client.create_session(np.zeros((12, 10, 10), np.int16), np.eye(4), name="ct")
    text = explain(caught.value, url)
    assert "more voxels than the server" in text and "--max-voxels" in text and "1200 voxels" in text
    assert "--max-upload-mb" not in text
