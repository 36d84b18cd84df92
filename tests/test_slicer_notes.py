"""The 3D Slicer module shows the server's ``notes`` with a segmentation (after its warnings), and its *Modality* list
starts at *auto*: the Logic (real MRML classes from ``slicer-core``, no Qt) against a live server and real volumes."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

# the same conditions as tests/test_slicer_logic.py: skipped exactly where those are
from slicer_support import file_volume_node, load_module, slicer  # noqa: E402

import vtk  # noqa: E402

from mambahome_client import Segmentation, pack_array  # noqa: E402
from server_support import cpu_server  # noqa: E402


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with cpu_server(tmp_path_factory.mktemp("slicer-notes-server"), None) as (url, _):
        yield url


def seg(**kw) -> Segmentation:
    return Segmentation(np.zeros((2, 2, 2), np.uint8), ["background", "organ"], [(0, 0, 0), (1, 0, 0)], "default",
                        "v1", 2.0, **kw)


def test_the_status_line_says_each_note_after_the_warnings(mod):
    text = mod.MambaHoMELogic.segmentation_text
    assert text(seg()) == "Segmented with default in 2.0 s"
    assert text(seg(notes=["ran on the CPU."])) == "Segmented with default in 2.0 s. Note: ran on the CPU."
    assert text(seg(warnings=["looks like CT."], notes=["ran on the CPU."])) == (
        "Segmented with default in 2.0 s. Warning: looks like CT. Note: ran on the CPU.")


def test_a_servers_notes_reach_the_status_line_and_the_log_once(mod, monkeypatch, caplog):
    """What the Segment button shows for a server answer with notes (an out-of-memory fallback to the CPU), read by the
    real client from a real pack; notes go to the log at info level (no doubt on the result), warnings at warning."""
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vol")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 5, 6)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    logic = mod.MambaHoMELogic()
    from mambahome_client import Client, SessionInfo

    logic.client = Client("http://127.0.0.1:9")
    note = "out of memory on cuda:0 with 4 window(s) per batch; retrying on cpu with 1 per batch, stitching on cpu"
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    meta = {"class_names": ["background", "organ"], "colors": None, "model_id": "default", "model_version": "v1",
            "seconds": 3.0, "notes": [note], "warnings": []}
    monkeypatch.setattr(logic.client, "_request", lambda *a, **k: (pack_array(labels, meta), {}))
    monkeypatch.setattr(logic, "session_for", lambda *a, **k: SessionInfo("s" * 16, (4, 5, 6), np.eye(4), 60.0))
    with caplog.at_level(logging.INFO):
        result = logic.segment(volume, node)
        status = logic.show_segmentation(node, volume, result)
    assert result.notes == [note]
    assert status == f"Segmented with default in 3.0 s. Note: {note}"
    logged = [r for r in caplog.records if note in r.getMessage()]
    assert len(logged) == 2 and all(r.levelno == logging.INFO for r in logged)  # once per show_segmentation
    assert node.GetSegmentation().GetNumberOfSegments() == 1


def test_the_modality_list_starts_at_auto_which_sends_none(mod):
    assert mod.AUTO_MODALITY == "auto"
    assert mod.MambaHoMELogic.modality_choice("auto") is None
    assert mod.MambaHoMELogic.modality_choice("") is None
    assert mod.MambaHoMELogic.modality_choice("MR") == "MR"
    src = Path(mod.__file__).read_text()
    assert 'addItems([AUTO_MODALITY, "CT", "MR", "US", "other"])' in src  # auto is the first, preselected, entry
    assert "modality_choice(self.ui.modalityComboBox.currentText)" in src


def test_a_real_ct_and_mr_segmented_on_auto_follow_their_own_intensity_rule(mod, server, shared_data, caplog):
    """With the old fixed first entry "CT", the spinal cord MRI went through the CT rule (another result, no warning);
    on auto the server reads the modality from the voxels: the CT from its Hounsfield units, the MR by the model's rule.
    """
    ct_file = shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"
    mr_file = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not (ct_file.is_file() and mr_file.is_file()):
        pytest.skip("the shared abdomen CT and spinal cord MRI are not present")
    scene = slicer.vtkMRMLScene()
    logic = mod.MambaHoMELogic()
    logic.connect(server)
    ct = file_volume_node(scene, ct_file, "abdomen ct")
    with caplog.at_level(logging.WARNING):
        auto = logic.segment(ct, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct auto"), modality=None)
    info = logic.session_for(ct)
    assert (info.modality, info.modality_source) == ("CT", "guessed")
    # it used to be told to pass "--modality CT on the command line"; the bundled model's demo note (phantoms
    # only) is the one warning left
    assert [w for w in auto.warnings if "synthetic phantoms only" not in w] == []
    assert not [r for r in caplog.records
                if "MambaHoME" in r.getMessage() and "synthetic phantoms only" not in r.getMessage()]

    mr = file_volume_node(scene, mr_file, "spine t2")
    on_auto = logic.segment(mr, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr auto"), modality=None)
    assert logic.session_for(mr).modality is None  # not a CT: the model's own rule
    as_mr = logic.segment(mr, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr"), modality="MR")
    assert np.array_equal(on_auto.labels, as_mr.labels)


def test_auto_does_not_reuse_a_session_uploaded_with_a_modality(mod):
    """The Widget's Segment on auto after a Segment as CT: the cached CT session would keep the CT rule."""
    logic = mod.MambaHoMELogic()
    from mambahome_client import SessionInfo

    info = SessionInfo("s" * 16, (2, 2, 2), np.eye(4), 60.0, modality="CT", modality_source="client")
    logic._sessions["vol"] = (info, ("stamp",), "CT")
    assert logic.cached_session("vol", ("stamp",), None) is info  # the Logic's API: None = whichever
    assert logic.cached_session("vol", ("stamp",), None, exact=True) is None  # the Widget's auto
    assert logic.cached_session("vol", ("stamp",), "CT", exact=True) is info
    logic._sessions["vol"] = (info, ("stamp",), None)
    assert logic.cached_session("vol", ("stamp",), None, exact=True) is info


def test_a_session_closed_while_the_server_answered_counts_as_gone(mod):
    """The reaper may drop an idle session while a request on it runs: that 404 says "session 'x' was closed", and the
    module showed it as an error instead of uploading the volume again as it does for "no session 'x'"."""
    from mambahome_client.client import NotFoundError

    gone = mod._session_gone
    assert gone(NotFoundError("POST /sessions/abc/segment: HTTP 404: session 'abcdefghijklmnop' was closed", 404))
    assert gone(NotFoundError("POST /sessions/abc/segment: HTTP 404: no session 'abcdefghijklmnop' (it may have "
                              "expired after 1800 s idle); upload the volume again", 404))
    assert not gone(NotFoundError("POST /sessions/abc/prompts: HTTP 404: no model 'x' on this server", 404))
