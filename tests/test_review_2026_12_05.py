"""Review of 6eac4d1..a971a2c: bugs found, each pinned by a test that failed before its fix.

GUI tests run under a virtual display: ``xvfb-run -a python -m pytest tests/test_review_2026_12_05.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, notifications, plugin_env, tiny_checkpoint, viewer_widget, wait_job,
)
from test_plugin_interactive import Echo, _centre, _idle, _open, interactive_checkpoint  # noqa: F401


@pytest.mark.gui
def test_removing_a_lower_class_keeps_the_interactive_object_and_its_class(viewer_widget, interactive_checkpoint,
                                                                          shared_data, qtbot):
    """Remove… of a class below the one the Interactive section draws its object with moves the object's voxels
    down one value: the object must follow (same class, same voxels), not be taken out as a "brush edit" and then
    drawn on with the value of the class that moved into its old number."""
    viewer, widget = viewer_widget
    widget.session.prompt_backend_factory = Echo()
    image = _open(viewer, sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0])
    panel = widget.panels["interactive"]
    assert panel.load_model(interactive_checkpoint) is not None
    assert panel.start()
    correct = widget.panels["correct"]
    centre = np.asarray(_centre(image))
    panel.add_point(centre)
    _idle(qtbot, panel)
    labels = panel.target
    assert widget.session.labels_layer is labels
    for name in ("first", "second", "third"):
        correct.add_class(name)
    names = list(widget.session.class_table(labels).names)
    obj_class = names.index("second")
    panel.set_class(obj_class)
    _idle(qtbot, panel)
    obj = np.asarray(labels.data) == obj_class
    assert obj.any()
    removed = names.index("first")
    assert 0 < removed < obj_class and not (np.asarray(labels.data) == removed).any()
    assert correct.remove_class(removed) == 0
    assert widget.session.class_table(labels).names[obj_class - 1] == "second"
    np.testing.assert_array_equal(np.asarray(labels.data) == obj_class - 1, obj)
    assert panel.class_id == obj_class - 1 and not panel.base[obj].any()  # the object is not burned into its base

    labels.undo()  # Ctrl+Z of the removal: the object's class goes back up with the names
    assert panel.class_id == obj_class
    np.testing.assert_array_equal(np.asarray(labels.data) == obj_class, obj)
    labels.redo()
    assert panel.class_id == obj_class - 1 and not panel.base[obj].any()
    np.testing.assert_array_equal(np.asarray(labels.data) == obj_class - 1, obj)

    panel.add_point(centre + (0, 3, 0))  # the object grows around a second click
    _idle(qtbot, panel)
    data = np.asarray(labels.data)
    assert panel.class_id == obj_class - 1  # still "second"
    assert (data[obj] == obj_class - 1).all()
    assert not (data == obj_class).any()  # nothing drawn as "third"


def test_remote_first_prompt_is_sent_when_the_fresh_objects_reset_meets_another_clients_change():
    """The first prompt of a new remote object resets the server's object first. When another client (3D Slicer, a
    second napari) had prompted on that session meanwhile, the reset's answer raises SessionChangedError although the
    server did reset: the prompt itself was then never sent, and the panel showed the (empty) server object as the
    answer to the click. 3D Slicer's module goes on with the prompt after such a reset; napari must too."""
    from mambahome_client import MaskUpdate, SessionChangedError
    from napari_mambahome.remote import RemotePromptBackend

    box = (slice(0, 4), slice(0, 4), slice(0, 4))

    def update(revision):
        return MaskUpdate(bbox=box, mask=np.zeros((4, 4, 4), bool), latency_s=0.0, server_s=0.0, model_id="m",
                          revision=revision)

    class Client:
        url = "http://server"

        def __init__(self):
            self.calls = []

        def reset(self, sid, model_id=None):
            self.calls.append("reset")
            raise SessionChangedError("another client changed it", sid, 3, 6, update(6))

        def object_mask(self, sid):
            self.calls.append("object_mask")
            return update(6)

        def add_point(self, sid, voxel, positive=True, model_id=None):
            self.calls.append(("point", tuple(voxel)))
            return update(7)

    class Uploads:
        def session_for(self, *args, **kwargs):
            return "s1"

    client = Client()
    backend = RemotePromptBackend(client, np.zeros((4, 4, 4), np.float32), uploads=Uploads(), model_id="m")
    answer = backend.add_point((1, 2, 3))
    assert ("point", (1, 2, 3)) in client.calls
    assert answer.model_id == "m"
    client.calls.clear()
    backend.add_point((2, 2, 2))  # the object is no longer fresh: no second reset wipes the first click
    assert client.calls == [("point", (2, 2, 2))]


@pytest.mark.parametrize("parent, shown", [("tiny-hippo", "tiny-hippo"),
                                           ("/home/ann/models/hippo.safetensors", "hippo.safetensors"),
                                           ("C:\\Users\\ann\\models\\hippo.safetensors", "hippo.safetensors")])
def test_a_fine_tuned_entry_names_its_parent_by_its_last_part_whatever_the_separator(parent, shown):
    """A parent recorded as a Windows path was shown whole in the Versions list ('/' was the only separator)."""
    from pathlib import Path

    from napari_mambahome._models import ModelEntry

    entry = ModelEntry(Path("ft-1/best.safetensors"), {"version": "ft-1", "parent": {"path": parent}}, "fine-tuned")
    assert entry.label == f"ft-1 (fine-tuned from {shown})"
