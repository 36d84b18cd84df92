"""An annotator's walk on real hippocampus MRI scans: the prompt layers go with the scan they were on.

After the scan being prompted was closed (the layer list's delete), the three ``prompts:`` layers stayed in the layer
list, on the closed scan's grid (the viewer's sliders kept spanning its extent) and under the next scan opened, until
Start prompting moved them. Now they are removed with the scan, one a turn of the event loop, while the object drawn
stays in its labels (kept as accepted, as before); the next Start makes new ones on the next scan.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk2_prompt_layers_closed_scan.py``. The real
volumes are found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without them. Prompts
go through the deterministic stand-in network of tests/test_plugin_interactive.py (``Echo``).

napari 0.9.2 under Xvfb (Mesa) can segfault when the only image is removed while one Points/Labels layer remains and
an image is then added (in its GL draw, plugin or not). The walk here opens the next scan before closing the one
prompted on, as an annotator going through a list does, so no test here depends on that crash not happening.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, _idle, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui

NAMES = ("prompts: points", "prompts: boxes", "prompts: scribbles")


def _prompt_layers(viewer):
    """The prompt layers in the viewer by name (without asking the panel: reading its attributes makes them)."""
    return [layer for layer in viewer.layers if layer.name in NAMES]


def _scans(shared_data):
    return sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))


@pytest.fixture
def prompted(viewer_widget, interactive_checkpoint, shared_data, qtbot):
    """The first hippocampus scan prompted on (one object drawn, accepted with Enter), the next scan already open."""
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    first = viewer.open(str(_scans(shared_data)[0]), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    qtbot.waitUntil(lambda: len(_prompt_layers(viewer)) == 3 and panel._staging is None, timeout=30_000)
    _idle(qtbot, panel)
    centre = np.asarray([s // 2 for s in np.shape(first.data)], float)
    panel.points_layer.add(centre)  # as a click does
    _idle(qtbot, panel)
    labels = panel.target
    assert labels is not None and np.asarray(labels.data).any()
    assert panel.accept_object()  # Enter
    second = viewer.open(str(_scans(shared_data)[1]), plugin="napari-mambahome")[0]
    widget.session.set_image(first)  # the annotator looks at the first scan once more before closing it
    qtbot.wait(50)
    return viewer, widget, panel, first, second, labels


def test_closing_the_scan_removes_its_prompt_layers_and_keeps_its_object(prompted, qtbot, notifications):
    viewer, widget, panel, first, second, labels = prompted
    drawn = np.array(labels.data, copy=True)
    viewer.layers.remove(first)  # the layer list's delete
    qtbot.waitUntil(lambda: not _prompt_layers(viewer), timeout=10_000)
    assert [layer.name for layer in viewer.layers] == [labels.name, second.name]  # nothing of the scan's prompting
    assert labels in viewer.layers  # the object stays as drawn: nothing the annotator made is lost
    np.testing.assert_array_equal(np.asarray(labels.data), drawn)
    assert panel.objects_accepted == 1 and panel.ctx is None
    assert not [m for s, m in notifications if s == "error"], notifications
    # the viewer's extent is the open layers' again, not stretched by layers on the closed scan's grid
    extent = viewer.layers.extent.world
    spans = [layer.extent.world for layer in (labels, second)]
    np.testing.assert_allclose(extent[0], np.min([s[0] for s in spans], axis=0))
    np.testing.assert_allclose(extent[1], np.max([s[1] for s in spans], axis=0))

    # the next scan: Start makes the prompt layers on its grid, above it, and a click draws into its own labels
    widget.session.set_image(second)
    assert panel.start()
    qtbot.waitUntil(lambda: len(_prompt_layers(viewer)) == 3 and panel._staging is None, timeout=30_000)
    _idle(qtbot, panel)
    names = [layer.name for layer in viewer.layers]
    assert min(names.index(n) for n in NAMES) > names.index(second.name)
    for layer in _prompt_layers(viewer):
        np.testing.assert_allclose(layer.scale, second.scale)
        np.testing.assert_allclose(layer.translate, second.translate)
    centre = tuple(s // 2 for s in np.shape(second.data))
    panel.points_layer.add(np.asarray(centre, float))
    _idle(qtbot, panel)
    assert panel.target is not labels and panel.target.name == f"{second.name} labels"
    assert np.asarray(panel.target.data)[centre] == panel.class_id
    np.testing.assert_array_equal(np.asarray(labels.data), drawn)
    assert not [m for s, m in notifications if s == "error"], notifications


def test_the_prompt_layers_go_one_a_turn_without_napari_collecting_the_whole_heap(prompted, qtbot, monkeypatch):
    """napari runs a full ``gc.collect()`` at each layer removal: 0.6 s per layer over the heap of a session that
    imported torch (measured here: the three went in 1.8 s of GUI thread). The layers are removed one a turn of the
    event loop, each with the collector's heap frozen, so napari's collection walks almost nothing."""
    viewer, widget, panel, first, second, labels = prompted
    from qtpy.QtCore import QTimer

    removals = []  # (name, frozen objects while napari removed it, seconds)
    real_remove = type(viewer.layers).remove

    def remove(layers, layer):
        if layer.name not in NAMES:
            return real_remove(layers, layer)
        start = time.perf_counter()
        frozen = gc.get_freeze_count()
        real_remove(layers, layer)
        removals.append((layer.name, frozen, time.perf_counter() - start, turns[0]))
        return None

    turns = [0]
    gaps = []
    last = [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now
        turns[0] += 1

    ticker = QTimer()
    ticker.setInterval(0)
    ticker.timeout.connect(tick)
    monkeypatch.setattr(type(viewer.layers), "remove", remove)
    viewer.layers.remove(first)  # napari's own removal of the image (its gc.collect included) is not timed
    last[0] = time.perf_counter()
    ticker.start()
    try:
        qtbot.waitUntil(lambda: not _prompt_layers(viewer), timeout=10_000)
        qtbot.wait(50)
    finally:
        ticker.stop()
    assert [name for name, *_ in removals] == list(NAMES)  # the points first: the one that takes clicks
    assert all(frozen > 0 for _, frozen, *_ in removals), removals  # napari's gc.collect skips the frozen heap
    assert gc.get_freeze_count() == 0  # and nothing stays frozen after
    assert len({turn for *_, turn in removals}) == 3  # one a turn: napari answers between them
    print("prompt layer removals (s):", [round(seconds, 3) for _, _, seconds, _ in removals],
          "longest event-loop gap (s):", round(max(gaps), 3))
    # how long each removal took is printed, not asserted: timings do not belong in CI (BENCHMARKS.md measures them)
