"""The Interactive section's keys follow its buttons, and closing napari while work runs is prompt.

Keys: Accept object (Enter/N) and Undo prompt (Ctrl+Z) are greyed out while nothing is being prompted (before
"Start prompting", after prompting ended), yet their keys, in the dock and on the prompt layers, still reached the
actions ("nothing to accept: start prompting first"). A key now acts exactly when its button can be pressed; when it
cannot, it only says why, in the words of the greyed button's tooltip. T (Toggle +/-) is never greyed out: its key
always acts.

Close: the dock's close waited up to 2 s on the GUI thread for a running Segment job or prompt prediction to stop
(neither stops inside a model call: a sliding window, a prompt's forward pass), so the window took 2.6-3.4 s to go.
The close now asks them to stop and waits at most a moment; a worker that ends after the close changes nothing and
raises nothing.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_keys_and_close.py``. Prompts go through
the deterministic stand-in network of tests/test_plugin_interactive.py (``Echo``).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, interactive_checkpoint, write_interactive_checkpoint  # noqa: F401

pytestmark = pytest.mark.gui

DOCK_KEYS = {"T": "mode_button", "Ctrl+Z": "undo_button", "Return": "next_button", "Enter": "next_button",
             "N": "next_button"}
"""Every shortcut of the Interactive dock section, and the button whose action it takes (Qt's "Enter" is the keypad's
key: Return alone left an annotator's keypad Enter doing nothing)."""
LAYER_KEYS = {"T": "mode_button", "Control-Z": "undo_button", "Enter": "next_button", "N": "next_button",
              "Control-Shift-Z": None}
"""Every key the section binds on its prompt layers (napari names), and the button whose action it takes (redo has no
button: with nothing being prompted it must change nothing)."""


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(20)


def _dock_shortcuts(panel):
    from qtpy.QtGui import QKeySequence, QShortcut

    shortcuts = {shortcut.key().toString(): shortcut for shortcut in panel.findChildren(QShortcut)}
    assert set(shortcuts) == set(DOCK_KEYS), "a key the test does not know: map it to its button above"
    assert all(shortcuts[key].key() == QKeySequence(key) for key in DOCK_KEYS)
    return shortcuts


def _layer_keys(layer):
    from napari.utils.key_bindings import KeyBinding

    bound = {str(key) for key in layer.keymap}
    expected = {str(KeyBinding.from_str(key)): key for key in LAYER_KEYS}
    assert bound == set(expected), (bound, "a key the test does not know: map it to its button above")
    return {expected[str(key)]: action for key, action in layer.keymap.items()}


def _state(panel):
    points = len(panel._points_layer.data) if panel._points_layer is not None else 0
    return panel.positive, list(panel.history), panel.objects_accepted, points


def _press_greyed(panel, widget, key, press, button):
    """Press ``key`` (``press()``) while ``button`` is greyed out: nothing changes, and the status line only says why
    the button is greyed out (its tooltip)."""
    before = _state(panel)
    said = status_messages(widget)
    press()
    assert _state(panel) == before, f"{key} acted while '{button.text()}' is greyed out"
    assert all(button.toolTip() in message for message in said), (key, said, button.toolTip())


def _keys_follow_buttons(panel, widget, presses):
    """Each key of ``presses`` (key -> (press, button)): a greyed-out button's key does nothing; T, never greyed out,
    flips the mode."""
    for key, (press, button) in presses.items():
        if button is None:
            before = _state(panel)
            press()
            assert _state(panel) == before, f"{key} acted with nothing being prompted"
        elif button is panel.mode_button:
            assert button.isEnabled()
            positive = panel.positive
            press()
            assert panel.positive is not positive, f"{key} did not toggle the mode"
            panel.set_positive(True)
        else:
            assert not button.isEnabled()
            _press_greyed(panel, widget, key, press, button)


def test_keys_do_nothing_while_their_buttons_are_greyed_out(viewer_widget, interactive_checkpoint, qtbot,
                                                            tmp_path):
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    image, _ = phantom_layer(viewer)
    shortcuts = _dock_shortcuts(panel)
    dock = {key: (shortcuts[key].activated.emit, getattr(panel, name)) for key, name in DOCK_KEYS.items()}

    # before Start: only the dock's shortcuts exist (no prompt layers yet)
    _keys_follow_buttons(panel, widget, dock)

    # prompting: the keys act as their buttons do
    assert panel.start()
    _idle(qtbot, panel)
    layer_keys = _layer_keys(panel.points_layer)
    assert all(getattr(panel, name).isEnabled() for name in DOCK_KEYS.values())
    centre = np.asarray([int(n) // 2 for n in np.shape(image.data)])
    assert panel.add_point(centre)
    _idle(qtbot, panel)
    layer_keys["Control-Z"](panel.points_layer)
    _idle(qtbot, panel)
    assert panel.interactions == 0 and not np.asarray(panel.target.data).any()  # undone
    assert panel.add_point(centre)
    _idle(qtbot, panel)
    dock["N"][0]()
    _idle(qtbot, panel)
    assert panel.objects_accepted == 1 and panel.interactions == 0  # accepted

    # prompting ended by a model change: the prompt layers stay, with their keys, and the buttons are greyed out
    assert panel.load_model(write_interactive_checkpoint(tmp_path / "other.safetensors")) is not None
    assert panel.ctx is None and panel.points_layer in viewer.layers
    _keys_follow_buttons(panel, widget, dock)
    for layer in (panel.points_layer, panel.boxes_layer, panel.scribbles_layer):
        bound = _layer_keys(layer)
        _keys_follow_buttons(panel, widget, {key: (lambda action=bound[key], lyr=layer: action(lyr),
                                                   name and getattr(panel, name)) for key, name in LAYER_KEYS.items()})
    assert panel.objects_accepted == 1


# ---------------------------------------------------------------- closing napari while work runs
CLOSE_BUDGET_S = 0.5
"""What the dock's close may hold napari's GUI thread (it waits 0.25 s at most for what it stopped, then lets it end on
its own; it waited 2.0 s before)."""


class _HeldPredictor:
    """A Segment predictor whose sliding window does not end until ``gate`` is set (the engine checks the cancel
    between windows only, and a CPU window takes seconds)."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate, self.entered, self.left = gate, threading.Event(), threading.Event()

    def predict(self, volume, modality=None, progress=None, cancel=None):
        progress(0, 2, "window 1 of 2")
        self.entered.set()
        self.gate.wait(60)
        self.left.set()
        cancel.raise_if_cancelled()  # as the engine does between windows
        raise AssertionError("the job was not cancelled")

    def modality_warning(self, *args, **kwargs):
        return None


def _close_and_time(qtbot, viewer, widget):
    """Close the viewer as napari's close button does; how long ``viewer.close()`` took and how long the dock's own
    close held the GUI thread (it runs when Qt deletes the dock: inside ``viewer.close()`` or a turn of the event loop
    after it)."""
    session = widget.session
    held = []
    close = session.close

    def timed_close():
        started = time.perf_counter()
        close()
        held.append(time.perf_counter() - started)

    session.close = timed_close  # what the dock's ``destroyed`` hook calls
    started = time.perf_counter()
    viewer.close()
    closed = time.perf_counter() - started
    qtbot.waitUntil(lambda: bool(held), timeout=10_000)
    return closed, held[0]


@pytest.mark.parametrize("work", ["segment", "prompt"])
def test_closing_the_viewer_while_work_runs_is_prompt(viewer_widget, interactive_checkpoint, qtbot, capfd, work):
    viewer, widget = viewer_widget
    gate = threading.Event()
    try:
        _close_while_held(viewer, widget, interactive_checkpoint, qtbot, capfd, work, gate)
    finally:
        gate.set()  # a failed test must not leave a worker held at Python's exit


def _close_while_held(viewer, widget, interactive_checkpoint, qtbot, capfd, work, gate):
    session = widget.session
    image, _ = phantom_layer(viewer, modality="CT" if work == "segment" else "MR")
    if work == "segment":
        held = _HeldPredictor(gate)
        session.predictor = lambda entry, device: held
        session.set_image(image)
        job = widget.panels["segment"].segment()
        assert job is not None
        assert held.entered.wait(60), "the segmentation never reached its first window"
        running = lambda: job.running  # noqa: E731
        left = held.left.is_set
    else:
        echo = session.prompt_backend_factory = Echo(delay=0.01)
        panel = widget.panels["interactive"]
        assert panel.load_model(interactive_checkpoint) is not None
        assert panel.start()
        _idle(qtbot, panel)
        echo.gate = gate  # the next prediction holds until the gate opens
        assert panel.add_point(np.asarray([int(n) // 2 for n in np.shape(image.data)]))
        qtbot.waitUntil(lambda: any(name == "add_point" for name, _ in echo.times), timeout=10_000)
        worker = panel.worker
        running = lambda: not worker.ended.is_set()  # noqa: E731
        left = lambda: "add_point" in echo.finished  # noqa: E731
    assert running()
    capfd.readouterr()

    closed, held_s = _close_and_time(qtbot, viewer, widget)
    with capfd.disabled():  # shown with -s
        print(f"\n{work}: viewer.close() {closed:.2f} s, of it the dock's close {held_s:.2f} s")
    assert held_s < CLOSE_BUDGET_S, f"the dock's close held napari for {held_s:.2f} s"
    assert not session.alive and running()  # the model call it could not interrupt goes on

    gate.set()  # the model call ends after the close: its result is dropped, nothing raises
    qtbot.waitUntil(lambda: left() and not running(), timeout=30_000)
    qtbot.wait(300)
    if work == "segment":
        assert job.outcome == "cancelled"
    out = capfd.readouterr()
    log = out.out + out.err
    for bad in ("Traceback", "has been deleted", "RuntimeError", "Exception"):
        assert bad not in log, log[-3000:]


def _held_segmentation(viewer, widget):
    """``(gate, held predictor)``: Segment on a phantom CT will hold in its first window until ``gate`` is set."""
    image, _ = phantom_layer(viewer, modality="CT")
    gate = threading.Event()
    held = _HeldPredictor(gate)
    widget.session.predictor = lambda entry, device: held
    widget.session.set_image(image)
    return gate, held


def test_the_docks_close_button_stops_its_session_and_drops_a_running_segment(viewer_widget, qtbot, monkeypatch):
    """napari's close button on the dock (``remove_dock_widget``) takes the widget out of its dock without deleting
    it: the session ran on, the running Segment landed, asked "Replace edited labels?" from the closed dock (Yes lost
    the edits) and a dock opened again answered layer events twice."""
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = viewer_widget
    session = widget.session
    gate, held = _held_segmentation(viewer, widget)
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    layers_before = [layer.name for layer in viewer.layers]
    try:
        job = widget.panels["segment"].segment()
        assert job is not None and held.entered.wait(60)
        viewer.window.remove_dock_widget(widget)  # what the dock's close button does
        assert not session.alive
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not job.running, timeout=30_000)
    qtbot.wait(300)
    assert job.outcome == "cancelled" and asked == []
    assert [layer.name for layer in viewer.layers] == layers_before  # no result landed


def test_a_sections_cancel_stops_its_own_job_only(viewer_widget, qtbot):
    """Every section's Cancel followed the session's one job slot: the Fine-tune section's Cancel was enabled during
    a Segment and cancelled it, and Segment's Cancel discarded a long fine-tune while Fine-tune offered "Stop and
    keep"."""
    viewer, widget = viewer_widget
    session = widget.session
    gate, held = _held_segmentation(viewer, widget)
    segment, finetune = widget.panels["segment"], widget.panels["finetune"]
    try:
        job = segment.segment()
        assert job is not None and held.entered.wait(60)
        assert segment.cancel_button.isEnabled() and not finetune.finetune_cancel_button.isEnabled()
        finetune.cancel()  # another section's Cancel (its key, a script): the segmentation goes on
        assert job.running and not job.token.cancelled
        segment.cancel()
        assert job.token.cancelled and not segment.cancel_button.isEnabled()
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not job.running, timeout=30_000)
    assert job.outcome == "cancelled"
    assert not segment.cancel_button.isEnabled() and not finetune.finetune_cancel_button.isEnabled()


def test_the_docks_close_button_takes_the_prompt_layers_and_keeps_the_object(viewer_widget, interactive_checkpoint,
                                                                             qtbot):
    # the three prompts: layers stayed, bound to a closed panel (clicks and T/Enter did nothing), and a dock opened
    # again added a second set beside them
    from napari_mambahome.prompting import is_prompt_layer

    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    image, _ = phantom_layer(viewer)
    assert panel.start()
    _idle(qtbot, panel)
    centre = np.asarray([s // 2 for s in np.shape(image.data)], float)
    panel.points_layer.add(centre)
    _idle(qtbot, panel)
    target = panel.target
    drawn = np.array(target.data, copy=True)
    assert drawn.any() and sum(is_prompt_layer(layer) for layer in viewer.layers) == 3
    viewer.window.remove_dock_widget(widget)
    assert not any(is_prompt_layer(layer) for layer in viewer.layers)
    assert target in viewer.layers  # the object stays in its labels as drawn
    np.testing.assert_array_equal(np.asarray(target.data), drawn)
