"""Walk 5 of the 3D Slicer module: checks of the volume and of the server address that held only on the first upload,
or failed with Python's words. Real MRML classes (``slicer-core``), the real spinal T2 read by Slicer's storage node, a
live server with the echo promptable model.

Found: a volume put under a transform (Registration, Transforms module) after its first prompt was prompted on with
its untransformed grid (the check "harden its transform first" ran on the first upload only, so the clicks, placed in
the transformed world, landed on other voxels); a volume node without an image (a node made in the Data module, a
failed load) failed with "'NoneType' object has no attribute 'GetMTime'"; an address typed as Slicer users type it,
``127.0.0.1:8765`` without ``http://``, was refused as "unknown url type: 127.0.0.1"."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import click, file_volume_node, ijk_to_ras, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-walk5-volume"


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
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.set_prompt_model("echo")
        yield mod, logic, scene, t2, seg, plus, url


def test_a_volume_moved_under_a_transform_after_its_first_prompt_is_refused(walk):
    """Prompt, then put the volume under a translation (as Registration leaves it) and prompt again: refused with the
    module's "harden its transform first", nothing sent; hardened, the prompt is answered on the new grid."""
    mod, logic, scene, t2, seg, plus, url = walk
    click(plus, t2, np.array([30, 27, 26]))
    logic.prompt_points(t2, seg, plus, None)
    drawn = logic.mask.copy()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.0)
    transform.SetMatrixTransformToParent(m)
    t2.SetAndObserveTransformNodeID(transform.GetID())
    plus.AddControlPointWorld(vtk.vtkVector3d(*(ijk_to_ras(t2) @ np.r_[30.0, 29.0, 26.0, 1.0])[:3] + [12.0, 0, 0]))
    with pytest.raises(ValueError, match="harden its transform"):
        logic.prompt_points(t2, seg, plus, None)
    assert np.array_equal(logic.mask, drawn)
    with pytest.raises(ValueError, match="harden its transform"):
        logic.segment(t2, seg)


def test_a_volume_node_without_an_image_is_said_in_words(walk):
    mod, logic, scene, t2, seg, plus, url = walk
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing loaded")
    click(plus, t2, np.array([30, 27, 26]))
    for action in (lambda: logic.segment(empty, seg), lambda: logic.prompt_points(empty, seg, plus, None),
                   lambda: logic.session_key(empty)):
        with pytest.raises(ValueError, match="holds an image"):
            action()


def test_an_address_without_http_is_taken_as_http(walk):
    """``127.0.0.1:PORT`` (no scheme, as typed from `mambahome serve`'s host and port) connects; an empty address
    is refused in words."""
    mod, logic, scene, t2, seg, plus, url = walk
    fresh = mod.MambaHoMELogic()
    info = fresh.connect(url.replace("http://", ""), TOKEN)
    assert info["server"] == "mambahome" and fresh.client.url == url
    with pytest.raises(ValueError, match="server address"):
        mod.MambaHoMELogic().connect("  ", TOKEN)
