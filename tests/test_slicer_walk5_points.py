"""Walk 5 of the 3D Slicer module on a real volume (the spinal T2, read by Slicer's own storage node): what a user
does with the Markups lists and the ROI that the module answered wrongly or not at all.

Found: a point deleted from the + list (a misplaced click) made the next new point of that list never be sent (the
module counted the list's points, not which ones it had sent); points placed outside the volume (on another volume's
position) and a Send without new points did nothing at all, without a word; a point whose position was unset in the
Markups table was sent as a click at the world origin; an ROI that misses the volume was answered with the server's
"box (59, 54, 51)-(59, 54, 51) has zero size" about voxels the user never chose."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import click, file_volume_node, ijk_to_ras, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-walk5-points"


@pytest.fixture()
def walk(shared_data, tmp_path):
    src = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    mod = load_module()
    with echo_server(tmp_path, TOKEN) as (url, _):
        scene = slicer.vtkMRMLScene()
        t2 = file_volume_node(scene, src, "t2")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "t2 MambaHoME")
        plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        minus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "minus")
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.set_prompt_model("echo")
        yield mod, logic, scene, t2, seg, plus, minus


def test_a_point_added_after_deleting_a_sent_one_is_sent(walk):
    """The user clicks three times, sends, deletes the misplaced third point and places a better one: Send sends the
    new one (before: nothing was sent, and nothing said so, as the list held as many points as were sent)."""
    mod, logic, scene, t2, seg, plus, minus = walk
    for v in ([30, 27, 26], [30, 29, 26], [20, 20, 20]):
        click(plus, t2, np.array(v))
    assert len(logic.prompt_points(t2, seg, plus, minus)) == 3
    plus.RemoveNthControlPoint(2)
    click(plus, t2, np.array([40, 30, 26]))
    updates = logic.prompt_points(t2, seg, plus, minus)
    assert len(updates) == 1
    assert logic.mask[40, 30, 26]
    # sent once: a Send with nothing new sends nothing again
    with pytest.raises(mod.NothingToSendError, match="no new points"):
        logic.prompt_points(t2, seg, plus, minus)


def test_points_outside_the_volume_are_said_not_sent(walk):
    """A point placed outside the selected volume (here far beyond its corner) is not sent, and the user is told so:
    alone, the Send is refused with a message naming the list and the volume; with a point inside, that one is sent
    and the status says the other was left out. Before: silently nothing."""
    mod, logic, scene, t2, seg, plus, minus = walk
    click(plus, t2, np.array([500, 500, 500]))
    with pytest.raises(mod.NothingToSendError, match=r"outside the volume 't2'") as err:
        logic.prompt_points(t2, seg, plus, minus)
    assert "'plus'" in str(err.value)
    assert logic.mask is None and seg.GetSegmentation().GetNumberOfSegments() == 0
    click(minus, t2, np.array([30, 27, 26]))
    click(plus, t2, np.array([30, 28, 26]))
    updates = logic.prompt_points(t2, seg, plus, minus)
    assert len(updates) == 2
    notice = logic.take_notice()
    assert notice is not None and "1 point" in notice and "outside the volume 't2'" in notice


def test_a_point_with_an_unset_position_is_not_sent_as_a_click_at_the_origin(walk):
    """Markups table -> a point's position cleared ("unset"): it has no position, and is not a click at (0, 0, 0)."""
    mod, logic, scene, t2, seg, plus, minus = walk
    origin_voxel = np.rint(np.linalg.inv(ijk_to_ras(t2)) @ np.r_[0.0, 0.0, 0.0, 1.0])[:3].astype(int)
    click(plus, t2, np.array([30, 27, 26]))
    plus.AddControlPointWorld(vtk.vtkVector3d(0.0, 0.0, 0.0))
    plus.UnsetNthControlPointPosition(1)
    updates = logic.prompt_points(t2, seg, plus, minus)
    assert len(updates) == 1
    inside = np.all((origin_voxel >= 0) & (origin_voxel < np.asarray(logic.mask.shape)))
    if inside:
        assert not logic.mask[tuple(origin_voxel)]


def test_an_roi_outside_the_volume_is_refused_in_its_words(walk):
    """An ROI that does not overlap the volume: refused before anything is sent, naming the ROI and the volume (before:
    the server's "box (59, 54, 51)-(59, 54, 51) has zero size" of a box clipped to the volume's corner)."""
    mod, logic, scene, t2, seg, plus, minus = walk
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*(ijk_to_ras(t2) @ np.r_[1000.0, 1000.0, 1000.0, 1.0])[:3])
    roi.SetSize(10.0, 10.0, 10.0)
    with pytest.raises(ValueError, match=r"the ROI 'box' lies outside the volume 't2'"):
        logic.prompt_roi(t2, seg, roi)
    assert logic.mask is None
    # moved onto the volume, it is answered
    roi.SetCenter(*(ijk_to_ras(t2) @ np.r_[30.0, 27.0, 26.0, 1.0])[:3])
    update = logic.prompt_roi(t2, seg, roi)
    assert update.model_id == "echo"
