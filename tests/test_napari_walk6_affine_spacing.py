"""An annotator's sixth walk: a scan opened by another reader (or added from a script) with its voxel size in the layer's
``affine`` and ``scale`` 1, e.g. ``viewer.add_image(data, affine=np.diag([2.0, 0.7, 0.7, 1.0]))``. The plugin read
``layer.scale`` only, segmented it as 1 mm voxels and said "assuming 1 mm isotropic voxels", though napari itself shows
the scan at 2 x 0.7 x 0.7 mm.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_walk6_affine_spacing.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, status_messages, tiny_checkpoint, viewer_widget,
    wait_job,
)

pytestmark = pytest.mark.gui

AFFINE = np.diag([2.0, 0.7, 0.7, 1.0])


def _ct(shape=(16, 40, 40), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(-800.0, 50.0, shape).astype(np.float32)
    data[4:12, 10:30, 10:30] = 40.0  # a soft-tissue block in air, so it reads as CT
    return data


def test_segmenting_a_layer_with_spacing_in_its_affine_gives_the_engine_that_spacing(viewer_widget, monkeypatch,
                                                                                       notifications, qtbot):
    from engine.inference import Predictor

    viewer, widget = viewer_widget
    seen = []
    predict = Predictor.predict

    def recording(self, volume, *args, **kwargs):
        seen.append(tuple(float(s) for s in volume.spacing))
        return predict(self, volume, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", recording)
    messages = status_messages(widget)
    image = viewer.add_image(_ct(), name="scan from another reader", affine=AFFINE)
    assert tuple(image.scale) == (1.0, 1.0, 1.0)
    assert widget.session.image_layer is image
    job = widget.panels["segment"].segment()
    assert job is not None, widget.status_label.text()
    wait_job(qtbot, widget)
    assert job.outcome == "done", widget.status_label.text()
    assert len(seen) == 1 and np.allclose(seen[0], (2.0, 0.7, 0.7)), seen
    said = messages + [message for _, message in notifications]
    assert not [m for m in said if "assuming 1 mm" in m], said
    # the labels sit on the scan in the viewer (the whole transform, not only the scale)
    labels = widget.session.labels_layer
    assert labels is not None
    np.testing.assert_allclose(labels.affine.affine_matrix, image.affine.affine_matrix)


@pytest.mark.parametrize("kwargs, spacing", [
    ({"affine": AFFINE}, (2.0, 0.7, 0.7)),
    ({"scale": (1.0, 0.5, 0.5), "affine": np.diag([3.0, 2.0, 2.0, 1.0])}, (3.0, 1.0, 1.0)),  # scale x affine
    ({"scale": (2.0, 0.7, 0.7), "rotate": 30.0}, (2.0, 0.7, 0.7)),  # a rotation keeps the voxel size
])
def test_layer_geometry_reads_the_whole_transform(kwargs, spacing):
    from napari.layers import Image, Labels

    from napari_mambahome._geometry import image_volume, layer_geometry

    for layer in (Image(_ct(), **kwargs), Labels(np.zeros((16, 40, 40), np.uint8), **kwargs)):
        geometry = layer_geometry(layer)
        assert np.allclose(geometry.spacing, spacing), geometry.spacing
        assert not [n for n in geometry.notes if "assuming 1 mm" in n], geometry.notes
        # the grid given to the engine is where napari draws the layer
        np.testing.assert_allclose(geometry.affine, layer._data_to_world.affine_matrix, atol=1e-12)
        if isinstance(layer, Image):
            assert np.allclose(image_volume(layer, geometry).spacing, spacing)


def test_a_layer_with_nothing_but_unit_scale_is_still_assumed_1_mm():
    from napari.layers import Image

    from napari_mambahome._geometry import layer_geometry

    geometry = layer_geometry(Image(_ct()))
    assert geometry.spacing == (1.0, 1.0, 1.0) and "assuming 1 mm" in geometry.notes[0]


def test_saving_labels_with_spacing_in_their_affine_writes_that_spacing(tmp_path):
    from napari.layers import Labels

    from engine.io import load_volume
    from napari_mambahome._writer import write_labels

    data = np.zeros((16, 40, 40), np.uint8)
    data[4:8, 10:20, 10:20] = 1
    labels = Labels(data, name="mask", affine=AFFINE)
    [path] = write_labels(str(tmp_path / "mask.nii.gz"), data, labels._get_state())
    written = load_volume(path)
    assert np.allclose(written.spacing, (2.0, 0.7, 0.7)), written.spacing
