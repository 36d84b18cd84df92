"""The Model section says what a model was trained on (the checkpoint's ``modalities_seen``), not its one default
intensity rule: the bundled default model (trained on CT and MR phantoms, default rule MR) was described as
"modality: MR", which told an annotator with a CT that the model had never seen CT.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_napari_model_trained_on.py``.
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    modality_questions, needs_display, plugin_env, tiny_checkpoint, viewer_widget,
)

pytestmark = pytest.mark.gui


def test_the_bundled_model_is_shown_as_trained_on_ct_and_mr(viewer_widget):
    from engine.checkpoint import read_checkpoint_metadata
    from napari_mambahome._models import BUNDLED_MODEL

    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("model")
    meta = read_checkpoint_metadata(BUNDLED_MODEL)
    assert meta["modality"] == "MR" and sorted(meta["modalities_seen"]) == ["CT", "MR"]  # what made it misleading
    bundled = next(e for e in session.entries if e.path == BUNDLED_MODEL)
    session.select_model(bundled)
    text = panel.model_info.text()
    assert "trained on: CT, MR" in text, text
    assert "modality: MR" not in text, text


def test_a_checkpoint_without_modalities_seen_is_shown_as_trained_on_its_modality(viewer_widget, tiny_checkpoint):
    viewer, widget = viewer_widget
    session, panel = widget.session, widget.panel("model")
    # written before the field existed: engine.checkpoint.modalities_seen falls back to the one modality
    session.select_model(next(e for e in session.entries if e.path == tiny_checkpoint))
    assert "trained on: CT" in panel.model_info.text() and "MR" not in panel.model_info.text()


def test_a_server_model_is_shown_with_what_the_server_says_it_was_trained_on():
    from napari_mambahome.remote import entries_from_listing

    listing = {"models": [{"id": "default", "class_names": ["background", "organ"], "modality": "MR",
                           "modalities_seen": ["MR", "CT"]},
                          {"id": "old", "class_names": ["background", "organ"], "modality": "CT"}]}
    seen, older = entries_from_listing(listing, "http://127.0.0.1:1")
    assert "trained on: CT, MR" in seen.summary() and "modality:" not in seen.summary()
    assert "trained on: CT" in older.summary()  # a server that does not list the field: its one modality
