"""A brush stroke in the scribbles layer reaches the engine as its voxels, in the file's order, not as a whole-volume mask.

The engine found a whole-volume mask's voxels itself: 0.6 s more per scribble than the prompt's own work on a
512x512x400 CT on 2 cores (as the remote backend did before sending them). Checked on the real spinal cord T2, whose
left-handed file grid the dock shows reoriented (a non-identity display transform), so a voxel mapped in the wrong
order lands elsewhere and the drawn object shows it. The voxels go as a set (``joined=False``): joined as a drawn
line, a curved stroke's raster-ordered voxels filled its inside.

    xvfb-run -a python -m pytest tests/test_napari_scribble_voxels.py
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget,
)
from test_plugin_interactive import Echo, _idle, interactive_checkpoint  # noqa: F401 - fixtures

pytestmark = pytest.mark.gui


class Recording(Echo):
    """Echo's sessions, with what each ``add_scribble`` was given recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.scribbles = []

    def __call__(self, checkpoint, volume, device):
        session, given = super().__call__(checkpoint, volume, device), self.scribbles

        class Spy:
            def __getattr__(self, name):
                return getattr(session, name)

            def add_scribble(self, voxels_or_mask, positive=True, joined=True):
                given.append((np.array(voxels_or_mask, copy=True), joined))
                return session.add_scribble(voxels_or_mask, positive=positive, joined=joined)
        return Spy()


def test_a_brush_stroke_is_sent_as_its_voxels_in_file_order(viewer_widget, interactive_checkpoint, shared_data,
                                                              qtbot):
    viewer, widget = viewer_widget
    recording = Recording()
    widget.session.prompt_backend_factory = recording
    image = viewer.open(str(shared_data / "spinal_cord_mri" / "t2_image.nii.gz"), plugin="napari-mambahome")[0]
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    qtbot.waitUntil(lambda: panel.ctx is not None and panel.ctx.ready, timeout=60_000)
    geometry = panel.ctx.geometry
    assert not geometry.display.is_identity  # the case where the order matters

    shape = np.shape(image.data)
    z, y, x = (n // 2 for n in shape)
    stroke = np.zeros(shape, np.uint8)
    # a U, as a curved brush stroke with label 1 (positive) leaves it in the layer: its voxels in raster order, joined
    # as a drawn line, filled the inside of the U
    stroke[z, y - 6:y + 7, x - 5] = stroke[z, y - 6:y + 7, x + 5] = stroke[z, y + 6, x - 5:x + 6] = 1
    panel.scribbles_layer.data = stroke
    panel.scribbles_layer.events.paint(value=[])  # what a finished brush stroke emits
    _idle(qtbot, panel)

    assert len(recording.scribbles) == 1
    sent, joined = recording.scribbles[0]
    assert sent.ndim == 2 and sent.shape[1] == 3 and not joined  # voxel indices, a set, not a mask
    expected = np.argwhere(np.ascontiguousarray(geometry.to_file(stroke != 0)))
    np.testing.assert_array_equal(np.unique(sent, axis=0), np.unique(expected, axis=0))
    # the echoing stand-in draws the scribble where it was: shown back on the stroke in the dock's labels
    labels = np.asarray(panel.target.data)
    assert labels[stroke != 0].all()
    # the U, not the U filled in: its middle lies 5 voxels from the stroke, beyond the drawn scribble's thickness
    assert labels[z, y - 6:y + 2, x - 1:x + 2].sum() == 0
