"""The first prompt is as fast as the next ones: the model is built and warmed up while the annotator aims.

Engine: :meth:`InteractiveSession.warm_up` runs one throw-away forward pass and changes nothing (mask, prompts, undo
history), so a prompt after it is bit for bit the prompt of a fresh session (the bundled model on real volumes).
napari: "Start prompting" queues the building and warm-up of the backend in the panel's worker; a click given during
the warm-up waits behind it and is answered after it; ending or restarting prompting during the warm-up is safe.
The GUI tests run under a virtual display: ``xvfb-run -a python -m pytest tests/test_first_prompt_warmup.py``.
No timings are asserted here (the measurements are in the change's report).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import (  # noqa: F401 - fixtures
    RADIUS, Echo, _ball_in_display, _centre, _idle, interactive_checkpoint, prompting, write_interactive_checkpoint,
)

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


# ---------------------------------------------------------------- engine
def _bundled_model():
    if not BUNDLED.is_file():
        pytest.skip(f"bundled interactive model not found at {BUNDLED}")
    from engine.checkpoint import load_checkpoint

    return load_checkpoint(BUNDLED, device="cpu")


def _state(session):
    return (np.array(session.mask, copy=True), session.prompts,
            [(s.prompt, s.bbox, np.array(s.previous, copy=True), s.net_prompt) for s in session._history])


def _same_state(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] or all(p is q for p, q in zip(a[1], b[1]))
    assert len(a[2]) == len(b[2])
    for (pa, ba, va, na), (pb, bb, vb, nb) in zip(a[2], b[2]):
        assert pa is pb and na is nb and ba == bb
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("case, modality", [("spinal_cord_mri/t2_image.nii.gz", None),
                                            ("abdomen_ct_mr/mr_image.nii.gz", "MR"),
                                            ("hippocampus/imagesTr/hippocampus_001.nii.gz", None)])
def test_warm_up_changes_nothing_and_the_next_prompts_equal_a_fresh_sessions(shared_data, case, modality):
    import torch

    from engine.interactive import InteractiveSession
    from engine.io import load_volume

    model, meta = _bundled_model()
    volume = load_volume(shared_data / case)
    c = np.asarray(volume.shape) // 2
    clicks = [(tuple(c), True), (tuple(c + (0, 0, 1)), False)]

    fresh = InteractiveSession((model, meta), volume, device="cpu", modality=modality)
    expected = [fresh.add_point(v, positive=p) for v, p in clicks]

    warmed = InteractiveSession((model, meta), volume, device="cpu", modality=modality)
    before = _state(warmed)
    rng = torch.get_rng_state()
    took = warmed.warm_up()
    assert isinstance(took, float) and took >= 0
    _same_state(_state(warmed), before)  # empty mask, no prompts, nothing to undo: as it was
    assert not warmed.mask.any() and warmed.num_interactions == 0 and not warmed._history
    assert torch.equal(torch.get_rng_state(), rng)
    got = []
    for i, (v, p) in enumerate(clicks):
        got.append(warmed.add_point(v, positive=p))
        if i == 0:  # a warm-up in the middle of an object changes nothing either, undo included
            mid = _state(warmed)
            warmed.warm_up()
            _same_state(_state(warmed), mid)
    for a, b in zip(expected, got):
        assert a.bbox == b.bbox and a.window == b.window and a.zoom == b.zoom
        np.testing.assert_array_equal(a.mask, b.mask)  # bit-identical
    np.testing.assert_array_equal(fresh.mask, warmed.mask)
    for _ in clicks:  # the undo history is the fresh session's: every step comes back exactly
        fresh.undo()
        warmed.undo()
        np.testing.assert_array_equal(fresh.mask, warmed.mask)
    assert not warmed.mask.any()


# ---------------------------------------------------------------- napari
class Gated:
    """Backend factory over the Echo stand-in whose ``warm_up`` waits for ``release``; logs every backend call
    (name, backend) and the thread each backend was made in."""

    def __init__(self) -> None:
        self.release, self.warming = threading.Event(), threading.Event()
        self.calls, self.made_in, self.backends = [], [], []

    def __call__(self, checkpoint, volume, device):
        session = Echo()(checkpoint, volume, device)
        self.made_in.append(threading.get_ident())
        outer = self

        class Backend:
            def warm_up(self):
                outer.calls.append(("warm_up", self))
                outer.warming.set()
                assert outer.release.wait(30)
                return session.warm_up()

            def __getattr__(self, name):
                attr = getattr(session, name)

                def call(*args, **kwargs):
                    outer.calls.append((name, self))
                    return attr(*args, **kwargs)
                return call

        backend = Backend()
        self.backends.append(backend)
        return backend


@pytest.fixture
def gated(prompting, qtbot):
    viewer, widget, panel, image, _ = prompting
    _idle(qtbot, panel)  # the fixture's own start (warm-up of the plain Echo) is over
    gate = Gated()
    widget.session.prompt_backend_factory = gate
    try:
        yield viewer, widget, panel, image, gate
    finally:
        gate.release.set()  # never leave a worker waiting
        _idle(qtbot, panel)


@pytest.mark.gui
def test_start_builds_and_warms_the_backend_in_the_worker_before_any_click(gated, qtbot):
    viewer, widget, panel, image, gate = gated
    gate.release.set()
    assert panel.start()
    qtbot.waitUntil(lambda: [name for name, _ in gate.calls] == ["warm_up"], timeout=30_000)
    _idle(qtbot, panel)
    assert gate.made_in and gate.made_in[0] != threading.get_ident()  # built in the worker, not on the GUI thread
    assert panel.ctx.backend is gate.backends[0] and panel.ctx.ready
    # the warm-up is no step of the object: nothing drawn, counted or undoable
    assert panel.interactions == 0 and panel.history == [] and not panel.ctx.state.mask.any()
    assert panel.target is None and "queued" not in panel.count_label.text()
    assert "loading" not in widget.status_label.text() and "failed" not in widget.status_label.text()
    # the first click uses the warmed backend (no second build) and is drawn as always
    centre = _centre(image)
    panel.add_point(np.asarray(centre))
    _idle(qtbot, panel)
    assert len(gate.backends) == 1 and [name for name, _ in gate.calls] == ["warm_up", "add_point"]
    labels = np.asarray(panel.target.data)
    np.testing.assert_array_equal(labels != 0, _ball_in_display(labels.shape, centre, RADIUS))
    assert panel.interactions == 1


@pytest.mark.gui
def test_a_click_during_the_warm_up_is_answered_after_it(gated, qtbot):
    viewer, widget, panel, image, gate = gated
    assert panel.start()
    qtbot.waitUntil(gate.warming.is_set, timeout=30_000)
    centre = _centre(image)
    assert panel.add_point(np.asarray(centre))  # accepted at once, queued behind the warm-up
    assert "loading" in widget.status_label.text() and "queued" in widget.status_label.text()
    qtbot.wait(300)  # the GUI goes on; the click waits for the warm-up
    assert [name for name, _ in gate.calls] == ["warm_up"] and panel.worker is not None
    assert panel.target is None or not np.asarray(panel.target.data).any()
    assert "1 queued" in panel.count_label.text()
    gate.release.set()
    _idle(qtbot, panel)
    assert [name for name, _ in gate.calls] == ["warm_up", "add_point"]
    labels = np.asarray(panel.target.data)
    np.testing.assert_array_equal(labels != 0, _ball_in_display(labels.shape, centre, RADIUS))
    assert panel.interactions == 1 and "updated" in widget.status_label.text()
    panel.undo()  # the warm-up is no step: one undo takes the click back
    _idle(qtbot, panel)
    assert not np.asarray(panel.target.data).any() and panel.interactions == 0


@pytest.mark.gui
def test_enter_during_the_warm_up_is_not_held_back(gated, qtbot):
    viewer, widget, panel, image, gate = gated
    assert panel.start()
    qtbot.waitUntil(gate.warming.is_set, timeout=30_000)
    assert not panel.accept_object()  # nothing to accept yet, said now, not once the model has loaded
    assert "no object to accept yet" in widget.status_label.text() and not panel._accept_when_idle


@pytest.mark.gui
def test_restarting_prompting_during_the_warm_up_is_safe(gated, qtbot):
    viewer, widget, panel, image, gate = gated
    assert panel.start()
    qtbot.waitUntil(gate.warming.is_set, timeout=30_000)
    old = panel.ctx
    assert panel.start()  # a new start while the first one's warm-up runs
    centre = np.asarray(_centre(image))
    panel.add_point(centre)  # belongs to the new start: waits for the old warm-up, then the new one
    qtbot.wait(200)
    gate.release.set()
    _idle(qtbot, panel)
    first, second = gate.backends
    assert old.backend is first and panel.ctx is not old and panel.ctx.backend is second
    assert [(name, b is second) for name, b in gate.calls] == [("warm_up", False), ("warm_up", True),
                                                                ("add_point", True)]
    labels = np.asarray(panel.target.data)
    np.testing.assert_array_equal(labels != 0, _ball_in_display(labels.shape, tuple(centre), RADIUS))
    assert panel.interactions == 1


@pytest.mark.gui
def test_ending_prompting_during_the_warm_up_is_safe(gated, qtbot, tmp_path):
    viewer, widget, panel, image, gate = gated
    assert panel.start()
    qtbot.waitUntil(gate.warming.is_set, timeout=30_000)
    old = panel.ctx
    # another model chosen: prompting ends (its rules: the next click is refused until Start)
    other = write_interactive_checkpoint(tmp_path / "other.safetensors")
    assert panel.load_model(other) is not None and panel.ctx is None and old.ended
    assert not panel.add_point(np.asarray(_centre(image)))
    gate.release.set()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30_000)
    qtbot.wait(50)
    assert [name for name, _ in gate.calls] == ["warm_up"] and panel.target is None  # its result was dropped
    # a new start warms the new model and prompts as usual
    assert panel.start()
    centre = _centre(image)
    panel.add_point(np.asarray(centre))
    _idle(qtbot, panel)
    assert len(gate.backends) == 2 and [name for name, _ in gate.calls] == ["warm_up", "warm_up", "add_point"]
    labels = np.asarray(panel.target.data)
    np.testing.assert_array_equal(labels != 0, _ball_in_display(labels.shape, centre, RADIUS))
