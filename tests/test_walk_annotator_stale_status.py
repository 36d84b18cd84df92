"""An error about the chosen image stays on the status line after the annotator did what it asked: Segment (or Start
prompting) pressed before opening a volume said "no image …: open a volume", and after File > Open the line still
said so, in red-flagged words, above a volume that was open and ready.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk_annotator_stale_status.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


@pytest.mark.parametrize("press", ["segment", "start prompting"])
def test_an_error_for_a_missing_image_goes_once_a_volume_is_opened(viewer_widget, shared_data, press):
    viewer, widget = viewer_widget
    if press == "segment":
        assert widget.panels["segment"].segment() is None
    else:
        assert not widget.panels["interactive"].start()
    assert widget.status_label.text().startswith("Error: no image")
    viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    text = widget.status_label.text()
    assert "no image" not in text and "open a volume" not in text, text
    assert "t2_image" in text


def test_an_error_about_a_2d_layer_goes_when_a_volume_is_chosen(viewer_widget, shared_data):
    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((40, 50), np.float32), name="a slice")
    assert widget.panels["segment"].segment() is None
    assert "2 dimensions" in widget.status_label.text()
    viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    assert "2 dimensions" not in widget.status_label.text()


def test_other_errors_stay_when_the_image_changes(viewer_widget, shared_data):
    """Only what the newly chosen image answers goes: an error of another kind is still the last news."""
    viewer, widget = viewer_widget
    widget.session.error("saving the case failed: disk full")
    viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    assert widget.status_label.text() == "Error: saving the case failed: disk full"


def test_reset_object_before_prompting_says_why_nothing_happened(viewer_widget):
    """Undo prompt, then Reset object, before Start prompting: the status line kept "nothing to undo", as if Reset had
    had something to undo; Accept already said to start prompting first."""
    viewer, widget = viewer_widget
    panel = widget.panels["interactive"]
    # the buttons are greyed out before Start (tests/test_napari_walk6_prompt_buttons.py); Ctrl+Z and the panel's
    # own calls still answer, and each answer replaces the one before
    assert not panel.undo_button.isEnabled() and not panel.reset_button.isEnabled()
    panel.undo()
    assert widget.status_label.text() == "nothing to undo"
    panel.reset_object()
    assert widget.status_label.text() == "nothing to reset: start prompting first"
