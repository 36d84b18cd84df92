"""A prompt the 3D Slicer module refuses for want of something to send leaves everything as it was: the open object
(on the volume prompted before) stays open with its Undo history, nothing is uploaded, no request reaches the server.

Found in review: with volume B selected and the points placed on volume A (outside B), **Send new points** said
"Nothing sent", but had first taken B's session: B uploaded, and the open object on A ended (renamed "MambaHoME
interactive (echo)", accepted: its Undo gone, the next prompt on A a new object without the earlier clicks). An ROI
placed on A and sent with B selected, and an Undo pressed with B selected, did the same before their refusal.

Real MRML classes (``slicer-core``), a live server on the CPU with the deterministic "echo" promptable model (its
object is the previous mask plus the positive clicks); every request the Logic's client sends is recorded.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-refused-keeps"
SHAPE = (24, 20, 16)
AFFINE_A = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
AFFINE_B = AFFINE_A + np.array([[0, 0, 0, 100.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # 100 mm to the right


def _world(affine, voxel) -> np.ndarray:
    return (affine @ np.r_[np.asarray(voxel, float), 1.0])[:3]


class Walk:
    """Volumes A and B far apart in the world, one output node and one + list, the Logic connected to the echo server
    with an object open on A (one click at voxel (3, 4, 5)); ``sent`` records every request from then on."""

    def __init__(self, mod, url: str) -> None:
        self.mod = mod
        self.scene = slicer.vtkMRMLScene()
        rng = np.random.default_rng(0)
        self.a = int16_volume_node(self.scene, rng.integers(0, 400, size=SHAPE), AFFINE_A, "A")
        self.b = int16_volume_node(self.scene, rng.integers(0, 400, size=SHAPE), AFFINE_B, "B")
        self.seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        self.plus = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        self.logic = mod.MambaHoMELogic()
        self.logic.connect(url, TOKEN)
        self.logic.set_prompt_model("echo", check=False)
        self.click(AFFINE_A, [3, 4, 5])
        assert len(self.logic.prompt_points(self.a, self.seg, self.plus, None)) == 1
        self.sent: List[Tuple[str, str]] = []
        real = self.logic.client._request

        def recorded(method, path, *args, **kwargs):
            self.sent.append((method, path))
            return real(method, path, *args, **kwargs)

        self.logic.client._request = recorded

    def click(self, affine, voxel) -> None:
        self.plus.AddControlPointWorld(vtk.vtkVector3d(*_world(affine, voxel)))

    def names(self) -> List[str]:
        segmentation = self.seg.GetSegmentation()
        return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]

    def assert_untouched(self) -> None:
        """Nothing sent, B not uploaded, the object on A still open under the working name, its mask as answered."""
        assert self.sent == [], self.sent
        assert self.logic.prompt_upload(self.b) is not None  # B holds no session: it was not uploaded
        assert self.names() == [self.mod.INTERACTIVE_SEGMENT]
        assert self.logic.open_segment_id(self.seg)
        assert self.logic.mask is not None and self.logic.mask[3, 4, 5]
        assert self.logic.take_notice() is None  # no "kept as segment ..." of an ended object

    def assert_object_continues_on_a(self) -> None:
        """The next click on A refines the same object: it holds the first click too, and Undo takes back only the
        second (a new object would hold the second click only, its Undo then nothing)."""
        self.click(AFFINE_A, [20, 16, 13])
        self.logic.prompt_points(self.a, self.seg, self.plus, None)
        assert self.logic.mask[3, 4, 5] and self.logic.mask[20, 16, 13]
        assert self.names() == [self.mod.INTERACTIVE_SEGMENT]
        self.logic.undo(self.a, self.seg)
        assert self.logic.mask[3, 4, 5] and not self.logic.mask[20, 16, 13]


@pytest.fixture()
def walk(tmp_path):
    mod = load_module()
    with echo_server(tmp_path, TOKEN) as (url, _):
        yield Walk(mod, url)


def test_points_outside_the_selected_volume_are_refused_without_ending_the_object_on_the_other(walk):
    """The user places a point on A but has B selected, and presses Send new points: "Nothing sent", naming B, and
    nothing else happens. Before, A's object was ended first (renamed, its Undo gone) and B uploaded."""
    walk.click(AFFINE_A, [10, 10, 10])  # on A, 100 mm away from B
    refused = r"Nothing sent: 1 point of 'plus' lies outside the volume 'B'"
    with pytest.raises(walk.mod.NothingToSendError, match=refused):
        walk.logic.prompt_points(walk.b, walk.seg, walk.plus, None)
    walk.assert_untouched()
    # that point is still unsent: with A selected again, Send sends it into the same object
    walk.logic.prompt_points(walk.a, walk.seg, walk.plus, None)
    assert walk.logic.mask[3, 4, 5] and walk.logic.mask[10, 10, 10]
    assert walk.names() == [walk.mod.INTERACTIVE_SEGMENT]
    walk.assert_object_continues_on_a()


def test_an_roi_outside_the_selected_volume_is_refused_without_ending_the_object_on_the_other(walk):
    roi = walk.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*_world(AFFINE_A, [10, 10, 8]))
    roi.SetSize(6.0, 6.0, 6.0)
    with pytest.raises(ValueError, match=r"the ROI 'box' lies outside the volume 'B'"):
        walk.logic.prompt_roi(walk.b, walk.seg, roi)
    walk.assert_untouched()
    walk.assert_object_continues_on_a()


def test_undo_with_another_volume_selected_is_refused_and_the_object_keeps_its_undo(walk):
    refused = r"Nothing to undo on 'B': the open object was prompted on 'A'"
    with pytest.raises(walk.mod.NothingToUndoError, match=refused):
        walk.logic.undo(walk.b, walk.seg)
    walk.assert_untouched()
    walk.assert_object_continues_on_a()
