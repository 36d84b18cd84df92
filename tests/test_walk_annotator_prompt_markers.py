"""Prompting a scan that has no labels yet (no Segment first, as in nnInteractive): the labels the first prompt makes
were added on top of the layer list, over the three prompt layers, so the object's colour covered the markers of the
prompts that made it (a walk on the spinal cord T2: green clicks shown olive, a negative red click hidden in the cord).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk_annotator_prompt_markers.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(20)


def test_the_labels_the_first_prompt_makes_lie_under_the_prompt_markers(viewer_widget, interactive_checkpoint,
                                                                        shared_data, qtbot):
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    panel.points_layer.add(np.asarray([s // 2 for s in np.shape(image.data)], dtype=float))
    _idle(qtbot, panel)
    labels = panel.target
    assert labels is not None and labels.name == "t2_image labels" and np.asarray(labels.data).any()
    order = list(viewer.layers)
    prompts = [panel.scribbles_layer, panel.boxes_layer, panel.points_layer]
    assert order.index(image) < order.index(labels) < min(order.index(layer) for layer in prompts), \
        [layer.name for layer in order]
    assert viewer.layers.selection.active is panel.points_layer  # the next click still adds a point


def _under_the_prompts(viewer, panel, image, labels):
    order = list(viewer.layers)
    prompts = [panel.scribbles_layer, panel.boxes_layer, panel.points_layer]
    return order.index(image) < order.index(labels) < min(order.index(layer) for layer in prompts)


def test_a_segmentation_and_a_restored_mask_land_under_the_prompt_markers(viewer_widget, interactive_checkpoint,
                                                                          shared_data, qtbot):
    """Start prompting, then Segment (the walk pressed both at once; the prompt layers stay after Enter too): the
    segmentation came on top of the markers; so did a removed mask put back with 'Restore removed mask'."""
    from plugin_support import wait_job

    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    _idle(qtbot, panel)
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done", widget.status_label.text()
    labels = viewer.layers["t2_image labels"]
    assert _under_the_prompts(viewer, panel, image, labels), [layer.name for layer in viewer.layers]
    viewer.layers.remove(labels)
    restored = widget.panels["correct"].restore_removed()
    assert restored is not None and _under_the_prompts(viewer, panel, image, restored), \
        [layer.name for layer in viewer.layers]


def test_labels_of_a_scan_opened_over_the_prompt_layers_stay_on_top(viewer_widget, interactive_checkpoint, shared_data,
                                                                     qtbot):
    """Prompt layers of another scan that lie under the image segmented now: its labels go on top, not under it."""
    from plugin_support import wait_job

    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    _idle(qtbot, panel)
    other = viewer.open(str(sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]),
                        plugin="napari-mambahome")[0]
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done", widget.status_label.text()
    assert list(viewer.layers)[-1] is viewer.layers[f"{other.name} labels"]
