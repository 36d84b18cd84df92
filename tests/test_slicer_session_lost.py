"""The 3D Slicer module when the server drops a volume's session mid-annotation (idle timeout, or a restarted
server): the object drawn so far stays, and the next Send starts a new object from the points not answered yet
only. Real MRML classes (``slicer-core``), a live server on the CPU, the real spinal T2."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, nib, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import cpu_server  # noqa: E402

TOKEN = "slicer-session-lost"


def test_points_answered_before_the_session_was_lost_are_not_sent_again(shared_data, tmp_path):
    """Re-uploading after the loss reset the sent-point counts, so the next Send sent every point of the list again:
    the new object redrew the ended one (kept as 'MambaHoME interactive (model)') as a second, overlapping copy."""
    pytest.importorskip("engine.interactive")
    src = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    mod = load_module()
    img = nib.load(str(src))
    with cpu_server(tmp_path, TOKEN) as (url, app):
        scene = slicer.vtkMRMLScene()
        volume = int16_volume_node(scene, img.dataobj, img.affine, "t2")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        first = np.array([30, 27, 26])
        plus.AddControlPointWorld(vtk.vtkVector3d(*(img.affine @ np.r_[first, 1.0])[:3]))
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        assert len(logic.prompt_points(volume, seg, plus, None)) == 1
        drawn = logic.mask.copy()
        assert drawn[tuple(first)]
        # the server loses the session (as after its idle timeout or a restart)
        logic.client.close_session(logic.session_for(volume).session_id)
        second = np.array([30, 29, 26])
        plus.AddControlPointWorld(vtk.vtkVector3d(*(img.affine @ np.r_[second, 1.0])[:3]))
        with pytest.raises(RuntimeError) as exc:
            logic.prompt_points(volume, seg, plus, None)
        assert "no longer holds" in str(exc.value) and "restarted" in str(exc.value)
        segmentation = seg.GetSegmentation()
        kept = segmentation.GetSegmentIdBySegmentName(f"{mod.INTERACTIVE_SEGMENT} (interactive)")
        assert kept and np.array_equal(mod.segment_mask(seg, kept, drawn.shape, img.affine), drawn)
        sent = []
        real_add_point = logic.client.add_point
        logic.client.add_point = lambda sid, voxel, *a, **kw: (sent.append(list(voxel)),
                                                               real_add_point(sid, voxel, *a, **kw))[1]
        updates = logic.prompt_points(volume, seg, plus, None)
        assert sent == [second.tolist()], f"sent again: {sent}"
        assert len(updates) == 1
        # the ended object is untouched; the new one is in the working segment
        assert np.array_equal(mod.segment_mask(seg, kept, drawn.shape, img.affine), drawn)
        assert segmentation.GetSegmentIdBySegmentName(mod.INTERACTIVE_SEGMENT)
        assert logic.client.health()["status"] == "ok"
