"""Issue 14 (1): the modality is a property of the image; what the user chose is kept and saved.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_plugin_modality.py``.
"""
from __future__ import annotations

import pytest

from plugin_support import (  # noqa: F401 - fixtures
    saved_case,
    modality_questions, needs_display, plugin_env, wait_job, write_tiny_checkpoint,
)

pytestmark = pytest.mark.gui


@pytest.fixture
def mr_model_widget(make_napari_viewer, plugin_env, tmp_path_factory, modality_questions):
    """A viewer and dock whose selected model is an MR model (so "the model's modality" is MR)."""
    needs_display()
    from napari_mambahome._widget import MambaHoMEWidget

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("mr") / "tiny-mr.safetensors", modality="MR",
                                       version="tiny-mr")
    viewer = make_napari_viewer(show=True)
    widget = MambaHoMEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Mamba-HoME")
    assert widget.session.load_model_file(checkpoint) is not None
    return viewer, widget


def test_ct_chosen_for_a_real_ct_stays_ct_through_segment_and_save(mr_model_widget, qtbot, shared_data):
    import nibabel as nib

    viewer, widget = mr_model_widget
    ct = nib.load(str(shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"))
    # an image with no modality of its own (pasted array): the user says CT
    image = viewer.add_image(ct.get_fdata(dtype="float32"), name="abdomen", scale=ct.header.get_zooms()[:3])
    widget.panels["segment"].image_combo.setCurrentText(image.name)
    widget.panels["segment"].modality_combo.setCurrentText("CT")
    said = []
    widget.session.status.connect(said.append)
    job = widget.panels["segment"].segment()
    assert job is not None
    wait_job(qtbot, widget, timeout=300_000)
    assert job.outcome == "done"
    assert "abdomen labels" in [layer.name for layer in viewer.layers]
    # the MR model on a real CT: the result comes with a warning that names the image and what it looks like
    warned = [m for m in said if "trained on MR data only" in m]
    assert len(warned) == 1 and warned[0].startswith("'abdomen': ") and "it looks like CT" in warned[0], said
    assert widget.panels["segment"].modality_combo.currentText() == "CT"   # the new labels layer must not reset it
    record = saved_case(qtbot, widget)
    assert record is not None and record.modality == "CT"
    assert "[CT]" in widget.panels["cases"].cases_list.item(0).text()
