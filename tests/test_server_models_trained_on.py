"""What a model was trained on reaches remote clients, and a label file's values keep their own identity.

- ``GET /models`` lists ``modalities_seen`` (the bundled default: CT and MR) beside ``modality`` (only its default
  intensity rule), so the napari Model section and other clients say "trained on: CT, MR" for a server's model too.
- A label file opened without class names (the shared TotalSegmentator CT labels: 1 is the spleen) is not given the
  selected model's names (the bundled model's class 1 is "organ"): its values are named "label N". A labels layer
  made in napari (empty, to paint the model's classes) still gets the model's names.

The napari part runs under a virtual display: ``xvfb-run -a python -m pytest tests/test_trained_on_and_label_file_names.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)


def test_the_servers_model_listing_says_what_each_model_was_trained_on(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_support import connected_client, cpu_server

    with cpu_server(tmp_path, "listing-token-123456") as (url, _app):
        listing = connected_client(url, "listing-token-123456").models()
    from napari_mambahome.remote import entries_from_listing

    default = next(m for m in listing["models"] if m["task"] != "interactive")
    assert default["modality"] == "MR" and default["modalities_seen"] == ["CT", "MR"], default
    entry = next(e for e in entries_from_listing(listing, url) if e.model_id == default["id"])
    assert "trained on: CT, MR" in entry.summary()


@pytest.mark.gui
def test_a_label_file_without_names_keeps_its_values_and_a_new_layer_takes_the_models_names(viewer_widget,
                                                                                            shared_data):
    from napari_mambahome._reader import read_volumes

    viewer, widget = viewer_widget
    session = widget.session
    model_names = list(session.current_model.class_names)
    assert len(model_names) >= 2 and model_names[1] != "label 1"
    label_file = shared_data / "abdomen_ct_mr" / "ct_label_auto.nii.gz"
    data, kwargs, kind = read_volumes(str(label_file))[0]
    assert kind == "labels"
    opened = viewer.add_labels(data, **kwargs)
    names = session.class_table(opened).names
    top = int(np.max(opened.data))
    assert len(names) == top + 1 and names[1] == "label 1" and model_names[1] not in names, names[:4]

    painted_here = viewer.add_labels(np.zeros((4, 5, 6), np.uint8), name="new labels")
    assert session.class_table(painted_here).names[:len(model_names)] == model_names
