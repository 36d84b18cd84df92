"""The 3D Slicer module's Logic against real MRML classes (the ``slicer-core`` package) and a live server.

Slicer's ``arrayFromVolume`` order is ``(K, J, I)`` and its IJK-to-RAS matrix is the NIfTI affine; these
tests load a real NRRD (LPS, axes permuted) through a storage node, segment it on the server, and check
every grid on the way: the segmentation's, the ``.seg.nrrd`` read back by slicerio, and the saved case.
"""
from __future__ import annotations

import py_compile
import re
import shutil
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from slicer_support import MODULE_FILE, file_volume_node, load_module, nib, nrrd, slicer, slicerio  # noqa: F401 - skips first
import vtk  # noqa: E402

from engine.server.config import ServerConfig  # noqa: E402
from server_support import running_server  # noqa: E402

UI_FILE = MODULE_FILE.parent / "Resources" / "UI" / "MambaHoME.ui"
TOKEN = "slicer-test-token"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer-server")
    cfg = ServerConfig(token=TOKEN, models_dir=root / "models", cases_dir=root / "cases", device="cpu")
    with running_server(cfg) as (url, app):
        yield url, cfg, app


@pytest.fixture(scope="module")
def spine(shared_data, tmp_path_factory):
    """A real MRI (60x55x52, axes permuted against RAS) written as an LPS NRRD, as Slicer writes volumes."""
    src = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    if not src.is_file():
        pytest.skip(f"{src} not present")
    img = nib.load(str(src))
    lps = LPS @ img.affine
    out = tmp_path_factory.mktemp("spine") / "t2.nrrd"
    nrrd.write(str(out), np.asarray(img.dataobj, dtype=np.int16),
               {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
                "kinds": ["domain"] * 3, "encoding": "gzip"})
    return out, img


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def test_the_widget_compiles_and_its_ui_has_every_widget_it_uses(mod):
    py_compile.compile(str(MODULE_FILE), doraise=True)
    names = {w.get("name") for w in ET.parse(UI_FILE).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used and used <= names, f"missing in the .ui file: {sorted(used - names)}"
    assert not mod.HAVE_GUI  # outside Slicer only the Logic is there, and it imported without Qt
    assert (MODULE_FILE.parent / "Resources" / "Icons" / "MambaHoME.png").read_bytes()[:4] == b"\x89PNG"


def test_volume_geometry_puts_every_voxel_where_the_nifti_has_it(mod, spine):
    """Slicer's reader may re-index a left-handed grid (this one: K reversed); the world must not move."""
    path, img = spine
    scene = slicer.vtkMRMLScene()
    node = file_volume_node(scene, path, "t2")
    data, affine = mod.volume_geometry(node)
    np.testing.assert_allclose(affine, ijk_to_ras(node))
    assert data.dtype == np.int16 and sorted(data.shape) == sorted(img.shape)  # sent as stored: half of float32
    # nifti voxel -> Slicer voxel: a signed axis permutation plus a shift, nothing else.
    t = np.linalg.inv(affine) @ img.affine
    np.testing.assert_allclose(t, np.rint(t), atol=1e-4)
    idx = np.indices(img.shape).reshape(3, -1)
    mapped = np.rint(t[:3, :3] @ idx + t[:3, 3:4]).astype(int)
    np.testing.assert_array_equal(data[tuple(mapped)], np.asarray(img.dataobj)[tuple(idx)])


def test_segment_into_a_segmentation_node_on_the_volume_grid(mod, server, spine, tmp_path):
    url, cfg = server[:2]
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "spine seg")
    logic = mod.MambaHoMELogic()
    info = logic.connect(url, TOKEN)
    assert info["protocol"] == 1

    result = logic.segment(volume, seg_node, modality="MR")
    assert result.labels.shape == volume.GetImageData().GetDimensions()
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(result.class_names) - 1
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == result.class_names[n + 1]
        assert np.allclose(segment.GetColor(), result.colors[n + 1])
        rep = segment.GetRepresentation(mod.LABELMAP)
        m = vtk.vtkMatrix4x4()
        rep.GetImageToWorldMatrix(m)
        np.testing.assert_allclose([[m.GetElement(i, j) for j in range(4)] for i in range(4)], ijk_to_ras(volume),
                                   atol=1e-6)
    labels, names = logic.labels_from_segmentation(seg_node, volume)
    assert names == result.class_names and np.array_equal(labels, result.labels)

    # The .seg.nrrd Slicer would write reads back with slicerio on the same grid and with the same voxels.
    out = tmp_path / "spine.seg.nrrd"
    logic.save_segmentation_file(seg_node, str(out))
    read = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(read["ijkToLPS"], LPS @ ijk_to_ras(volume), atol=1e-4)
    voxels = read["voxels"]
    assert voxels.shape == result.labels.shape
    by_name = {s["name"]: s["labelValue"] for s in read["segments"]}
    for value, name in enumerate(result.class_names[1:], start=1):
        assert np.array_equal(voxels == by_name[name], result.labels == value), name

    # Uploading again is skipped while the image is unchanged.
    assert logic.session_for(volume).session_id == logic.session_for(volume).session_id


def test_save_case_from_segments_keeps_the_geometry(mod, server, spine):
    url, cfg = server[:2]
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(volume.GetImageData().GetDimensions(), dtype=np.uint8)
    labels[20:40, 10:30, 15:35] = 1
    labels[5:15, 30:50, 5:20] = 2
    mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord", "csf"],
                                    [(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    rec = logic.save_case(volume, seg_node, "MR", case_id="spine_t2")
    assert rec["class_names"] == ["background", "cord", "csf"] and rec["shape"] == list(labels.shape)
    case_label = nib.load(str(cfg.cases_dir / "spine_t2" / "label.nii.gz"))
    case_image = nib.load(str(cfg.cases_dir / "spine_t2" / "image.nii.gz"))
    np.testing.assert_allclose(case_label.affine, ijk_to_ras(volume), atol=1e-4)
    np.testing.assert_allclose(case_image.affine, ijk_to_ras(volume), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(case_image.dataobj), mod.volume_geometry(volume)[0])
    assert np.array_equal(np.asarray(case_label.dataobj), labels)
    # the same Case id again: said in this module's words (the server's are "the pack's 'overwrite': true")
    saved = (cfg.cases_dir / "spine_t2" / "label.nii.gz").read_bytes()
    labels[20:40, 10:30, 15:35] = 2
    mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord", "csf"],
                                    [(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    with pytest.raises(ValueError) as exc:
        logic.save_case(volume, seg_node, "MR", case_id="spine_t2")
    assert str(exc.value) == (f"case 'spine_t2' already exists on the server {url}: type another Case id, or leave "
                              "it empty for a new name (the saved case is unchanged)")
    assert (cfg.cases_dir / "spine_t2" / "label.nii.gz").read_bytes() == saved


def test_one_session_per_volume_uploaded_again_when_geometry_or_modality_changes(mod, server, spine):
    """A Segment press reuses the volume's session (each used to leave one open until the server refused every
    user), and a new spacing or origin, which Slicer changes without touching the voxels, uploads the volume again
    so prompts, segmentations and saved cases use the geometry on screen."""
    url, _cfg, app = server
    path, _img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    before = len(app.state.sessions)
    first = logic.session_for(volume, "MR")
    assert logic.session_for(volume).session_id == first.session_id  # None: whichever modality it has
    assert logic.session_for(volume, "MR").session_id == first.session_id
    other = logic.session_for(volume, "CT")
    assert other.session_id != first.session_id and len(app.state.sessions) == before + 1  # the old one closed

    volume.SetSpacing(2.0, 2.0, 2.0)
    volume.SetOrigin(100.0, 100.0, 100.0)
    moved = logic.session_for(volume)
    assert moved.session_id != other.session_id and len(app.state.sessions) == before + 1
    np.testing.assert_allclose(np.asarray(moved.affine), ijk_to_ras(volume), atol=1e-6)

    # A session the server dropped (idle) is uploaded again on the next Segment, once.
    app.state.sessions.close(moved.session_id)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    result = logic.segment(volume, seg_node)
    assert result.labels.shape == volume.GetImageData().GetDimensions()
    assert logic.session_for(volume).session_id != moved.session_id and len(app.state.sessions) == before + 1


def test_a_case_with_the_prompts_working_segment_is_refused_before_upload(mod, server, spine):
    url, cfg, _app = server
    path, _img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(volume.GetImageData().GetDimensions(), dtype=np.uint8)
    labels[20:40, 10:30, 15:35] = 1
    labels[5:15, 30:50, 5:20] = 2
    mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord", mod.INTERACTIVE_SEGMENT],
                                    [(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    with pytest.raises(ValueError, match="working name; rename each to its class"):
        logic.save_case(volume, seg_node, "MR", case_id="spine_working")
    assert not (cfg.cases_dir / "spine_working").exists()


def test_markups_points_become_voxels_once(mod, spine):
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    affine = ijk_to_ras(volume)
    voxel = np.array([30, 20, 25])
    ras = (affine @ np.r_[voxel, 1.0])[:3]
    points.AddControlPointWorld(vtk.vtkVector3d(*ras))
    points.AddControlPointWorld(vtk.vtkVector3d(1e4, 1e4, 1e4))  # outside the volume: dropped
    logic = mod.MambaHoMELogic()
    first = logic._new_points(points, affine, img.shape)
    assert first.tolist() == [voxel.tolist()]
    assert len(logic._new_points(points, affine, img.shape)) == 0  # already sent
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel + 2, 1.0])[:3]))
    assert logic._new_points(points, affine, img.shape).tolist() == [(voxel + 2).tolist()]


def test_prompts_fill_the_interactive_segment(mod, server, spine):
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    url, _, app = server
    app.state.models.add_in_memory("echo", *echo_interactive_model())
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    affine = ijk_to_ras(volume)
    voxel = np.array([30, 27, 26])
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel, 1.0])[:3]))
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    updates = logic.prompt_points(volume, seg_node, points, None)
    assert len(updates) == 1 and logic.mask[tuple(voxel)]
    seg_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName(mod.INTERACTIVE_SEGMENT)
    mask = mod.segment_mask(seg_node, seg_id, logic.mask.shape, affine)
    assert np.array_equal(mask, logic.mask)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*(affine @ np.r_[voxel, 1.0])[:3])
    roi.SetSizeWorld(10, 10, 10)
    logic.prompt_roi(volume, seg_node, roi)
    logic.undo(volume, seg_node)
    logic.reset(volume, seg_node)
    assert not logic.mask.any()


def _segments(mod, seg_node, shape, affine):
    """``{segment ID: (name, mask (I, J, K))}`` of a segmentation node."""
    segmentation = seg_node.GetSegmentation()
    out = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        out[segment_id] = (segmentation.GetSegment(segment_id).GetName(),
                           mod.segment_mask(seg_node, segment_id, shape, affine))
    return out


def _current(mod, segs):
    """The mask of the interactive segment (the current object)."""
    (mask,) = [m for name, m in segs.values() if name == mod.INTERACTIVE_SEGMENT]
    return mask


def _two_promptable_models_and_the_spine(server, spine):
    """The server with the ``echo`` and ``fill`` promptable stand-ins, and a scene holding the spine volume,
    an empty segmentation and a positive points node: ``(url, app, volume, segmentation, points,
    ijk-to-RAS affine, volume shape)``."""
    from server_support import echo_interactive_model

    url, _, app = server
    app.state.models.add_in_memory("echo", *echo_interactive_model())
    app.state.models.add_in_memory("fill", *echo_interactive_model(fill=True))
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, spine[0], "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    return url, app, volume, seg_node, points, ijk_to_ras(volume), volume.GetImageData().GetDimensions()


def test_the_chosen_promptable_model_answers_and_a_switch_starts_a_new_object(mod, server, spine):
    """Two promptable models on the server: prompts go to the chosen one (its answer and the segment
    show it), a switch keeps the old object's segment as drawn and starts a new object, and a model the
    server does not offer is refused naming it, changing nothing (the refused points are sent later)."""
    pytest.importorskip("engine.interactive")
    from mambahome_client import NotFoundError, ServerError

    url, app, volume, seg_node, points, affine, shape = _two_promptable_models_and_the_spine(server, spine)

    def click(voxel):
        points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[voxel, 1.0])[:3]))

    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)

    # Listing: exactly the server's promptable models; the segmentation model 'default' is not one.
    listed = logic.prompt_models()
    truth = {e.model_id for e in app.state.models.entries().values() if e.task == "interactive"}
    assert {m["id"] for m in listed} == truth and {"echo", "fill"} <= truth and "default" not in truth
    assert all(m["task"] == "interactive" for m in listed)

    # No choice: the server's rule answers.
    assert logic.prompt_model is None
    click([30, 27, 26])
    (u,) = logic.prompt_points(volume, seg_node, points, None)
    assert u.model_id == app.state.models.interactive_entry().model_id

    # echo: a new object (the first one stays as drawn, renamed after its model), answered by echo only.
    first, rule = logic.mask.copy(), u.model_id
    kept_first = logic.set_prompt_model("echo", segmentation_node=seg_node)
    assert logic.prompt_model == "echo" and logic.mask is None
    name, mask = _segments(mod, seg_node, shape, affine)[kept_first]
    assert name == f"{mod.INTERACTIVE_SEGMENT} ({rule})" and np.array_equal(mask, first)
    voxel = np.array([20, 15, 30])
    click(voxel)
    (u,) = logic.prompt_points(volume, seg_node, points, None)
    echo_mask = logic.mask.copy()
    assert u.model_id == "echo" and echo_mask[tuple(voxel)]
    assert not (echo_mask & first).any()  # nothing of the first object carried over, though echo may be the rule
    segs = _segments(mod, seg_node, shape, affine)
    assert np.array_equal(_current(mod, segs), echo_mask) and np.array_equal(segs[kept_first][1], first)

    # fill: the same kind of click fills far more; echo's object stays as drawn.
    kept_echo = logic.set_prompt_model("fill", segmentation_node=seg_node)
    voxel2 = np.array([40, 40, 12])
    click(voxel2)
    (u,) = logic.prompt_points(volume, seg_node, points, None)
    fill_mask = logic.mask.copy()
    assert u.model_id == "fill" and fill_mask[tuple(voxel2)] and fill_mask.sum() > 10 * echo_mask.sum()
    segs = _segments(mod, seg_node, shape, affine)
    assert segs[kept_echo][0].startswith(f"{mod.INTERACTIVE_SEGMENT} (echo)")
    assert np.array_equal(segs[kept_echo][1], echo_mask) and np.array_equal(_current(mod, segs), fill_mask)
    assert np.array_equal(segs[kept_first][1], first) and len(segs) == 3
    # A new object on the server too: its one prompt undone leaves it empty (echo's object is not behind it).
    assert logic.undo(volume, seg_node).model_id == "fill" and not logic.mask.any()
    with pytest.raises(ServerError, match="nothing to undo"):
        logic.undo(volume, seg_node)
    click(voxel2 - 4)
    logic.prompt_points(volume, seg_node, points, None)
    fill_mask = logic.mask.copy()
    assert fill_mask.sum() > 10 * echo_mask.sum()

    # An id the server does not offer: refused naming it, nothing changes.
    before = _segments(mod, seg_node, shape, affine)
    for bad, why in (("nope", "no model 'nope'"), ("default", "'default' cannot answer prompts")):
        with pytest.raises(mod.PromptModelError, match=why):
            logic.set_prompt_model(bad, segmentation_node=seg_node)
        assert logic.prompt_model == "fill" and np.array_equal(logic.mask, fill_mask)
    # ... and a model gone from the server by prompting time: the server's 404 names it, nothing changes,
    # and the refused click is sent once a model that exists is chosen.
    logic.set_prompt_model("gone", check=False)
    voxel3 = np.array([12, 40, 40])
    click(voxel3)
    with pytest.raises(NotFoundError, match="'gone'"):
        logic.prompt_points(volume, seg_node, points, None)
    after = _segments(mod, seg_node, shape, affine)
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] and np.array_equal(after[k][1], before[k][1]) for k in before)
    logic.set_prompt_model("echo")
    (u,) = logic.prompt_points(volume, seg_node, points, None)
    assert u.model_id == "echo" and logic.mask[tuple(voxel3)] and logic.mask.sum() < fill_mask.sum()
    segs = _segments(mod, seg_node, shape, affine)  # the fill object kept as drawn when echo's new one began
    (kept_fill,) = [k for k, (name, _) in segs.items() if name == f"{mod.INTERACTIVE_SEGMENT} (fill)"]
    assert np.array_equal(segs[kept_fill][1], fill_mask) and np.array_equal(_current(mod, segs), logic.mask)
    assert len(segs) == 4


def test_an_initial_mask_from_a_segment_goes_to_the_chosen_model(mod, server, spine):
    pytest.importorskip("engine.interactive")
    from server_support import echo_interactive_model

    url, _, app = server
    app.state.models.add_in_memory("echo", *echo_interactive_model())
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(volume.GetImageData().GetDimensions(), dtype=np.uint8)
    labels[20:40, 10:30, 15:35] = 1
    (start_id,) = mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord"],
                                                  [(0, 0, 0), (1, 0, 0)])
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.set_prompt_model("echo")
    u = logic.prompt_segment(volume, seg_node, start_id)
    assert u.model_id == "echo" and np.array_equal(logic.mask, labels == 1)
    segs = _segments(mod, seg_node, labels.shape, ijk_to_ras(volume))
    assert np.array_equal(_current(mod, segs), labels == 1) and np.array_equal(segs[start_id][1], labels == 1)
    assert not logic.undo(volume, seg_node).apply(logic.mask).any()


def test_a_move_of_the_servers_rule_ends_the_object_too(mod, server, spine):
    """With no model chosen, the server's rule answers; when it moves to another model (a promptable model
    made active) the server starts a new object, and the logic keeps the old one's segment as drawn."""
    pytest.importorskip("engine.interactive")
    url, app, volume, seg_node, points, affine, shape = _two_promptable_models_and_the_spine(server, spine)
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[20, 20, 20, 1.0])[:3]))
    (u,) = logic.prompt_points(volume, seg_node, points, None)
    assert u.model_id != "fill"
    first = logic.mask.copy()
    logic.select_model("fill")
    try:
        points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[40, 40, 40, 1.0])[:3]))
        (u,) = logic.prompt_points(volume, seg_node, points, None)
    finally:
        logic.rollback_model()
    assert u.model_id == "fill" and logic.object_model == "fill"
    segs = _segments(mod, seg_node, shape, affine)
    (kept,) = [m for name, m in segs.values() if name.startswith(f"{mod.INTERACTIVE_SEGMENT} (")]
    assert np.array_equal(kept, first) and np.array_equal(_current(mod, segs), logic.mask)
    assert logic.mask.sum() > 10 * first.sum()


def _a_saved_case(client, shared_data) -> None:
    """The server holds at least one saved case (a real labelled MRI)."""
    from server_support import save_a_real_case

    save_a_real_case(client, shared_data, "slicer_ft")


def _ended(logic, job):
    """The job's state once it is done, failed or cancelled (polled as the widget's timer does)."""
    deadline = time.monotonic() + 600
    while job["state"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = logic.finetune_state(job["job_id"])
    return job


def _per_class(scores) -> str:
    """The per-class sentence the status line must hold for a job's ``scores``: each class's before -> after."""
    rows = "; ".join(f"{name}: {scores['before'][name]:.3f} -> {value:.3f}" for name, value in
                     sorted(scores["after"].items()))
    return f" Per class ({scores['compared_with']} -> new): {rows}."


def test_the_status_line_says_each_classs_dice_before_and_after_as_napari_does(mod):
    """After a server fine-tune the status line gives every class's Dice, before -> after (the rows of napari's
    Fine-tune table: three decimals, "n/a" for a class one model was not scored on), not only the means."""
    scores = {"metric": "dice", "where": "2 held-out case(s) not used for training", "compared_with": "default",
              "before": {"posterior": 0.70004, "anterior": 0.8123}, "after": {"anterior": 0.8449, "posterior": 0.731,
                                                                            "tail": 0.5},
              "mean_before": 0.7562, "mean_after": 0.7880, "weaker": False}
    job = {"state": "done", "model_id": "finetune-1/best", "scores": scores, "warning": None}
    assert mod.MambaHoMELogic.score_text(job) == (
        "Dice on 2 held-out case(s) not used for training: new 0.79 vs 0.76 for default. Per class (default -> new): "
        "anterior: 0.812 -> 0.845; posterior: 0.700 -> 0.731; tail: n/a -> 0.500.")
    # the same cells as napari's table
    from mambahome_client.scores import per_class_rows

    assert per_class_rows(scores["before"], scores["after"]) == [
        ("anterior", "0.812", "0.845"), ("posterior", "0.700", "0.731"), ("tail", "n/a", "0.500")]
    # a promptable model with nothing to compare with: its own Dice per class (no means without a comparison)
    alone = dict(scores, metric="robot_dice", clicks=3, before={}, compared_with=None, mean_before=None,
                 mean_after=None)
    assert mod.MambaHoMELogic.score_text({**job, "scores": alone}) == (
        "Robot-user Dice after 3 clicks per class on 2 held-out case(s) not used for training: anterior: 0.845; "
        "posterior: 0.731; tail: 0.500.")
    weaker = {**job, "warning": "The new model scores below default (0.70 vs 0.76): choose default as the active "
                                "model to keep segmenting with it, or train longer."}
    assert mod.MambaHoMELogic.score_text(weaker).endswith("tail: n/a -> 0.500. " + weaker["warning"])
    empty = dict(scores, before={}, after={}, mean_before=None, mean_after=None)
    assert mod.MambaHoMELogic.score_text({**job, "scores": empty}).endswith(": no labelled class to score.")


def test_make_a_promptable_model_on_the_server_then_prompt_with_it(mod, server, spine, shared_data):
    """The Fine-tune box's "make a promptable model": the server trains one from its active automatic model
    and saved cases; the automatic model stays active, and the next prompts go to the new model (a new object)."""
    pytest.importorskip("engine.interactive")
    url, cfg, app = server
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    client = logic._require()
    _a_saved_case(client, shared_data)
    active = logic.models()["active"]
    logic.set_prompt_model("interactive")  # the prompt model chosen: the new model is scored against it
    job = logic.start_finetune(1, promptable=True, batch_size=1, val_fraction=0.0)
    run = None
    try:
        job = _ended(logic, job)
        assert job["state"] == "done", job
        run = job["model_id"].split("/")[0]
        # the server scored it with the robot user against the chosen prompt model; one line says how it did
        scores = job["scores"]
        assert scores["compared_with"] == "interactive" and scores["mean_after"] is not None
        text = logic.score_text(job)
        assert text.startswith(f"Robot-user Dice after {scores['clicks']} clicks on the {len(client.cases())} training "
                               f"case(s) (too few cases to hold some out): new {scores['mean_after']:.2f} vs "
                               f"{scores['mean_before']:.2f} for interactive.")
        assert _per_class(scores) in text and scores["after"]  # each class, as napari's table has it
        assert (job["warning"] is not None) == scores["weaker"] == text.endswith("or train longer.")
        assert logic.score_text({"state": "done", "scores": None}) == ""
        listing = logic.models()
        assert listing["active"] == active  # the automatic model still segments
        # a job that made no promptable model changes nothing
        assert logic.prompt_with_new_model({"state": "failed", "model_id": job["model_id"]}, listing) is None
        assert logic.prompt_with_new_model({"state": "done", "model_id": active}, listing) is None
        assert logic.prompt_model == "interactive"

        scene = slicer.vtkMRMLScene()
        volume = file_volume_node(scene, spine[0], "t2")
        seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        # one the server scored below the prompt model in use is listed, not prompted with (as napari keeps it)
        weaker = dict(job, scores=dict(scores, weaker=True))
        assert logic.prompt_with_new_model(weaker, listing, seg_node) is None and logic.prompt_model == "interactive"
        end = logic.finetune_end_text(weaker)
        assert end.startswith(f"Promptable model {job['model_id']} made on the server, not prompted with: it scores "
                              "below interactive, which stays the prompt model") and logic.score_text(weaker) in end
        assert logic.prompt_with_new_model(dict(job, scores=dict(scores, weaker=False)), listing, seg_node) \
            == job["model_id"]
        assert logic.prompt_model == job["model_id"]
        points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        affine = ijk_to_ras(volume)
        points.AddControlPointWorld(vtk.vtkVector3d(*(affine @ np.r_[30, 27, 26, 1.0])[:3]))
        (u,) = logic.prompt_points(volume, seg_node, points, None)
        assert u.model_id == job["model_id"]
    finally:
        if run is not None:  # the module's server keeps its usual models for the other tests
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_fine_tuned_model_is_scored_on_the_server_and_said_in_napari_words(mod, server, shared_data, monkeypatch):
    """The Fine-tune box's plain fine-tune: the server scores the new automatic model against its parent, as napari's
    Fine-tune section does, and the status line says it in the same words (the cases: all the training cases, too
    few to hold some out). A cancel while the server scores leaves the model made, said plainly to be unscored."""
    from server_support import instant_finetune, scoring_waits_for_cancel

    url, cfg, app = server
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    client = logic._require()
    _a_saved_case(client, shared_data)
    active = logic.models()["active"]
    runs = []
    try:
        job = _ended(logic, logic.start_finetune(1, batch_size=1, val_fraction=0.0))
        assert job["state"] == "done", job
        runs.append(job["model_id"].split("/")[0])
        scores, cases = job["scores"], client.cases()
        assert scores["metric"] == "dice" and scores["compared_with"] == active and job["not_scored"] is None
        text = logic.score_text(job)
        assert text.startswith(f"Dice on the {len(cases)} training case(s) (too few cases to hold some out): new "
                               f"{scores['mean_after']:.2f} vs {scores['mean_before']:.2f} for {active}.")
        assert _per_class(scores) in text and scores["after"]  # each class, as napari's table has it
        assert (job["warning"] is not None) == scores["weaker"] == text.endswith("or train longer.")
        assert logic.prompt_with_new_model(job, logic.models()) is None  # an automatic model: prompts unchanged
        assert logic.models()["active"] == active  # selected only when the user says so

        instant_finetune(monkeypatch)  # the training replaced (seconds, not minutes); the scoring is the real one
        scoring = scoring_waits_for_cancel(monkeypatch)
        job = logic.start_finetune(1)
        assert scoring.wait(120)
        logic.cancel_finetune(job["job_id"])
        job = _ended(logic, job)
        runs.append(job["model_id"].split("/")[0])
        assert job["state"] == "done" and job["scores"] is None
        # the cases' classes (cord, csf) are none of the model's: the server's note says so after the rest
        assert logic.score_text(job) == \
            f"{job['model_id']} was made but not scored: its scoring was cancelled by the user. Note: {job['note']}"
        assert "no class name is shared" in job["note"]
        assert job["model_id"] in {m["id"] for m in logic.models()["models"]}
        assert logic.score_text({"state": "cancelled", "scores": None, "not_scored": None}) == ""
    finally:
        for run in runs:  # the module's server keeps its usual models for the other tests
            shutil.rmtree(cfg.models_dir / run, ignore_errors=True)


def test_a_fine_tune_time_limit_asks_the_server_for_the_time_and_shows_progress_in_time(mod):
    """Slicer's Time limit, as napari's: the server's most steps and max_minutes, progress as the time's share."""
    logic = mod.MambaHoMELogic
    assert logic.finetune_request(200, 0.0) == (200, {})
    assert logic.finetune_request(200, 2.5) == (mod.SERVER_MAX_STEPS, {"max_minutes": 2.5})
    job = {"state": "running", "step": 40, "total": mod.SERVER_MAX_STEPS, "loss": 0.25}
    fraction, text = logic.progress_text(job, 2.5, 75.0)
    assert fraction == pytest.approx(0.5) and text == "Fine-tune running: step 40, 1.2 of 2.5 min, loss 0.2500"
    fraction, text = logic.progress_text({**job, "total": 200}, 0.0, 75.0)
    assert fraction == pytest.approx(0.2) and text == "Fine-tune running: step 40/200, loss 0.2500"
    assert logic.progress_text(job, 2.5, 400.0)[0] == 1.0
    rows = {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget")}
    assert rows["timeLimitSpinBox"].get("class") == "QDoubleSpinBox"


def test_a_segment_named_background_or_a_segmentation_under_a_transform_is_refused_naming_the_way_out(
        mod, server, spine):
    # a segment named "background" was saved as label 0 (erasing segments under it) without a word; a segmentation
    # under a transform was written and read on the volume's grid: shown 10 mm off, and saved shifted from the screen
    url, cfg = server[:2]
    path, img = spine
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, path, "t2")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = np.zeros(volume.GetImageData().GetDimensions(), dtype=np.uint8)
    labels[20:40, 10:30, 15:35] = 1
    labels[5:15, 30:50, 5:20] = 2
    mod.MambaHoMELogic.set_segments(seg_node, volume, labels, ["background", "cord", "background"],
                                    [(0, 0, 0), (1, 0, 0), (0, 1, 0)])
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    with pytest.raises(ValueError, match="a segment is named 'background'.*rename it"):
        logic.save_case(volume, seg_node, "MR", case_id="named_background")
    assert not (cfg.cases_dir / "named_background").exists()

    shifted = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(matrix)
    shifted.SetAndObserveTransformNodeID(transform.GetID())
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    ras = ijk_to_ras(volume) @ np.array([30.0, 20.0, 25.0, 1.0])
    points.AddControlPoint(vtk.vtkVector3d(*ras[:3]))
    for act in (lambda: logic.segment(volume, shifted), lambda: logic.save_case(volume, shifted, "MR"),
                lambda: logic.prompt_points(volume, shifted, points, None)):
        with pytest.raises(ValueError, match="harden its transform first"):
            act()
    assert shifted.GetSegmentation().GetNumberOfSegments() == 0
    assert not logic._sessions  # each refused before the volume was uploaded
