"""Issue 16: the interactive panel (points, boxes, scribbles) in the dock.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_interactive.py``. Most
tests prompt through the deterministic stand-in network of tests/test_interactive.py (``GuidanceEcho``:
object = previous mask or positive prompts, minus negative prompts) swapped in through
``session.prompt_backend_factory``, so every expected object is known; the volumes are real shared
files opened with our reader (radiological display order != file order).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    saved_case,
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_interactive import ENC, GuidanceEcho

pytestmark = pytest.mark.gui

RADIUS = int(ENC.point_radius)


def write_interactive_checkpoint(path, patch=32):
    """An untrained tiny interactive checkpoint with the real task metadata (the file the panel selects)."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.interactive import InteractiveTask
    from engine.model import MambaHoME
    from engine.preprocess import Preprocessing

    task = InteractiveTask(patch_size=(patch,) * 3)
    in_channels, out_channels = task.network_channels(1, ["background", "object"])
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=in_channels, num_classes=out_channels))
    meta = {"class_names": ["background", "object"], "modality": "MR", "task": task.metadata(),
            "preprocessing": Preprocessing.for_modality("MR").to_dict(), "patch_size": [patch] * 3,
            "version": "tiny-interactive"}
    return save_checkpoint(path, model, meta)


@pytest.fixture(scope="session")
def interactive_checkpoint(tmp_path_factory):
    return write_interactive_checkpoint(tmp_path_factory.mktemp("imodels") / "interactive.safetensors")


class Echo:
    """Backend factory over GuidanceEcho; ``delay`` seconds per prompt make a prediction "slow"."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.made, self.finished, self.times = delay, [], [], []
        # cleared, a slow prediction also waits for it after its delay: a test that needs the prediction still
        # running at a later step (after opening another scan, seconds on a loaded machine) holds it there
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, checkpoint, volume, device):
        from engine.interactive import InteractiveSession

        meta = {"task": {"name": "interactive", "encoding": ENC.to_dict()}, "patch_size": [32, 32, 32],
                "class_names": ["background", "object"]}
        session = InteractiveSession((GuidanceEcho(), meta), volume, device="cpu", normalize=False)
        self.made.append((checkpoint, volume))
        if not self.delay:
            return session
        delay, outer = self.delay, self

        class Slow:
            def __getattr__(self, name):
                call = getattr(session, name)

                def slow(*args, **kwargs):
                    outer.times.append((name, time.perf_counter()))
                    time.sleep(delay)
                    outer.gate.wait(60)
                    result = call(*args, **kwargs)
                    outer.finished.append(name)
                    return result
                return slow
        return Slow()


def _open(viewer, path):
    return viewer.open(str(path), plugin="napari-mambahome")[0]


@pytest.fixture
def prompting(viewer_widget, interactive_checkpoint, shared_data):
    """The dock prompting on the hippocampus MRI (opened with our reader) through GuidanceEcho."""
    viewer, widget = viewer_widget
    echo = Echo()
    widget.session.prompt_backend_factory = echo
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    return viewer, widget, panel, image, echo


def _idle(qtbot, panel, timeout=30_000):
    qtbot.waitUntil(lambda: panel.worker is None and not (panel.ctx and panel.ctx.queue), timeout=timeout)
    qtbot.wait(20)


def _centre(image):
    return tuple(int(s) // 2 for s in np.shape(image.data))


def _ball_in_display(shape, centre, radius):
    grid = np.indices(shape)
    return ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2


# ---------------------------------------------------------------- prompts
def test_a_positive_point_makes_an_object_around_the_clicked_voxel_in_display_order(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    from napari_mambahome._geometry import layer_geometry

    assert not layer_geometry(image).display.is_identity  # the reader's radiological view is exercised
    centre = _centre(image)
    panel.points_layer.add(np.asarray(centre, float))  # as a click in the points layer does
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    assert labels.shape == np.shape(image.data) and panel.target is widget.session.labels_layer
    assert labels[centre] == panel.class_id == 1
    # the object is the ball GuidanceEcho draws around the clicked voxel, seen in the layer's own order
    np.testing.assert_array_equal(labels != 0, _ball_in_display(labels.shape, centre, RADIUS))
    assert panel.interactions == 1 and "1 prompt(s)" in panel.count_label.text()
    assert panel.last_latency is not None and "last prediction" in panel.count_label.text()


def test_negative_point_undo_and_mode_key(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    from napari.utils.key_bindings import KeyBinding

    c = np.asarray(_centre(image))
    panel.add_point(c)
    panel.add_point(c + (0, 2, 0))
    _idle(qtbot, panel)
    before = np.array(panel.target.data, copy=True)
    # T on a prompt layer flips the sign of the next point (and the panel says so)
    panel.points_layer.keymap[KeyBinding.from_str("T")](panel.points_layer)
    assert not panel.positive and "negative" in panel.mode_label.text()
    panel.points_layer.add((c + (0, 2, 0)).astype(float))
    _idle(qtbot, panel)
    after = np.asarray(panel.target.data)
    removed = (before != 0) & (after == 0)
    assert removed.any() and removed[tuple(c + (0, 2, 0))]
    assert not (after & ~before.astype(bool)).any()  # a negative point adds nothing
    # Ctrl+Z on the prompt layer takes the negative point back: the labels are exactly as before it
    panel.points_layer.keymap[KeyBinding.from_str("Control-Z")](panel.points_layer)
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(panel.target.data), before)
    assert panel.interactions == 2


def test_labels_replaced_whole_while_prompting_end_the_object_and_undo_keeps_them(prompting, qtbot):
    # Segment's "Replace edited labels?" answered Yes sets the layer's data whole (panels/segment.py); the object went
    # on over the new labels and Undo prompt wrote the old ones back, other classes too
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    _idle(qtbot, panel)
    target = panel.target
    segmentation = np.zeros(np.shape(target.data), np.asarray(target.data).dtype)
    segmentation[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, :] = 2
    segmentation[:3] = 1
    target.data = segmentation.copy()
    assert panel.target is None and panel.interactions == 0
    assert len(panel.points_layer.data) == 0  # its prompts are cleared with it
    panel.undo()
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(target.data), segmentation)
    # the next prompt starts a new object over the new labels: outside its ball they stay the segmentation
    far = c + (0, 10, 0)
    panel.add_point(far)
    _idle(qtbot, panel)
    after = np.asarray(target.data)
    ball = _ball_in_display(after.shape, far, RADIUS)
    assert panel.target is target and after[tuple(far)] == panel.class_id
    np.testing.assert_array_equal(after[~ball], segmentation[~ball])


def test_the_status_line_says_the_object_was_updated_not_still_loading(prompting, qtbot):
    # the first prompt says "loading <model>…"; nothing replaced it, so the dock said "loading" for the whole
    # object while every prediction had long been drawn
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    assert "loading" in widget.status_label.text()
    _idle(qtbot, panel)
    text = widget.status_label.text()
    assert "loading" not in text and "+ point" in text and "updated" in text
    panel.undo()
    _idle(qtbot, panel)
    assert "undo" in widget.status_label.text()


def test_box_and_scribble_prompts(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    # a rectangle drawn on the current axial slice -> a 2D box on that slice
    corners = np.array([[c[0], c[1] - 3, c[2] - 4], [c[0], c[1] - 3, c[2] + 4],
                        [c[0], c[1] + 3, c[2] + 4], [c[0], c[1] + 3, c[2] - 4]], float)
    panel.boxes_layer.add_rectangles(corners)
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    expected = np.zeros(labels.shape, bool)
    expected[c[0], c[1] - 3:c[1] + 4, c[2] - 4:c[2] + 5] = True
    np.testing.assert_array_equal(labels != 0, expected)
    # a negative scribble (brush label 2) across the box removes what it covers
    panel.toggle_mode()
    assert panel.scribbles_layer.selected_label == 2
    stroke = np.zeros(labels.shape, np.uint8)
    stroke[c[0], c[1], c[2] - 4:c[2] + 5] = 2
    panel.scribbles_layer.data = stroke
    panel.scribbles_layer.events.paint(value=[])  # what a finished brush stroke emits
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    assert not labels[c[0], c[1], c[2] - 4:c[2] + 5].any() and labels[c[0], c[1] - 3, c[2]]
    assert panel.interactions == 2


def test_a_box_dragged_past_the_image_edge_is_the_part_on_the_image(prompting, qtbot, notifications):
    """A box from outside the image to inside it was refused whole ("box corner ... lies outside the image"): an
    annotator dragging from the border expects the part on the image. A box wholly outside is still refused."""
    viewer, widget, panel, image, echo = prompting
    z = int(_centre(image)[0])
    assert panel.add_box([z, -10, -10], [z, 5, 6])
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    expected = np.zeros(labels.shape, bool)
    expected[z, 0:6, 0:7] = True  # GuidanceEcho draws the box it was given
    np.testing.assert_array_equal(labels != 0, expected)
    shape = np.asarray(labels.shape)
    assert not panel.add_box([z, shape[1] + 2, 0], [z, shape[1] + 9, 5])
    assert any("lies outside the image" in m for _, m in notifications)
    assert panel.interactions == 1


def test_undo_takes_the_undone_prompts_marker_out_of_its_prompt_layer(prompting, qtbot):
    """Ctrl+Z undid the prompt but left its red dot, box or scribble on screen: the prompt layers showed a prompt that
    no longer acted, and the annotator could not tell which prompts were in effect."""
    viewer, widget, panel, image, echo = prompting
    from napari.utils.key_bindings import KeyBinding

    c = np.asarray(_centre(image))
    undo = panel.points_layer.keymap[KeyBinding.from_str("Control-Z")]
    panel.points_layer.add(c.astype(float))  # as a click does
    _idle(qtbot, panel)
    panel.toggle_mode()
    panel.points_layer.add((c + (0, 2, 0)).astype(float))
    _idle(qtbot, panel)
    assert len(panel.points_layer.data) == 2 and panel.interactions == 2
    undo(panel.points_layer)
    _idle(qtbot, panel)
    np.testing.assert_array_equal(panel.points_layer.data, [c.astype(float)])  # the negative point is gone
    panel.toggle_mode()
    corners = np.array([[c[0], c[1] - 3, c[2] - 4], [c[0], c[1] - 3, c[2] + 4],
                        [c[0], c[1] + 3, c[2] + 4], [c[0], c[1] + 3, c[2] - 4]], float)
    panel.boxes_layer.add_rectangles(corners)
    _idle(qtbot, panel)
    stroke = np.zeros(np.shape(image.data), np.uint8)
    stroke[c[0], c[1], c[2] - 4:c[2] + 5] = 1
    panel.scribbles_layer.data = stroke
    panel.scribbles_layer.events.paint(value=[])  # what a finished brush stroke emits
    _idle(qtbot, panel)
    assert panel.interactions == 3 and len(panel.boxes_layer.data) == 1
    undo(panel.points_layer)
    _idle(qtbot, panel)
    assert not np.asarray(panel.scribbles_layer.data).any() and len(panel.boxes_layer.data) == 1
    undo(panel.points_layer)
    _idle(qtbot, panel)
    assert len(panel.boxes_layer.data) == 0 and len(panel.points_layer.data) == 1 and panel.interactions == 1


def test_a_prompt_after_choosing_another_scan_is_refused_not_drawn_into_the_hidden_one(prompting, qtbot, shared_data,
                                                                                       notifications):
    """Prompting one scan, the annotator clicks another scan in the layer list (it is shown on top) and clicks on it:
    the point went to the first scan's object, changing labels the annotator could not see."""
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.points_layer.add(c.astype(float))
    _idle(qtbot, panel)
    before = np.array(panel.target.data, copy=True)
    other = _open(viewer, shared_data / "spinal_cord_mri" / "t2_image.nii.gz")
    viewer.layers.selection.active = other  # the annotator picks the other scan
    viewer.layers.selection.active = panel.points_layer  # and clicks with the points tool
    assert widget.session.image_layer is other
    panel.points_layer.add((c + (0, 2, 0)).astype(float))
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(panel.target.data), before)
    assert len(panel.points_layer.data) == 1 and panel.interactions == 1
    assert any(kind == "error" and "Start prompting" in text and other.name in text for kind, text in notifications)
    # choosing the prompted scan again goes on with it
    viewer.layers.selection.active = image
    panel.points_layer.add((c + (0, 2, 0)).astype(float))
    _idle(qtbot, panel)
    assert panel.interactions == 2


def test_the_counts_are_per_image_and_a_reset_is_not_reported_as_a_prediction_time(prompting, qtbot, shared_data):
    """An annotator moving to the next scan saw "object 2 accepted" for its first object, and after a reset or an
    accept the count line said "last prediction 0.00 s" (the reset's instant answer)."""
    viewer, widget, panel, image, echo = prompting
    panel.add_point(np.asarray(_centre(image)))
    _idle(qtbot, panel)
    took = panel.last_latency
    assert took is not None and panel.accept_object()
    _idle(qtbot, panel)
    assert panel.objects_accepted == 1 and panel.last_latency == took  # the accept's reset left it alone
    assert f"{took:.2f} s" in panel.count_label.text()
    panel.reset_object()
    _idle(qtbot, panel)
    assert panel.last_latency == took
    assert panel.start()  # the same image again: the counts go on
    assert panel.objects_accepted == 1
    second = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1])
    widget.session.set_image(second)
    assert panel.start()
    assert panel.objects_accepted == 0 and panel.last_latency is None
    assert "0 object(s) accepted" in panel.count_label.text() and "last prediction –" in panel.count_label.text()


def test_a_new_start_reuses_the_prompt_layers_on_the_new_images_grid(prompting, qtbot, shared_data, notifications):
    """Each start used to remove and re-add three napari layers (0.2-0.8 s of GUI thread each under software
    OpenGL); the layers are now kept, emptied and moved to the chosen image's grid. And the annotator moving to
    the next scan got an error at the first click there (the previous scan's labels have another shape): the
    object now goes into the new scan's own labels, and back on the first scan into its labels again."""
    viewer, widget, panel, image, echo = prompting
    layers = (panel.points_layer, panel.boxes_layer, panel.scribbles_layer)
    panel.points_layer.add(np.asarray(_centre(image), float))
    _idle(qtbot, panel)
    first_labels = panel.target
    assert first_labels is widget.session.labels_layer and np.any(np.asarray(first_labels.data))
    n_layers = len(viewer.layers)
    second = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1])
    assert np.shape(second.data) != np.shape(image.data)
    widget.session.set_image(second)
    assert panel.start()
    assert (panel.points_layer, panel.boxes_layer, panel.scribbles_layer) == layers  # the same objects
    assert len(viewer.layers) == n_layers + 1  # the second image only
    assert len(panel.points_layer.data) == 0 and len(panel.boxes_layer.data) == 0
    assert panel.scribbles_layer.data.shape == np.shape(second.data) and not np.any(panel.scribbles_layer.data)
    for layer in layers:
        np.testing.assert_allclose(layer.scale, second.scale)
        np.testing.assert_allclose(layer.translate, second.translate)
    assert widget.session.image_layer is second and viewer.layers.selection.active is panel.points_layer
    assert widget.session.labels_layer is None  # the first scan's labels are not this scan's
    centre = _centre(second)
    panel.points_layer.add(np.asarray(centre, float))  # the first click on the new scan
    _idle(qtbot, panel)
    assert not [n for n in notifications if n[0] == "error"]
    second_labels = panel.target
    assert second_labels is not first_labels and second_labels.name == f"{second.name} labels"
    assert np.asarray(second_labels.data).shape == np.shape(second.data)
    assert np.asarray(second_labels.data)[centre] == panel.class_id and len(echo.made) == 2
    kept = np.array(first_labels.data, copy=True)
    assert panel.accept_object()
    _idle(qtbot, panel)
    widget.session.set_image(image)  # back to the first scan: its own labels again, nothing lost
    assert panel.start() and widget.session.labels_layer is first_labels
    panel.points_layer.add(np.asarray((2, 2, 2), float))
    _idle(qtbot, panel)
    assert panel.target is first_labels and not [n for n in notifications if n[0] == "error"]
    assert np.asarray(first_labels.data)[(2, 2, 2)] == panel.class_id
    np.testing.assert_array_equal(np.asarray(first_labels.data)[kept != 0], kept[kept != 0])


def test_labels_of_another_shape_added_while_prompting_do_not_become_the_chosen_labels(prompting, qtbot):
    """A label file of another scan dropped in mid-object became the session's labels: the object went on in its own
    layer unseen, while Correct and Save worked on labels that do not fit the image."""
    from plugin_support import status_messages

    viewer, widget, panel, image, echo = prompting
    seen = status_messages(widget)
    panel.points_layer.add(np.asarray(_centre(image), float))
    _idle(qtbot, panel)
    target = panel.target
    assert target is widget.session.labels_layer
    shape = tuple(s + 3 for s in np.shape(image.data))
    stranger = viewer.add_labels(np.zeros(shape, np.uint8), name="other scan labels")
    qtbot.waitUntil(lambda: widget.session.labels_layer is target, timeout=5_000)
    assert panel.target is target
    assert widget.panels["correct"].labels_combo.currentText() == target.name
    assert any(m.startswith(f"'other scan labels' does not fit '{image.name}' (its shape {shape} is not the image's")
               and f"prompting goes on in '{target.name}'" in m for m in seen)
    panel.points_layer.add(np.asarray(_centre(image), float) + 2)  # the object goes on where it was
    _idle(qtbot, panel)
    assert panel.target is target and not np.any(np.asarray(stranger.data))


def test_accept_then_next_keeps_the_first_object_and_overwrite_is_off(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    _idle(qtbot, panel)
    first = np.asarray(panel.target.data) == 1
    panel.points_layer.keymap[__import__("napari.utils.key_bindings", fromlist=["KeyBinding"])
                              .KeyBinding.from_str("N")](panel.points_layer)
    _idle(qtbot, panel)
    assert panel.objects_accepted == 1 and len(panel.points_layer.data) == 0
    table = widget.session.class_table(panel.target)
    table.add("second")
    widget.session.set_class_table(panel.target, table)
    panel.set_class(2)
    panel.add_point(c + (0, 0, 2))  # overlaps the first object
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    np.testing.assert_array_equal(labels[first], 1)  # not overwritten: overwrite is off
    assert (labels == 2).any()
    # undoing the second object's prompt leaves the first intact
    panel.undo()
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(panel.target.data) != 0, first)


def test_brush_strokes_made_while_prompting_survive_the_next_prompt(prompting, qtbot):
    """An annotator paints another class (and the object's own class) with napari's brush between two prompts of
    one object: the next prompt, and undoing it, must keep those strokes (they were wiped from the prompt's region:
    the object was drawn over a copy of the labels taken before the object began)."""
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    _idle(qtbot, panel)
    target = panel.target
    table = widget.session.class_table(target)
    table.add("second")
    widget.session.set_class_table(target, table)
    target.brush_size = 3
    for dy in range(-1, 2):
        target.paint(tuple(int(v) for v in c + (0, RADIUS + 3 + dy, 0)), 2)  # as a brush stroke does (undoable)
        target.paint(tuple(int(v) for v in c + (0, -RADIUS - 3 + dy, 0)), 1)
    other, own = np.asarray(target.data) == 2, np.asarray(target.data) == 1
    assert other.any() and not (other & _ball_in_display(other.shape, tuple(c), RADIUS)).any()
    panel.add_point(c + (0, 2, 0))  # the same object, its window covers the strokes
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels[other], 2)
    np.testing.assert_array_equal(labels[own], 1)
    panel.undo()
    _idle(qtbot, panel)
    labels = np.asarray(target.data)
    np.testing.assert_array_equal(labels[other], 2)
    np.testing.assert_array_equal(labels[own], 1)


def test_refine_class_seeds_the_object_with_the_labels(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    seed = np.zeros(np.shape(image.data), np.uint8)
    c = np.asarray(_centre(image))
    seed[c[0] - 5:c[0] + 6, c[1] - 5:c[1] + 6, c[2] - 5:c[2] + 6] = 1
    labels = viewer.add_labels(seed.copy(), name="auto", scale=image.scale, translate=image.translate)
    widget.session.set_labels(labels)
    assert panel.refine_class()
    _idle(qtbot, panel)
    np.testing.assert_array_equal(np.asarray(labels.data), seed)  # the seed is the object
    panel.add_point(c, positive=False)  # one click removes the part around it
    _idle(qtbot, panel)
    out = np.asarray(labels.data)
    assert out[tuple(c)] == 0 and out[c[0] - 5, c[1] - 5, c[2] - 5] == 1  # the ball's radius is 4


def test_saving_accepted_objects_as_a_case(prompting, qtbot, plugin_env):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)
    panel.add_point(c + (0, 2, 0))
    _idle(qtbot, panel)
    panel.accept_object()
    _idle(qtbot, panel)
    table = widget.session.class_table(panel.target)
    second = table.add("second")
    widget.session.set_class_table(panel.target, table)
    panel.set_class(second)
    panel.add_point(c + (0, 0, 9))
    _idle(qtbot, panel)
    panel.save_case()  # one click: accepts the second object and saves the case
    _idle(qtbot, panel)
    assert wait_job(qtbot, widget).outcome == "done"  # the case is written in a worker
    from engine.cases import CaseStore, InteractiveOrigin

    records = CaseStore(plugin_env["cases"]).list()
    labels = np.asarray(panel.target.data)
    assert len(records) == 1 and records[0].label_counts[1] == int((labels == 1).sum()) > 0
    assert records[0].label_counts[second] == int((labels == second).sum()) > 0
    assert panel.objects_accepted == 2
    # the case record notes what was made interactively: classes, objects, prompts and the model
    assert records[0].interactive == InteractiveOrigin(class_ids=(1, second), objects=2, prompts=3,
                                                       model_version="tiny-interactive",
                                                       model_name="interactive.safetensors")
    # the new labels were named by the scan's dataset.json, not by the class-agnostic interactive model ("object")
    assert records[0].class_names == ["background", "anterior", "posterior", "second"]


def _class_box(panel):
    return [panel.class_combo.itemText(i) for i in range(panel.class_combo.count())]


def test_new_labels_from_prompting_are_named_as_the_class_box_showed(viewer_widget, interactive_checkpoint,
                                                                     shared_data, qtbot):
    """No labels yet: the Class box listed the interactive model's own names ("1: object"; the bundled model's
    "foreground"), the first prompt's new labels were named so, while the box then showed the scan's dataset.json
    names: an annotator who chose "posterior" saved a case whose class 2 did not exist and whose class 1 was
    "object", which no automatic model segments (fine-tuning matches classes by name). The new labels are named as
    any unnamed labels of the scan are (dataset.json here), and the box shows those names before the first prompt."""
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    widget.session.set_image(image)
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert widget.session.labels_layer is None
    assert _class_box(panel) == ["1: anterior", "2: posterior"]  # what the new labels will name
    panel.class_combo.setCurrentIndex(1)  # the annotator prompts the posterior hippocampus
    assert panel.start() and panel.class_id == 2
    c = _centre(image)
    panel.add_point(np.asarray(c))
    _idle(qtbot, panel)
    target = panel.target
    table = widget.session.class_table(target)
    assert table.names == ["background", "anterior", "posterior"] and table.source == "dataset.json"
    assert np.asarray(target.data)[c] == 2 and table.names[2] == "posterior"
    assert _class_box(panel) == ["1: anterior", "2: posterior"] and panel.class_id == 2  # the same, before and after
    correct = widget.panels["correct"].class_combo
    assert [correct.itemText(i) for i in range(correct.count())] == ["1: anterior", "2: posterior"]


def test_unnamed_labels_take_the_automatic_models_classes_never_the_promptable_models(
        viewer_widget, interactive_checkpoint, shared_data, qtbot, tmp_path):
    """A scan with no dataset.json beside it: new labels from prompting take the automatic model's classes (the
    model whose fine-tuning the case serves, as a label file without names does), not the promptable model's. With
    a promptable model selected in the Model section, its "object" names no opened label file either."""
    import shutil

    from plugin_support import TINY_CLASSES

    viewer, widget = viewer_widget
    session = widget.session
    session.prompt_backend_factory = Echo()
    name = sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0].name
    (tmp_path / "scans").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(shared_data / "hippocampus" / "imagesTr" / name, tmp_path / "scans" / name)
    shutil.copy(shared_data / "hippocampus" / "labelsTr" / name, tmp_path / "masks" / name)
    image = _open(viewer, tmp_path / "scans" / name)
    session.set_image(image)
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert not session.current_model.is_interactive  # the tiny automatic model segments
    assert _class_box(panel) == [f"{v}: {n}" for v, n in enumerate(TINY_CLASSES) if v]
    panel.class_combo.setCurrentIndex(2)  # gland
    assert panel.start()
    c = _centre(image)
    panel.add_point(np.asarray(c))
    _idle(qtbot, panel)
    assert session.class_table(panel.target).names == TINY_CLASSES
    assert np.asarray(panel.target.data)[c] == 3

    # the promptable model selected in the Model section: a label file without names is not named after it
    session.select_model(panel.model_entry)
    assert session.current_model.is_interactive
    labels = _open(viewer, tmp_path / "masks" / name)
    assert session.class_table(labels).names == ["background", "label 1", "label 2"]


def test_save_as_case_pressed_while_a_prediction_runs_saves_it_and_says_it_was_prompted(prompting, qtbot, plugin_env):
    """On a CPU a prediction takes seconds: an annotator who clicks and at once presses "Save as training case" got a
    case without that click's result and without its ``interactive`` record (the object was accepted only after the
    case had been written)."""
    viewer, widget, panel, image, _ = prompting
    slow = Echo(delay=0.6)
    widget.session.prompt_backend_factory = slow
    assert panel.start()
    c = np.asarray(_centre(image))
    panel.add_point(c)
    _idle(qtbot, panel)
    panel.add_point(c + (0, 0, 6))  # grows the object; its prediction is still running when Save is pressed
    assert panel.worker is not None
    panel.save_case()
    qtbot.waitUntil(lambda: widget.session.job is not None and not widget.session.busy and panel.worker is None,
                    timeout=30_000)
    qtbot.wait(20)
    from engine.cases import CaseStore

    labels = np.asarray(panel.target.data)
    assert labels[tuple(c + (0, 0, 6 + RADIUS))] == 1  # the second click's part of the object
    [record] = CaseStore(plugin_env["cases"]).list()
    assert record.label_counts[1] == int((labels == 1).sum())
    assert record.interactive is not None and record.interactive.prompts == 2 and panel.objects_accepted == 1


def test_a_case_painted_by_hand_is_not_marked_interactive(qtbot, viewer_widget, shared_data, plugin_env):
    viewer, widget = viewer_widget
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    painted = np.zeros(np.shape(image.data), np.uint8)
    painted[5:9, 5:9, 5:9] = 1
    labels = viewer.add_labels(painted, name="by hand", scale=image.scale, translate=image.translate)
    widget.session.set_image(image)
    widget.session.set_labels(labels)
    record = saved_case(qtbot, widget)
    assert record is not None and record.interactive is None and not record.is_interactive


# ---------------------------------------------------------------- responsiveness
def test_event_loop_serves_and_prompts_coalesce_during_a_slow_prediction(prompting, qtbot):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c + (0, -6, 0))  # the labels layer exists and is drawn once (software GL compiles shaders)
    _idle(qtbot, panel)
    slow = Echo(delay=0.8)
    widget.session.prompt_backend_factory = slow
    assert panel.start()
    qtbot.wait(300)
    fired = []
    from qtpy.QtCore import QTimer

    started = time.perf_counter()
    panel.add_point(c)
    QTimer.singleShot(50, lambda: fired.append(time.perf_counter() - started))
    panel.add_point(c + (0, 3, 0))  # queued behind the first: both run, the labels are written once
    assert "queued" in panel.count_label.text()
    qtbot.waitUntil(lambda: bool(fired), timeout=2_000)
    assert fired[0] < 0.25 and panel.worker is not None  # the GUI served the timer while predicting
    _idle(qtbot, panel)
    labels = np.asarray(panel.target.data)
    assert labels[tuple(c)] and labels[tuple(c + (0, 3, 0))] and panel.interactions == 2


def test_closing_the_viewer_while_a_prediction_runs(viewer_widget, interactive_checkpoint, shared_data, qtbot):
    viewer, widget = viewer_widget
    echo = widget.session.prompt_backend_factory = Echo(delay=1.0)
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    panel = widget.panels["interactive"]
    panel.load_model(interactive_checkpoint)
    assert panel.start()
    panel.add_point(np.asarray(_centre(image)))
    worker = panel.worker
    assert worker is not None
    assert not echo.finished  # the prediction runs while the viewer closes
    viewer.close()
    qtbot.waitUntil(lambda: bool(echo.finished), timeout=10_000)
    qtbot.wait(300)  # the prediction's result arrives after the close and is dropped, nothing raises


# ---------------------------------------------------------------- bad input
def test_prompt_before_an_image_and_on_2d_or_rgb_layers(viewer_widget, interactive_checkpoint, notifications):
    viewer, widget = viewer_widget
    panel = widget.panels["interactive"]
    panel.load_model(interactive_checkpoint)
    assert not panel.start() and "no image" in notifications[-1][1]
    assert not panel.add_point((1, 2, 3)) and "Start prompting" in notifications[-1][1]
    viewer.add_image(np.zeros((20, 20), np.float32), name="flat")
    assert not panel.start() and "2 dimensions" in notifications[-1][1]
    viewer.add_image(np.zeros((20, 20, 3), np.uint8), name="photo", rgb=True)
    assert not panel.start() and "RGB" in notifications[-1][1]
    assert len(viewer.layers) == 2  # no prompt layers made


def test_non_interactive_checkpoint_is_refused(viewer_widget, tiny_checkpoint, interactive_checkpoint,
                                               notifications):
    viewer, widget = viewer_widget
    panel = widget.panels["interactive"]
    listed = panel.model_combo.count()  # the bundled interactive model, when the package ships it
    assert panel.load_model(tiny_checkpoint) is None
    assert "not an interactive model" in notifications[-1][1]
    assert panel.model_entry is None or panel.model_entry.is_interactive
    assert panel.model_combo.count() == listed
    assert panel.load_model(interactive_checkpoint) is not None and panel.model_combo.count() == listed + 1
    assert widget.session.current_model.path == tiny_checkpoint  # segmenting keeps its model


def test_segment_refuses_an_interactive_model_chosen_in_the_model_box(viewer_widget, interactive_checkpoint,
                                                                      shared_data, notifications):
    viewer, widget = viewer_widget
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    work = np.zeros(np.shape(image.data), np.uint8)
    work[3:7, 3:7, 3:7] = 2
    labels = viewer.add_labels(work.copy(), name=f"{image.name} labels", scale=image.scale,
                               translate=image.translate)
    widget.session.set_image(image)
    widget.session.set_labels(labels)
    model_panel = widget.panels["model"]
    entry = widget.session.load_model_file(interactive_checkpoint)  # as "Load…" in the Model section does
    assert entry is not None and entry.is_interactive and widget.session.current_model is entry
    assert model_panel.model_combo.currentText() == entry.label
    layers_before = [layer.name for layer in viewer.layers]
    assert widget.panels["segment"].segment() is None
    assert notifications[-1][0] == "error" and "interactive model" in notifications[-1][1]
    assert "Interactive section" in notifications[-1][1] and entry.version in notifications[-1][1]
    assert widget.session.job is None and not widget.session.busy  # nothing started
    assert [layer.name for layer in viewer.layers] == layers_before  # nothing lost, nothing added
    np.testing.assert_array_equal(np.asarray(labels.data), work)
    assert widget.session.current_model is entry  # the choice stays (it is what Fine-tune starts from)


def test_labels_of_another_shape_and_prompts_out_of_the_image(prompting, qtbot, notifications):
    viewer, widget, panel, image, echo = prompting
    _idle(qtbot, panel)  # Start's warm-up of the model is over: the refused prompts below start no worker
    other = viewer.add_labels(np.full((5, 6, 7), 3, np.uint8), name="other shape")
    widget.session.set_labels(other)
    assert not panel.add_point(np.asarray(_centre(image)))
    assert "has shape (5, 6, 7)" in notifications[-1][1]
    np.testing.assert_array_equal(np.asarray(other.data), 3)  # nothing lost
    viewer.layers.remove(other)
    n = len(panel.points_layer.data)
    panel.points_layer.add(np.asarray(np.shape(image.data), float) + 5)  # a click beyond the volume
    assert "outside the image" in notifications[-1][1] and len(panel.points_layer.data) == n
    assert panel.worker is None and panel.interactions == 0


def test_prompt_while_a_finetune_job_runs_is_refused(prompting, qtbot, notifications):
    viewer, widget, panel, image, echo = prompting
    c = np.asarray(_centre(image))
    panel.add_point(c)  # an object being worked on when the fine-tune starts
    _idle(qtbot, panel)
    before = np.array(panel.target.data, copy=True)
    assert before.any()
    release = threading.Event()
    widget.session.start_job(lambda progress, cancel: release.wait(10), what="fine-tuning", on_done=lambda r: None)
    try:
        assert widget.session.busy
        n = len(panel.points_layer.data)
        panel.points_layer.add((c + (0, 6, 0)).astype(float))  # a click
        assert notifications[-1][0] == "warning" and "fine-tuning" in notifications[-1][1]
        assert "prompt when it has finished" in notifications[-1][1] and len(panel.points_layer.data) == n
        corners = np.array([[c[0], c[1] - 3, c[2] - 3], [c[0], c[1] + 3, c[2] + 3]], float)
        assert not panel.add_box(corners[0], corners[1])  # a box
        stroke = np.zeros(np.shape(image.data), np.uint8)
        stroke[c[0], c[1], c[2] - 3:c[2] + 3] = 1
        panel.scribbles_layer.data = stroke
        panel.scribbles_layer.events.paint(value=[])  # a scribble: refused and wiped from the layer
        assert not np.asarray(panel.scribbles_layer.data).any()
        qtbot.wait(100)
        assert panel.worker is None and panel.interactions == 1
        np.testing.assert_array_equal(np.asarray(panel.target.data), before)  # no labels lost or changed
        assert widget.isVisible() and panel.target in viewer.layers  # the viewer and dock are alive
    finally:
        release.set()
    wait_job(qtbot, widget)
    assert panel.add_point(c + (0, 6, 0))  # prompting goes on once the job has finished
    _idle(qtbot, panel)
    after = np.asarray(panel.target.data)
    assert after[tuple(c + (0, 6, 0))] and np.all(after[before != 0] == before[before != 0])


# ---------------------------------------------------------------- models
def test_a_fine_tuned_interactive_version_is_selected_in_the_panel(viewer_widget, interactive_checkpoint, tmp_path):
    viewer, widget = viewer_widget
    panel = widget.panels["interactive"]
    panel.load_model(interactive_checkpoint)
    entry = panel.model_entry
    assert entry in widget.session.entries and "interactive" in entry.label
    # the Model section (and so the Fine-tune section) can select the interactive entry
    widget.session.select_model(entry)
    assert widget.panels["model"].model_combo.currentText() == entry.label
    new = write_interactive_checkpoint(tmp_path / "ft" / "best.safetensors")
    from napari_mambahome._models import read_entry

    # what the Fine-tune panel does with its result
    widget.session.add_entry(read_entry(new, origin="fine-tuned"), select=True)
    assert panel.model_entry.path == new and panel.model_combo.currentText() == panel.model_entry.label


def test_bundled_interactive_model_is_offered_when_present(make_napari_viewer, plugin_env, monkeypatch,
                                                           interactive_checkpoint):
    needs_display()
    import napari_mambahome._session as session_module
    from napari_mambahome._widget import MambaHoMEWidget

    monkeypatch.setattr(session_module, "BUNDLED_INTERACTIVE_MODEL", interactive_checkpoint)
    widget = MambaHoMEWidget(make_napari_viewer(show=True))
    panel = widget.panels["interactive"]
    assert panel.model_entry is not None and panel.model_entry.path == interactive_checkpoint
    assert panel.model_entry.origin == "bundled"
    assert widget.session.current_model is None or not widget.session.current_model.is_interactive


def test_a_model_trained_by_the_real_cli_prompts_through_the_local_backend(viewer_widget, qtbot, tmp_path,
                                                                           notifications):
    """``mambahome train --task interactive`` for 30 steps, then the panel's default (local) backend."""
    from plugin_support import phantom_layer
    from test_interactive_training import train_interactive

    from napari_mambahome.prompting import local_backend_factory

    viewer, widget = viewer_widget
    train_interactive(tmp_path, steps=30)
    panel = widget.panels["interactive"]
    assert widget.session.prompt_backend_factory is local_backend_factory
    assert panel.load_model(tmp_path / "run" / "last.safetensors") is not None
    image, truth = phantom_layer(viewer, "CT", shape=(40, 40, 32))
    assert panel.start()
    organ = np.argwhere(truth == 1)
    panel.add_point(organ[len(organ) // 2])
    _idle(qtbot, panel, timeout=120_000)
    assert not [m for s, m in notifications if s == "error"]
    assert panel.interactions == 1 and panel.last_latency is not None and panel.target is not None
    assert np.asarray(panel.target.data).shape == truth.shape and set(np.unique(panel.target.data)) <= {0, 1}


def test_finetune_panel_fine_tunes_the_interactive_model_and_selects_the_new_version(
        prompting, qtbot, plugin_env, monkeypatch, notifications):
    """One accepted interactive case saved from the panel, 2 fine-tuning steps of the tiny interactive model."""
    from qtpy.QtWidgets import QMessageBox

    from engine.cases import CaseStore
    from engine.checkpoint import read_checkpoint_metadata

    viewer, widget, panel, image, echo = prompting
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.No)
    panel.add_point(np.asarray(_centre(image)))
    _idle(qtbot, panel)
    table = widget.session.class_table(panel.target)
    table.rename(1, "hippocampus")  # the user's class, which the model's outputs do not name
    widget.session.set_class_table(panel.target, table)
    _idle(qtbot, panel)
    panel.save_case()
    _idle(qtbot, panel)
    assert wait_job(qtbot, widget).outcome == "done"
    [case] = CaseStore(plugin_env["cases"]).list()
    assert case.is_interactive
    old = panel.model_entry
    widget.session.select_model(old)  # the Model section (and so Fine-tune) starts from the interactive model
    finetune = widget.panels["finetune"]
    finetune.steps_spin.setValue(2)
    job = finetune.finetune()
    assert job is not None and not asked  # the model is class-agnostic: no question about classes
    qtbot.waitUntil(lambda: not widget.session.busy and finetune._pending_scoring is None, timeout=300_000)
    qtbot.wait(50)
    assert not [m for s, m in notifications if s == "error"], notifications
    new = widget.session.current_model
    assert new is not old and new.is_interactive and new.origin == "fine-tuned"
    assert new.path.is_relative_to(plugin_env["models"])
    meta = read_checkpoint_metadata(new.path)
    assert meta["task"]["name"] == "interactive" and meta["task"]["encoding"] == old.metadata["task"]["encoding"]
    assert meta["provenance"]["steps"] == 2 and meta["cases"] == [case.case_id]
    # the interactive panel prompts with the new version from now on
    assert panel.model_entry is new and panel.model_combo.currentText() == new.label
    # scored by prompting: the robot user's Dice per class, before and after
    result = finetune.finetune_result.text()
    assert "Robot-user Dice after 3 clicks" in result and new.version in result
    dice = widget.session.last_finetune["dice"]
    assert set(dice["before"]) == set(dice["after"]) == {"hippocampus"} and 0.0 <= dice["after"]["hippocampus"] <= 1.0
    assert finetune.scores_table.rowCount() == 1 and finetune.scores_table.item(0, 0).text() == "hippocampus"
    assert panel.start()
    panel.add_point(np.asarray(_centre(image)))
    _idle(qtbot, panel)
    assert echo.made[-1][0] == new.path


def test_a_layer_with_nan_voxels_is_named_as_what_stops_prompting_not_the_model(viewer_widget, interactive_checkpoint,
                                                                                shared_data, qtbot, notifications):
    # the real session refuses NaN voxels; the panel said "loading <version> failed: ... NaN", blaming the model
    viewer, widget = viewer_widget
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    holed = np.asarray(image.data, np.float32).copy()
    holed[0] = np.nan
    layer = viewer.add_image(holed, name="holed scan")
    widget.session.set_image(layer)
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    panel.start()
    qtbot.waitUntil(lambda: any(s == "error" for s, _ in notifications), timeout=60_000)
    errors = [m for s, m in notifications if s == "error"]
    assert any("prompting on 'holed scan'" in m and "could not start" in m and "NaN" in m for m in errors), errors
    assert not any(m.startswith("loading ") for m in errors), errors
    # and prompting ended there: it went on, each click failing with the same words and leaving empty labels behind
    assert panel.ctx is None and not panel.undo_button.isEnabled()
    labels_before = [lay for lay in viewer.layers if type(lay).__name__ == "Labels"]
    assert not panel.add_point(np.asarray(_centre(layer)))
    _idle(qtbot, panel)
    assert [lay for lay in viewer.layers if type(lay).__name__ == "Labels"] == labels_before
    after = [m for s, m in notifications if s == "error"][len(errors):]
    assert after == ["press 'Start prompting on the image' to prompt on 'holed scan'"], after


def test_prompt_layers_deleted_mid_object_are_said_and_start_brings_them_back(prompting, qtbot):
    """The annotator deleted the prompt layers (the layer list's bin) mid-object: the panel kept the deleted layers,
    clicks had nowhere to land and nothing said why."""
    from plugin_support import status_messages

    viewer, widget, panel, image, echo = prompting
    panel.points_layer.add(np.asarray(_centre(image), float))
    _idle(qtbot, panel)
    drawn = np.array(panel.target.data, copy=True)
    seen = status_messages(widget)
    viewer.layers.remove(panel.points_layer)
    viewer.layers.remove(panel.scribbles_layer)
    said = [m for m in seen if "removed" in m]
    assert said[0].startswith("'prompts: points' was removed: press 'Start prompting on the image'"), said
    assert said[1].startswith("'prompts: scribbles' was removed"), said
    assert panel._points_layer is None and panel._scribbles_layer is None
    np.testing.assert_array_equal(np.asarray(panel.target.data), drawn)  # the object stays
    seen.clear()
    assert panel.start()
    _idle(qtbot, panel)
    assert panel.points_layer in viewer.layers and panel.scribbles_layer in viewer.layers
    assert not [m for m in seen if "was removed" in m], seen  # Start's own replacing of the layers is not announced
    panel.points_layer.add(np.asarray(_centre(image), float) + 1)
    _idle(qtbot, panel)
    assert np.asarray(panel.target.data)[tuple(np.asarray(_centre(image)) + 1)] == panel.class_id
