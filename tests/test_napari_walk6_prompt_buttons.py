"""An annotator's sixth walk, the Interactive section before "Start prompting": Accept object, Undo prompt, Reset object,
Clear prompts and Save as training case were enabled, and each press only answered "nothing to accept: start prompting
first" (or "nothing to undo"). They act on the object being prompted, so they are greyed out, with a tooltip saying why,
until prompting starts, and again once it ends.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk6_prompt_buttons.py``. Prompts go
through the deterministic stand-in network of tests/test_plugin_interactive.py (``Echo``).
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


def _buttons(panel):
    return {"accept": panel.next_button, "undo": panel.undo_button, "reset": panel.reset_button,
            "clear": panel.clear_button, "save": panel.save_button}


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(20)


def _assert_greyed_out(panel):
    for name, button in _buttons(panel).items():
        assert not button.isEnabled(), f"{name} is enabled with nothing being prompted"
        assert "Start prompting" in button.toolTip(), (name, button.toolTip())


def test_object_buttons_are_greyed_out_until_prompting_starts_and_after_it_ends(viewer_widget, interactive_checkpoint,
                                                                                qtbot):
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    panel = widget.panels["interactive"]
    _assert_greyed_out(panel)  # no image yet
    assert panel.load_model(interactive_checkpoint) is not None
    image, _ = phantom_layer(viewer)
    _assert_greyed_out(panel)  # an image and a model, but no Start yet
    panel.next_button.click()  # a click on a greyed-out button does nothing (no "start prompting first" answer)
    assert "nothing to accept" not in widget.status_label.text()
    assert panel.start()
    _idle(qtbot, panel)
    for name, button in _buttons(panel).items():
        assert button.isEnabled(), f"{name} is greyed out while prompting"
        assert "Start prompting" not in button.toolTip(), (name, button.toolTip())
    panel.reset_button.click()  # Reset forgets the object, prompting goes on: the buttons stay
    _idle(qtbot, panel)
    assert panel.ctx is not None and all(b.isEnabled() for b in _buttons(panel).values())
    viewer.layers.remove(image)  # prompting on it ends
    qtbot.wait(50)
    assert panel.ctx is None
    _assert_greyed_out(panel)


def test_object_buttons_are_greyed_out_after_a_model_change_ends_prompting(viewer_widget, interactive_checkpoint,
                                                                           qtbot, tmp_path):
    from test_plugin_interactive import write_interactive_checkpoint

    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    phantom_layer(viewer)
    assert panel.start()
    _idle(qtbot, panel)
    assert panel.next_button.isEnabled()
    other = panel.load_model(write_interactive_checkpoint(tmp_path / "other.safetensors"))  # prompting ends
    assert other is not None and panel.model_entry is other
    assert panel.ctx is None
    _assert_greyed_out(panel)
    assert panel.start()  # and a new start enables them again
    _idle(qtbot, panel)
    assert all(b.isEnabled() for b in _buttons(panel).values())
