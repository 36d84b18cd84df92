"""A case saved on a remote server marks the napari labels layer as saved, as a local case and napari's writer do,
and only once the server confirmed it: before, removing those labels after a remote save warned of "unsaved edits",
and a refused save must not claim they are saved.

The server is the real ``mambahome serve`` app on 127.0.0.1 (tests/server_support.py); the scan is the real abdomen
MRI. Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_remote_saved_marker.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plugin_support import (  # noqa: E402,F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_remote import _open, connect, mr_path, server  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.gui


def _labels(viewer, image, names, name):
    from napari_mambahome._geometry import layer_geometry

    painted = np.zeros(image.data.shape, np.uint8)
    painted[5:9, 20:40, 30:60] = 1
    return viewer.add_labels(painted, name=name, scale=image.scale, translate=image.translate,
                             metadata={"mambahome": {**layer_geometry(image).layer_metadata(), "class_names": names,
                                                     "edited": True}})  # drawn by the annotator: work to keep


def test_a_case_saved_on_the_server_marks_the_labels_saved_and_a_refused_one_does_not(
        viewer_widget, server, qtbot, monkeypatch, mr_path, notifications):
    viewer, widget = viewer_widget
    session = widget.session
    image = _open(viewer, mr_path)
    connect(qtbot, widget, monkeypatch, server[0])
    labels = _labels(viewer, image, ["background", "organ"], "mine")
    session.set_labels(labels)
    job = widget.panel("cases").save_case()
    assert job is not None and wait_job(qtbot, widget).outcome == "done"
    saved = labels.metadata["mambahome"].get("saved")
    case_id = session.remote.cases[-1]["case_id"]
    assert saved == f"case {case_id} on the server {server[0]}", saved
    viewer.layers.remove(labels)
    qtbot.wait(50)
    removed = [m for _, m in notifications if "Restore removed mask" in m and "'mine'" in m]
    assert removed and "saved as case" in removed[-1] and "unsaved" not in removed[-1], notifications

    # the server refuses a case whose classes clash with its saved ones: the labels are not marked saved
    other = _labels(viewer, image, ["background", "liver"], "other")
    session.set_labels(other)
    job = widget.panel("cases").save_case()
    assert job is not None and wait_job(qtbot, widget).outcome == "error"
    assert "saved" not in other.metadata["mambahome"]
