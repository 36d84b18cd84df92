"""Connecting to a server, or going back to this computer, while an object is prompted ends that object (kept in its
labels, recorded as prompted), as choosing another model does; the next "Start prompting" prompts with the model the
Interactive section now shows.

Before: the section's model box changed to the server's (or back to the local) model while the object in progress
kept the old backend, so after "disconnected ...; working on this computer again" clicks still went to the server.

The server is the real ``mambahome serve`` app on 127.0.0.1 (tests/server_support.py) with its echo promptable model;
the scan is a real hippocampus MRI. Run under a virtual display:
``xvfb-run -a python -m pytest tests/test_napari_remote_prompting_switch.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("engine.interactive")

from plugin_support import (  # noqa: E402,F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import (  # noqa: E402,F401 - fixtures
    RADIUS, _centre, _idle, interactive_checkpoint, prompting,
)
from test_plugin_remote import connect, server  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.gui


def test_connecting_and_disconnecting_mid_object_moves_prompting_to_the_model_shown(
        prompting, server, qtbot, monkeypatch, notifications):
    from napari_mambahome.remote import RemoteModelEntry

    viewer, widget, panel, image, echo = prompting
    widget.session.set_modality(image, "MR")
    c = np.asarray(_centre(image))
    panel.points_layer.add(c.astype(float))  # a click, answered on this computer (GuidanceEcho)
    _idle(qtbot, panel)
    target = panel.target
    assert len(echo.made) == 1 and np.asarray(target.data)[tuple(c)] == panel.class_id

    remote = connect(qtbot, widget, monkeypatch, server[0])
    assert remote is not None
    assert isinstance(panel.model_entry, RemoteModelEntry)
    # the object in progress ended with the local model: kept, recorded, its prompt gone from the layer
    assert panel.ctx is None
    assert target.metadata["mambahome"]["interactive"]["objects"] == 1 and len(panel.points_layer.data) == 0
    assert panel.start() and panel.ctx.entry is panel.model_entry
    far = c + (0, 0, 2 * RADIUS + 3)
    panel.points_layer.add(far.astype(float))
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=120_000)
    assert len(echo.made) == 1 and remote.uploads.uploads == 1  # the server answered this click
    assert np.asarray(target.data)[tuple(far)] == panel.class_id

    widget.panel("model").device_combo.setCurrentText("auto")  # back to this computer
    qtbot.waitUntil(lambda: widget.session.remote is None, timeout=10_000)
    assert not isinstance(panel.model_entry, RemoteModelEntry)
    assert panel.ctx is None  # the server's object ended; before, clicks went on going to the server
    assert panel.start() and panel.ctx.entry is panel.model_entry
    uploads = remote.uploads.uploads
    panel.points_layer.add((c + (0, 2 * RADIUS + 3, 0)).astype(float))
    _idle(qtbot, panel)
    assert len(echo.made) == 2 and remote.uploads.uploads == uploads  # answered here again, not by the server
    assert not [m for kind, m in notifications if kind == "error"], notifications
