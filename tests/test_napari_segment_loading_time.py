"""The status line after Segment says the time spent loading the model beside the prediction's own time: the first
Segment of a model waited ~6 s for loading and then said "in 0.4 s", which read as if the wait were something else.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_segment_loading_time.py``.
"""
from __future__ import annotations

import re
import time

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
    wait_job,
)

pytestmark = pytest.mark.gui


def test_the_first_segment_says_how_long_loading_the_model_took(viewer_widget, tiny_checkpoint, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    session, segment = widget.session, widget.panels["segment"]
    session.select_model(next(e for e in session.entries if e.path == tiny_checkpoint))
    layer, _ = phantom_layer(viewer)
    segment.image_combo.setCurrentText(layer.name)
    loaded = []
    predictor = session.predictor

    def slow_first_load(entry, device):  # a real load, made as slow as a big checkpoint's on a laptop the first time
        if not loaded:
            time.sleep(0.6)
        loaded.append(entry)
        return predictor(entry, device)

    monkeypatch.setattr(session, "predictor", slow_first_load)
    said = status_messages(widget)
    assert segment.segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    [first] = [m for m in said if " s on cpu" in m]
    match = re.search(r"in [0-9.]+ s on cpu \(after ([0-9.]+) s loading the model\)", first)
    assert match and float(match.group(1)) >= 0.6, first

    said.clear()
    assert segment.segment() is not None
    assert wait_job(qtbot, widget).outcome == "done"
    [second] = [m for m in said if " s on cpu" in m]
    assert "loading" not in second, second  # loaded already: nothing to add
