"""The 3D Slicer module when another client (napari, a second Slicer) changed the same server object between two of
its prompts: the answer is a patch of a mask the scene no longer matches, so the module reloads the server's whole
object into its segment and says so; its Undo then takes back the newest prompt on the server and the segment stays
equal to the server's object. Real MRML classes (``slicer-core``), a live server on the CPU, a stand-in model."""
from __future__ import annotations

import numpy as np
import pytest

from slicer_support import int16_volume_node, load_module, slicer  # noqa: F401 - skips first
import vtk  # noqa: E402

from server_support import connected_client, cpu_server, echo_interactive_model  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-session-changed"
AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


def _volume_node(scene, shape=(24, 20, 16)):
    return int16_volume_node(scene, np.random.default_rng(0).integers(0, 400, size=shape), AFFINE)


def _click(markups, voxel):
    markups.AddControlPointWorld(vtk.vtkVector3d(*(AFFINE @ np.r_[np.asarray(voxel, float), 1.0])[:3]))


def test_a_prompt_after_another_clients_change_reloads_the_servers_object_and_undo_stays_in_step(tmp_path):
    mod = load_module()
    with cpu_server(tmp_path, TOKEN) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        scene = slicer.vtkMRMLScene()
        volume = _volume_node(scene)
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.set_prompt_model("echo", check=False)

        def shown():
            segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName(mod.INTERACTIVE_SEGMENT)
            return mod.segment_mask(seg, segment_id, logic.mask.shape, AFFINE)

        _click(plus, [3, 4, 5])
        logic.prompt_points(volume, seg, plus, None)
        assert logic.take_notice() is None and shown()[3, 4, 5]

        sid = logic.session_for(volume).session_id
        other = connected_client(url, TOKEN)  # a napari annotator on the same session
        other.object_mask(sid)
        other.add_point(sid, [10, 11, 12], model_id="echo")

        _click(plus, [20, 15, 2])
        logic.prompt_points(volume, seg, plus, None)
        notice = logic.take_notice()
        assert notice and "Another client changed this object" in notice and "Undo" in notice
        assert logic.take_notice() is None  # told once
        server = other.object_mask(sid).mask
        assert server[3, 4, 5] and server[10, 11, 12] and server[20, 15, 2]
        np.testing.assert_array_equal(logic.mask, server)  # the whole object, not the patch on the stale mask
        np.testing.assert_array_equal(shown(), server)

        # Undo takes back the newest prompt on the server (this module's own); the scene follows without a reload
        logic.undo(volume, seg)
        assert logic.take_notice() is None
        server = other.object_mask(sid).mask
        assert server[3, 4, 5] and server[10, 11, 12] and not server[20, 15, 2]
        np.testing.assert_array_equal(logic.mask, server)
        np.testing.assert_array_equal(shown(), server)


def test_a_server_full_for_this_computer_is_explained_in_slicers_words(tmp_path):
    """The per-client cap's 429 said "close one (DELETE /sessions/<id>)", which a Slicer user cannot act on."""
    from mambahome_client.client import ServerError

    mod = load_module()
    with cpu_server(tmp_path, TOKEN, max_sessions_per_client=1) as (url, _app):
        scene = slicer.vtkMRMLScene()
        first, second = _volume_node(scene), _volume_node(scene, shape=(20, 18, 12))
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        logic.session_for(first)
        with pytest.raises(ServerError) as refused:
            logic.session_for(second)
        text = str(refused.value)
        assert refused.value.status == 429 and "holds as many volumes for this computer" in text
        assert "ask whoever runs the server" in text and "holds 1 session," in text
