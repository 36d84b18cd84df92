"""An image layer whose grid carries a napari ``affine`` (or ``rotate``/``shear``), as another reader hands an oblique
scan or as a script places one: the labels Segment made and the prompt layers of Start prompting took only its scale
and translate, so they lay beside it, unrotated (a walk on the spinal cord T2 rotated 15 degrees in the axial plane:
the mask a band off the cord, and a click on the cord pointed at another voxel).

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk_annotator_layer_grid.py``.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import Echo, interactive_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.gui

GRID = ("scale", "translate", "rotate", "shear")


def _oblique_image(viewer, shared_data):
    data = np.asarray(nib.load(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz")).dataobj, np.float32)
    turn = np.deg2rad(15)
    affine = np.eye(4)
    affine[1:3, 1:3] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    affine[:3, 3] = (-20.0, -30.0, -19.0)
    return viewer.add_image(data, name="t2 oblique", affine=affine, scale=(1.0, 1.2, 1.1), shear=(0.0, 0.05, 0.0))


def _assert_same_grid(image, layer):
    for name in GRID:
        np.testing.assert_allclose(np.asarray(getattr(layer, name)), np.asarray(getattr(image, name)),
                                   err_msg=f"{layer.name}: {name}")
    np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix, err_msg=f"{layer.name}: affine")
    if np.shape(layer.data) == np.shape(image.data):  # labels (prompt points and boxes have no extent when empty)
        np.testing.assert_allclose(layer.extent.world, image.extent.world, err_msg=layer.name)


def test_segment_labels_lie_on_the_image_grid_with_its_affine(viewer_widget, shared_data, qtbot):
    viewer, widget = viewer_widget
    image = _oblique_image(viewer, shared_data)
    widget.session.set_modality(image, "MR")
    assert widget.panels["segment"].segment() is not None
    assert wait_job(qtbot, widget).outcome == "done", widget.status_label.text()
    _assert_same_grid(image, viewer.layers["t2 oblique labels"])


def test_prompt_layers_and_their_labels_lie_on_the_image_grid_with_its_affine(viewer_widget, interactive_checkpoint,
                                                                              shared_data, qtbot):
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = _oblique_image(viewer, shared_data)
    widget.session.set_modality(image, "MR")
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    for layer in (panel.points_layer, panel.boxes_layer, panel.scribbles_layer):
        _assert_same_grid(image, layer)
    voxel = np.array([30, 27, 25])
    # a click where the viewer shows that voxel of the image
    panel.points_layer.add(panel.points_layer.world_to_data(image.data_to_world(voxel)))
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=30_000)
    labels = panel.target
    _assert_same_grid(image, labels)
    assert np.asarray(labels.data)[tuple(voxel)] == panel.class_id
    # a new start on a scan of another grid moves the same prompt layers onto it, affine included
    other = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")[0]
    assert panel.start()
    for layer in (panel.points_layer, panel.boxes_layer, panel.scribbles_layer):
        _assert_same_grid(other, layer)
