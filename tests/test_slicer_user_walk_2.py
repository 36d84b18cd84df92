"""A second walk of the 3D Slicer module as a demanding user walks it: real MRML classes (``slicer-core``), a live
server on the CPU with a tiny automatic model (fast) and the deterministic "echo" promptable model.

What the walk found: Segment wiped every segment of the node (prompted objects the user had accepted included);
sessions were forgotten, never closed, on a reconnect and a closed scene (a few walks filled the server); the server
full answered in words for programs; a promptable active model was refused by the server after the upload, pointing
to ``mambahome prompt`` and napari; the first, slow segmentation said nothing of why it is slow."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from slicer_support import (  # noqa: F401 - skips first
    click, file_volume_node, ijk_to_ras, load_module, slicer, tiny_mr_root,
)

from mambahome_client.client import BusyError, ServerError  # noqa: E402
from server_support import connected_client, cpu_server, echo_server  # noqa: E402

pytest.importorskip("engine.interactive")

TOKEN = "slicer-user-walk-2"
TINY = "tiny-mr"


@pytest.fixture(scope="module")
def mod():
    return load_module()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_mr_root(tmp_path_factory.mktemp("walk2"), TINY)


@pytest.fixture()
def served(root, tmp_path):
    """A live server on the CPU (its own case folder per test) offering the tiny model and the echo model."""
    with echo_server(tmp_path, TOKEN, root / "models") as (url, app):
        yield url, app


def _ids(seg_node) -> dict:
    segmentation = seg_node.GetSegmentation()
    return {segmentation.GetNthSegment(n).GetName(): segmentation.GetNthSegmentID(n)
            for n in range(segmentation.GetNumberOfSegments())}


def _held(url: str) -> int:
    """Sessions the server holds now (all clients)."""
    return int(connected_client(url, TOKEN).health()["sessions"])


def test_segment_keeps_accepted_prompted_objects_and_own_segments(mod, served, root):
    """Segment into a node holding an accepted prompted object, a hand-drawn segment and a renamed automatic segment:
    all three stay voxel for voxel; only the previous Segment result (its names unchanged) is replaced, and the status
    line says what was replaced and what was kept. Before, Segment removed every segment of the node silently.

    The new automatic segments are the server's result less the kept segments' voxels (the user's segments are
    corrections and win), and the status line says how many voxels were left to them. This walk first asserted that
    each automatic segment was the server's class whole: it then overlapped the accepted object, and the node saved
    as ``.seg.nrrd`` was refused by the engine as a training case ("segments overlap")."""
    url, _ = served
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
    shape, affine = volume.GetImageData().GetDimensions(), ijk_to_ras(volume)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.models()
    logic.set_prompt_model("echo")

    click(plus, volume, (16, 16, 12))
    logic.prompt_points(volume, seg, plus, None)
    lesion = logic.mask.copy()
    assert lesion.any()
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment(_ids(seg)[mod.INTERACTIVE_SEGMENT]).SetName("lesion")  # the user accepts the object

    drawn = np.zeros(shape, dtype=bool)  # a segment of the user's own (Segment Editor), with its own labelmap
    drawn[2:6, 3:9, 4:7] = True
    own = slicer.vtkSegment()
    own.SetName("drawn")
    own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, affine))
    segmentation.AddSegment(own, "drawn_by_hand")

    logic.select_model(TINY)
    first = logic.segment(volume, seg)
    classes = first.class_names[1:]
    names = set(_ids(seg))
    assert {"lesion", "drawn"} <= names and set(classes) <= names and len(names) == 2 + len(classes)
    assert np.array_equal(mod.segment_mask(seg, _ids(seg)["lesion"], shape, affine), lesion)
    assert np.array_equal(mod.segment_mask(seg, _ids(seg)["drawn"], shape, affine), drawn)
    users = lesion | drawn
    assert ((first.labels > 0) & lesion).any(), "the walk needs an object inside the result"
    for value, name in enumerate(first.class_names[1:], start=1):
        # the server's class less the user's voxels: no voxel is in two segments (before: the class whole)
        assert np.array_equal(mod.segment_mask(seg, _ids(seg)[name], shape, affine),
                              (first.labels == value) & ~users), name

    # The user renames one automatic segment (accepts it) and presses Segment again.
    accepted = f"{classes[0]} (checked)"
    segmentation.GetSegment(_ids(seg)[classes[0]]).SetName(accepted)
    status = logic.show_segmentation(seg, volume, first)  # what the Widget's Segment button runs on the GUI thread
    names = sorted(segmentation.GetSegment(i).GetName() for i in _ids(seg).values())
    assert len(names) == segmentation.GetNumberOfSegments()  # no two segments of one name
    assert sorted(names) == sorted(["lesion", "drawn", accepted] + classes)
    checked = (first.labels == 1) & ~users  # as the first Segment left it
    assert checked.any()
    assert np.array_equal(mod.segment_mask(seg, _ids(seg)[accepted], shape, affine), checked)
    assert np.array_equal(mod.segment_mask(seg, _ids(seg)["lesion"], shape, affine), lesion)
    assert np.array_equal(mod.segment_mask(seg, _ids(seg)["drawn"], shape, affine), drawn)
    users |= checked  # the renamed segment is the user's now: the new segments leave its voxels out too
    for value, name in enumerate(first.class_names[1:], start=1):
        assert np.array_equal(mod.segment_mask(seg, _ids(seg)[name], shape, affine),
                              (first.labels == value) & ~users), name
    kept = ["lesion", "drawn", accepted]  # in the node's order
    left = int(((first.labels > 0) & users).sum())
    assert f"; kept your other segments ({', '.join(kept)}); replaced the previous Segment result " \
           f"({', '.join(classes[1:])}); left {left} voxels of the result to your segments (" in status, status


def test_sessions_are_closed_on_reconnect_scene_close_and_a_dead_server(mod, served, root, tmp_path):
    """Connect again (the same server, then another) and close the scene: the server gets its sessions back. The open
    object ends as after a switch of model (its segment kept, its points not sent again). A server that is gone or
    never answers costs the caller at most the short timeout and raises nothing."""
    url, _ = served
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
    other = file_volume_node(scene, root / "mr.nii.gz", "mr copy")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
    plus = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.set_prompt_model("echo")
    logic.session_for(other)
    click(plus, volume, (16, 16, 12))
    logic.prompt_points(volume, seg, plus, None)
    first_object = logic.mask.copy()
    assert _held(url) == 2

    logic.connect(url, TOKEN)  # the same server again
    assert _held(url) == 0
    logic.set_prompt_model("echo")
    click(plus, volume, (8, 8, 6))
    (update,) = logic.prompt_points(volume, seg, plus, None)  # the new click only: the first one is not resent
    ids = _ids(seg)
    assert set(ids) == {f"{mod.INTERACTIVE_SEGMENT} (echo)", mod.INTERACTIVE_SEGMENT}
    shape, affine = volume.GetImageData().GetDimensions(), ijk_to_ras(volume)
    kept = mod.segment_mask(seg, ids[f"{mod.INTERACTIVE_SEGMENT} (echo)"], shape, affine)
    assert np.array_equal(kept, first_object)
    assert not logic.mask[16, 16, 12] and logic.mask[8, 8, 6]
    assert _held(url) == 1

    with cpu_server(tmp_path / "second", TOKEN) as (second_url, _):
        logic.connect(second_url, TOKEN)  # another server: the first one's session is closed
        assert _held(url) == 0
        logic.session_for(volume)
        assert _held(second_url) == 1
        thread = logic.release_sessions(background=True, scene_closed=True)  # the Widget on a scene close
        thread.join(timeout=10)
        assert _held(second_url) == 0 and logic.mask is None and logic._object_key is None
        logic.session_for(volume)

    # the second server is gone now: closing its session fails quietly and fast
    t0 = time.monotonic()
    logic.connect(url, TOKEN)
    assert time.monotonic() - t0 < 5

    # a server that accepts the connection and never answers: the caller waits the short timeout, no longer
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        logic.session_for(volume)
        logic.client = mod.Client(f"http://127.0.0.1:{mute.getsockname()[1]}", token=TOKEN)
        t0 = time.monotonic()
        assert logic.release_sessions(timeout_s=0.5) is None
        assert time.monotonic() - t0 < 3
        assert logic._sessions == {}


def test_a_full_server_is_said_in_words_for_a_slicer_user(mod, root, tmp_path):
    """Another program holds the server's only session: the upload is refused with what a Slicer user can do, as the
    per-client 429 already was (before, "HTTP 503 ... close one" spoke to programs)."""
    with cpu_server(tmp_path / "server", TOKEN, max_sessions=1) as (url, _):
        connected_client(url, TOKEN).upload_file(root / "mr.nii.gz")
        scene = slicer.vtkMRMLScene()
        volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
        logic = mod.MambaHoMELogic()
        logic.connect(url, TOKEN)
        with pytest.raises(BusyError) as caught:
            logic.session_for(volume)
        text = str(caught.value)
        assert text.startswith(f"The server {url} holds as many volumes as it allows for all its users")
        assert "connect again or close the scene" in text and "Wait a few minutes" in text
        assert caught.value.status == 503


def test_a_promptable_model_is_refused_before_the_upload_in_slicer_words(mod, served, root):
    """The active model is promptable: Segment refuses before anything is uploaded, pointing to the Prompts section;
    the server itself answers a 400 that names no client (before: ``mambahome prompt``, napari, engine.interactive)."""
    url, _ = served
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.select_model("echo")
    with pytest.raises(ValueError, match=r"'echo' is a promptable model: .* Prompts section"):
        logic.segment(volume, seg)
    assert _held(url) == 0 and seg.GetSegmentation().GetNumberOfSegments() == 0  # nothing was sent

    # the server's own answer, to a program naming the model
    client = connected_client(url, TOKEN)
    session = client.upload_file(root / "mr.nii.gz")
    with pytest.raises(ServerError) as caught:
        client.segment(session.session_id, model_id="echo")
    assert caught.value.status == 400 and caught.value.code == "not_segmentation"
    message = str(caught.value)
    assert "promptable" in message and "automatic model" in message
    assert not any(word in message for word in ("mambahome prompt", "napari", "engine.interactive"))

    # another client makes the promptable model active after this module read the list: the server's refusal comes
    # back in the module's words
    logic.select_model(TINY)
    client.select_model("echo")
    with pytest.raises(ValueError, match="Prompts section"):
        logic.segment(volume, seg)
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_the_status_says_the_first_segmentation_loads_the_model(mod, served, root):
    """While Segment waits (the server reports no progress of a segmentation) the status line counts the seconds and,
    the first time with a model on this connection, says the server loads it first (a minute on a CPU server)."""
    url, _ = served
    scene = slicer.vtkMRMLScene()
    volume = file_volume_node(scene, root / "mr.nii.gz", "mr")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mr MambaHoME")
    logic = mod.MambaHoMELogic()
    logic.connect(url, TOKEN)
    logic.select_model(TINY)
    assert logic.check_segment_model() == TINY
    waiting = logic.segmenting_text(TINY)
    assert waiting.startswith(f"Segmenting on the server with {TINY}...") and "loads it on the server" in waiting
    assert "minute" in waiting
    assert " 12 s" in logic.segmenting_text(TINY, 12.3)
    logic.segment(volume, seg)
    assert "loads it" not in logic.segmenting_text(TINY, 3.0)
    logic.connect(url, TOKEN)  # another connection: the server may have loaded another model since
    assert "loads it" in logic.segmenting_text(TINY)
