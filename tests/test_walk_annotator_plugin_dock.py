"""The dock as napari makes it from Plugins > Mamba-HoME (``add_plugin_dock_widget``), not built by hand as the other
GUI tests build it: napari then hands the widget a ``PublicOnlyProxy`` of the viewer, and every layer the dock reached
through it (the labels Segment adds, say) was a proxy, never ``is`` the layer napari's own events carry.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk_annotator_plugin_dock.py``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, phantom_layer, plugin_env, tiny_checkpoint, wait_job,
)

pytestmark = pytest.mark.gui


@pytest.fixture
def plugin_dock(make_napari_viewer, plugin_env, tiny_checkpoint, modality_questions):
    needs_display()
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mambahome", "Mamba-HoME")
    assert widget.session.load_model_file(tiny_checkpoint) is not None
    return viewer, widget


def _segmented(viewer, widget, qtbot):
    image, _ = phantom_layer(viewer)
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done", widget.status_label.text()
    return image, viewer.layers[f"{image.name} labels"]


def test_the_correct_class_box_follows_naparis_label_spinner_in_the_plugin_dock(plugin_dock, qtbot):
    """An annotator's walk: after Segment, picking class 2 with napari's label spinner left the Correct section on
    '1: organ', so Rename… renamed class 1 while the brush painted class 2."""
    viewer, widget = plugin_dock
    _, labels = _segmented(viewer, widget, qtbot)
    correct = widget.panels["correct"]
    assert widget.session.labels_layer is labels  # the layer napari holds, not a stand-in for it
    labels.selected_label = 2  # napari's label spinner
    assert correct.class_combo.currentData() == 2
    labels.selected_label = 3
    assert correct.class_combo.currentData() == 3


def test_the_dock_reaches_no_private_napari_attribute_through_the_proxy(plugin_dock, qtbot):
    """Correct's helpers and Undo read the labels layer's undo history: through napari's proxy each read warned that
    it will be refused from napari 0.10 (FutureWarning), so the dock from the Plugins menu would stop undoing there."""
    viewer, widget = plugin_dock
    _, labels = _segmented(viewer, widget, qtbot)
    correct = widget.panels["correct"]
    correct.class_combo.setCurrentIndex(correct.class_combo.findData(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = np.array(labels.data, copy=True)
        correct.run_helper("Clear class")
        correct.undo()
        np.testing.assert_array_equal(np.asarray(labels.data), before)
    private = [str(w.message) for w in caught if "Private attribute access" in str(w.message)]
    assert not private, private
