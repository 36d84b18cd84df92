"""A first "Start prompting" does not hold napari's GUI thread for all three prompt layers at once.

Making the points, boxes and scribbles layers held the GUI thread 0.5-1.3 s on the 2-core machine under Xvfb, whatever
the volume's size (napari making each layer's controls and visuals and drawing them first; pandas imported for the first
feature table). The panel now makes the layer objects in a worker and adds them one event-loop turn at a time, hidden,
each shown a turn later; the model's warm-up starts once they are in. These tests check that behaviour, not its timing
(measured in BENCHMARKS.md, "The prompt layers, one at a time", and
benchmarks/results/start-prompting-layers-2026-12-05-cpu2.md).

GUI tests run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_start_stall.py``.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, _centre, _idle, interactive_checkpoint  # noqa: F401 - fixture

NAMES = ("prompts: points", "prompts: boxes", "prompts: scribbles")


@pytest.fixture
def ready(viewer_widget, interactive_checkpoint, qtbot):
    """The dock with the CT phantom chosen and an interactive model (Echo backend), no prompt layers yet."""
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image, _ = phantom_layer(viewer, "CT", shape=(40, 48, 56))
    widget.session.set_image(image)
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    qtbot.wait(50)
    return viewer, widget, panel, image


def _prompt_layers(viewer):
    """The prompt layers in the viewer by name, without asking the panel (reading its attributes makes them)."""
    return {layer.name: layer for layer in viewer.layers if layer.name in NAMES}


@pytest.mark.gui
def test_a_first_start_makes_the_layers_in_a_worker_and_adds_them_one_turn_each(ready, qtbot, monkeypatch):
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QApplication

    from napari_mambahome.panels import interactive

    viewer, widget, panel, image = ready
    made_in = []
    real_new = interactive._new_prompt_layers
    monkeypatch.setattr(interactive, "_new_prompt_layers",
                        lambda *a: (made_in.append(threading.get_ident()), real_new(*a))[1])
    # Turns of the event loop, counted as the timer and queued-call events it delivers (each step of the staging is
    # one); a zero-interval QTimer ticking once per turn was also tried, but Qt may deliver two expired timers in one
    # pass of its dispatcher without the ticker between them, which failed this test once in CI under load
    turns = [0]

    class _Turns(QObject):
        def eventFilter(self, obj, event):
            if event.type() in (QEvent.Type.Timer, QEvent.Type.MetaCall):
                turns[0] += 1
            return False

    ticker = _Turns()
    inserted, shown = [], []

    def on_insert(event):
        layer = event.value
        inserted.append((layer.name, layer.visible, turns[0], panel.worker is None))
        layer.events.visible.connect(lambda e, n=layer.name: shown.append((n, e.source.visible, turns[0])))

    viewer.layers.events.inserted.connect(on_insert)
    cam = getattr(viewer, "scene", viewer).camera
    camera = (tuple(cam.center), cam.zoom)
    before = len(viewer.layers)
    QApplication.instance().installEventFilter(ticker)
    try:
        assert panel.start()
        # start() itself added the points layer only, shown, active in add mode: a click or T given right after Start
        # lands on it (made in the worker, it came 0.3-0.4 s later and such clicks panned the image); the model's
        # warm-up is queued, its worker not started yet
        assert len(viewer.layers) == before + 1 and [name for name, *_ in inserted] == [NAMES[0]]
        points = _prompt_layers(viewer)["prompts: points"]
        assert points.visible and points.mode == "add" and viewer.layers.selection.active is points
        assert panel.worker is None and [op.kind for op in panel.ctx.queue] == ["warm"]
        qtbot.waitUntil(lambda: len(_prompt_layers(viewer)) == 3
                        and all(layer.visible for layer in _prompt_layers(viewer).values()), timeout=30_000)
        _idle(qtbot, panel)
    finally:
        QApplication.instance().removeEventFilter(ticker)
        viewer.layers.events.inserted.disconnect(on_insert)
    # the points in the GUI thread (at once), the boxes and scribbles in a worker
    assert len(made_in) == 2 and made_in[0] == threading.get_ident() and made_in[1] != threading.get_ident()
    # then boxes, then scribbles; each added hidden, in its own turn, before the warm-up's worker started
    assert [name for name, *_ in inserted] == list(NAMES)
    assert all(not visible and no_worker for _, visible, _, no_worker in inserted[1:])
    insert_turns = [turn for *_, turn, _ in inserted]
    assert all(b > a for a, b in zip(insert_turns, insert_turns[1:]))
    # each shown in a later turn than it was added, and before the next one was added
    assert [name for name, visible, _ in shown if visible] == list(NAMES[1:])
    shown_turns = [turn for _, visible, turn in shown if visible]
    for (name, _, added, _), showed, later in zip(inserted[1:], shown_turns, insert_turns[2:] + [1e9]):
        assert added < showed <= later, name
    # stacked as they always were (bottom to top: scribbles, boxes, points), points active in add mode
    layers = _prompt_layers(viewer)
    order = [viewer.layers.index(layers[name]) for name in reversed(NAMES)]
    assert order == sorted(order)
    assert viewer.layers.selection.active is layers["prompts: points"] and layers["prompts: points"].mode == "add"
    assert (panel.points_layer, panel.boxes_layer, panel.scribbles_layer) == tuple(layers[n] for n in NAMES)
    scribbles = np.asarray(layers["prompts: scribbles"].data)
    assert scribbles.shape == np.shape(image.data) and scribbles.dtype == np.uint8 and not scribbles.any()
    assert np.array_equal(layers["prompts: points"].scale, image.scale)
    assert (tuple(cam.center), cam.zoom) == camera  # no view reset
    assert panel.ctx.ready and widget.session.image_layer is image
    # the keys work on the staged layers, and a click draws its object
    from napari.utils.key_bindings import KeyBinding

    layers["prompts: scribbles"].keymap[KeyBinding.from_str("T")](layers["prompts: scribbles"])
    assert not panel.positive and layers["prompts: scribbles"].selected_label == 2
    panel.set_positive(True)
    assert panel.add_point(np.asarray(_centre(image)))
    _idle(qtbot, panel)
    assert panel.target is not None and np.asarray(panel.target.data).any() and panel.interactions == 1


@pytest.mark.gui
def test_reading_a_prompt_layer_during_the_first_start_makes_all_three_at_once(ready, qtbot):
    viewer, widget, panel, image = ready
    assert panel.start()
    staging = panel._staging
    scribbles = panel.scribbles_layer  # as code or a test reading it at once: all three made now, shown, in place
    layers = _prompt_layers(viewer)
    assert set(layers) == set(NAMES) and scribbles is layers["prompts: scribbles"]
    assert all(layer.visible for layer in layers.values())
    assert viewer.layers.selection.active is layers["prompts: points"]
    _idle(qtbot, panel)  # the warm-up ran once they were in
    # the worker's own layer objects, answered later, are dropped: no second set
    qtbot.waitUntil(lambda: not staging.worker.is_running, timeout=30_000)
    qtbot.wait(100)  # its answer, queued to the GUI thread
    assert panel.ctx.ready and [layer.name for layer in viewer.layers].count("prompts: boxes") == 1
    assert len(_prompt_layers(viewer)) == 3 and _prompt_layers(viewer) == layers
    # a second start reuses them (no new layers)
    assert panel.start()
    _idle(qtbot, panel)
    assert _prompt_layers(viewer) == layers


@pytest.mark.gui
def test_a_click_before_the_other_layers_came_does_not_make_them_at_once(ready, qtbot, monkeypatch):
    from napari_mambahome.panels import interactive

    viewer, widget, panel, image = ready
    monkeypatch.setattr(interactive, "STAGE_GAP_MS", 400)  # time to click between two steps
    assert panel.start()
    qtbot.waitUntil(lambda: "prompts: points" in _prompt_layers(viewer), timeout=30_000)
    points = _prompt_layers(viewer)["prompts: points"]
    assert "prompts: scribbles" not in _prompt_layers(viewer)
    points.add([_centre(image)])  # the annotator's click: queued, its object's labels made
    assert panel.history == ["prompt"] and "prompts: scribbles" not in _prompt_layers(viewer)
    assert viewer.layers.selection.active is points  # the new object labels did not take the points' place
    qtbot.waitUntil(lambda: len(_prompt_layers(viewer)) == 3, timeout=30_000)
    _idle(qtbot, panel)
    assert np.asarray(panel.target.data).any() and panel.interactions == 1 and panel.ctx.ready


@pytest.mark.gui
def test_closing_the_image_while_its_prompt_layers_come_leaves_none_behind(ready, qtbot, monkeypatch):
    from napari_mambahome.panels import interactive

    viewer, widget, panel, image = ready
    monkeypatch.setattr(interactive, "STAGE_GAP_MS", 300)
    assert panel.start()
    qtbot.waitUntil(lambda: "prompts: points" in _prompt_layers(viewer), timeout=30_000)
    viewer.layers.remove(image)
    qtbot.waitUntil(lambda: panel._staging is None, timeout=30_000)  # the next staging step saw the image gone
    qtbot.wait(3 * interactive.STAGE_GAP_MS)  # any step still queued finds no staging
    assert set(_prompt_layers(viewer)) <= {"prompts: points"}  # nothing more was added for the closed image
    assert panel.ctx is None and panel._staging is None


@pytest.mark.gui
def test_closing_the_dock_while_the_prompt_layers_come_adds_no_more(ready, qtbot, monkeypatch):
    """A reviewer's find: the staging steps did not check the session, so the rest of the layers were still added
    after the dock was closed, bound to the gone panel's keys."""
    from napari_mambahome.panels import interactive

    viewer, widget, panel, image = ready
    monkeypatch.setattr(interactive, "STAGE_GAP_MS", 300)
    assert panel.start()
    qtbot.waitUntil(lambda: "prompts: boxes" in _prompt_layers(viewer), timeout=30_000)
    viewer.window.remove_dock_widget(widget)
    widget.deleteLater()
    qtbot.waitUntil(lambda: panel._staging is None, timeout=30_000)
    qtbot.wait(3 * interactive.STAGE_GAP_MS)
    assert "prompts: scribbles" not in _prompt_layers(viewer)


@pytest.mark.gui
def test_a_click_and_t_right_after_start_land_on_the_points_layer(ready, qtbot):
    """An annotator's walk: with the points layer made in the worker, for 0.3-0.4 s after Start no prompt layer took
    input: the first click panned the image, T went to the image, and the click meant as negative came as positive."""
    from napari.utils.key_bindings import KeyBinding

    viewer, widget, panel, image = ready
    assert panel.start()
    active = viewer.layers.selection.active  # no event processed since Start: what the next key or click goes to
    assert active is not None and active.name == "prompts: points" and active.mode == "add"
    active.keymap[KeyBinding.from_str("T")](active)  # T, as the viewer dispatches it to the active layer
    assert not panel.positive
    active.add([_centre(image)])  # the click, as the add mode makes it
    assert panel.history == ["prompt"]
    _idle(qtbot, panel)
    assert panel.interactions == 1 and panel.ctx.ready


@pytest.mark.gui
def test_reused_prompt_layers_come_above_a_volume_opened_after_them(ready, qtbot):
    """An annotator's walk: after prompting one volume, a second opened later lay above the reused prompt layers and
    hid their markers."""

    viewer, widget, panel, image = ready
    assert panel.start()
    _idle(qtbot, panel)
    layers = _prompt_layers(viewer)
    second, _ = phantom_layer(viewer, "CT", shape=(40, 48, 56))
    assert viewer.layers.index(second) > viewer.layers.index(layers["prompts: points"])
    widget.session.set_image(second)
    assert panel.start()
    _idle(qtbot, panel)
    assert _prompt_layers(viewer) == layers  # reused
    order = [viewer.layers.index(layers[name]) for name in reversed(NAMES)]  # scribbles, boxes, points
    assert order == sorted(order) and order[0] > viewer.layers.index(second)
    assert viewer.layers.selection.active is layers["prompts: points"]
