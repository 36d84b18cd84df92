"""The server tells its client what ``predict`` tells a command-line user of its input: a blank volume, and a label
map uploaded as the image (both came back with ``warnings: []``; the blank-image warning went to the server's log
only). Said, not refused. A real server on localhost, the bundled model."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.server.config import ServerConfig  # noqa: E402
from mambahome_client import Client  # noqa: E402
from server_support import running_server  # noqa: E402

TOKEN = "doubts-token-0123456789"


def test_a_blank_volume_and_a_label_map_are_said_and_a_scan_is_not():
    rng = np.random.default_rng(0)
    blank = np.zeros((32, 32, 32), np.float32)
    mask = np.zeros((32, 32, 32), np.int16)
    mask[8:20, 8:20, 8:20], mask[20:28, 10:18, 12:22] = 1, 2
    scan = rng.normal(100.0, 30.0, (32, 32, 32)).astype(np.float32)
    with running_server(ServerConfig(token=TOKEN, device="cpu")) as (url, _app):
        client = Client(url, token=TOKEN)

        def warnings_of(data, name):
            sid = client.create_session(data, np.diag([1.5, 1.5, 2.0, 1.0]), name=name, modality="CT").session_id
            try:
                return client.segment(sid).warnings
            finally:
                client.close_session(sid)

        said = warnings_of(blank, "blank.nii.gz")
        assert any("blank.nii.gz is blank: every voxel is 0" in w for w in said), said
        said = warnings_of(mask, "mask.nii.gz")
        assert any("mask.nii.gz looks like a label map" in w and "the mask rather than the scan" in w
                   for w in said), said
        said = warnings_of(scan, "scan.nii.gz")
        assert not [w for w in said if "blank" in w or "label map" in w], said
