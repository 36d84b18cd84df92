"""The 3D Slicer module shows the server's segment ``warnings`` (a model meeting a modality it never saw): the
Logic (real MRML classes from ``slicer-core``, no Qt) against a live server whose model saw MR data only. The
Widget's Segment button shows what :meth:`MambaHoMELogic.show_segmentation` returns in its status line."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

# the same conditions as tests/test_slicer_logic.py: skipped exactly where those are
from slicer_support import load_module, slicer  # noqa: E402

from engine.io import save_volume  # noqa: E402
from engine.server.config import ServerConfig  # noqa: E402
from engine.synth import make_phantom  # noqa: E402
from server_support import running_server  # noqa: E402

MR_ONLY = "tiny-mr"
WARNING_START = "ct_scan: the model tiny-mr was trained on MR data only, but it looks like CT"


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real server whose one model of its own (``tiny-mr``) was trained on MR data only."""
    from test_modality_warning import tiny_checkpoint

    root = tmp_path_factory.mktemp("slicer-warnings-server")
    (root / "models").mkdir()
    tiny_checkpoint(root / "models" / f"{MR_ONLY}.safetensors", "MR", seen=["MR"], version=MR_ONLY)
    cfg = ServerConfig(models_dir=root / "models", cases_dir=root / "cases", device="cpu")
    with running_server(cfg) as (url, _):
        yield url


def phantom_node(scene, tmp_path: Path, modality: str, name: str):
    """A synthetic phantom volume of ``modality`` read into a scalar volume node named ``name``, as Slicer loads
    a file."""
    image, _ = make_phantom((32, 32, 24), modality, seed=2).to_volumes()
    path = save_volume(tmp_path / f"{name}.nii.gz", image.data, image)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"could not read {path}"
    node.SetName(name)  # the server names its warnings by the session's (the node's) name
    return node


def test_a_ct_segmented_by_an_mr_only_model_shows_the_warning_in_the_status_line_and_log(mod, server, tmp_path,
                                                                                         caplog):
    scene = slicer.vtkMRMLScene()
    volume = phantom_node(scene, tmp_path, "CT", "ct_scan")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct seg")
    logic = mod.MambaHoMELogic()
    logic.connect(server)
    logic.select_model(MR_ONLY)

    with caplog.at_level(logging.WARNING):
        result = logic.segment(volume, seg_node)
    assert len(result.warnings) == 1 and result.warnings[0].startswith(WARNING_START)
    # segmented all the same: a warning, never a refusal
    assert seg_node.GetSegmentation().GetNumberOfSegments() == len(result.class_names) - 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(WARNING_START in m for m in logged), logged

    # what the Widget's Segment button shows (its worker gets the Segmentation, then this on the GUI thread)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "again")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        status = logic.show_segmentation(other, volume, result)
    assert status.startswith(f"Segmented with {MR_ONLY} in ")
    assert f"Warning: {result.warnings[0]}" in status
    assert other.GetSegmentation().GetNumberOfSegments() == len(result.class_names) - 1
    assert sum(WARNING_START in r.getMessage() for r in caplog.records) == 1  # logged once, no dialog


def test_an_mr_segmented_by_an_mr_only_model_shows_no_warning(mod, server, tmp_path, caplog):
    scene = slicer.vtkMRMLScene()
    volume = phantom_node(scene, tmp_path, "MR", "mr_scan")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr seg")
    logic = mod.MambaHoMELogic()
    logic.connect(server)
    with caplog.at_level(logging.WARNING):
        result = logic.segment(volume, seg_node, model_id=MR_ONLY)
    assert result.warnings == []
    assert "Warning" not in logic.segmentation_text(result)
    assert not [r for r in caplog.records if "MambaHoME" in r.getMessage()]


def test_the_status_line_of_a_segmentation_lists_each_warning_and_of_an_older_server_none(mod):
    from mambahome_client import Segmentation

    labels = np.zeros((2, 2, 2), np.uint8)
    old = Segmentation(labels, ["background", "organ"], [(0, 0, 0), (1, 0, 0)], "default", "v1", 1.5)
    assert old.warnings == [] and mod.MambaHoMELogic.segmentation_text(old) == "Segmented with default in 1.5 s"
    two = Segmentation(labels, ["background", "organ"], [(0, 0, 0), (1, 0, 0)], "default", "v1", 2.0,
                       warnings=["first thing.", "second thing."])
    assert mod.MambaHoMELogic.segmentation_text(two) == ("Segmented with default in 2.0 s. Warning: first thing. "
                                                        "Warning: second thing.")
