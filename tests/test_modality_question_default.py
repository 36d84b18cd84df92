"""The "What kind of image is …?" question offers CT first for an image whose intensities are Hounsfield units,
whatever the selected model's modality (the bundled model's MR was offered first for a CT opened by another reader).

GUI tests run under a virtual display: ``xvfb-run -a python -m pytest tests/test_modality_question_default.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

from plugin_support import needs_display, plugin_env, tiny_checkpoint  # noqa: F401 - fixtures


@pytest.fixture
def offered(monkeypatch):
    """The answer each modality question offered first (and is answered with)."""
    from qtpy.QtWidgets import QInputDialog

    seen = []

    def get_item(parent, title, label, items, current=0, editable=True, *args, **kwargs):
        seen.append(items[current])
        return items[current], True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(get_item))
    return seen


@pytest.fixture
def mr_model(monkeypatch):
    from napari_mambahome._models import ModelEntry

    monkeypatch.setattr(ModelEntry, "modality", property(lambda self: "MR"))


@pytest.mark.gui
def test_a_ct_array_without_modality_is_offered_ct_and_an_mr_the_models_choice(offered, mr_model, make_napari_viewer,
                                                                              plugin_env, tiny_checkpoint):
    needs_display()
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = make_napari_viewer(show=False)
    widget = MambaHoMEWidget(viewer)
    assert widget.session.load_model_file(tiny_checkpoint) is not None
    rng = np.random.default_rng(0)
    ct = np.where(rng.random((40, 48, 48)) < 0.3, -1000, rng.integers(-100, 200, (40, 48, 48))).astype(np.int16)
    ct_layer = viewer.add_image(ct[:, ::-1].transpose(2, 1, 0), name="ct")  # a flipped, transposed display view
    mr_layer = viewer.add_image(np.abs(rng.normal(300, 100, (40, 48, 48))).astype(np.float32), name="mr")
    assert widget.session.confirmed_modality(ct_layer) == "CT"
    assert widget.session.confirmed_modality(mr_layer) == "MR"
    assert offered == ["CT", "MR"]


@pytest.mark.gui
def test_the_shared_ct_opened_by_another_reader_is_offered_ct(offered, mr_model, make_napari_viewer, plugin_env,
                                                               tiny_checkpoint):
    import os
    from pathlib import Path

    needs_display()
    shared = Path(os.environ.get("MAMBAHOME_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = shared / "abdomen_ct_mr" / "ct_image.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared data)")
    import nibabel as nib
    from napari_mambahome._widget import MambaHoMEWidget

    viewer = make_napari_viewer(show=False)
    widget = MambaHoMEWidget(viewer)
    assert widget.session.load_model_file(tiny_checkpoint) is not None
    layer = viewer.add_image(np.asarray(nib.load(str(path)).dataobj), name="ct from another reader")
    assert widget.session.modality_of(layer) == (None, None)  # nothing on record: the question comes
    assert widget.session.confirmed_modality(layer) == "CT" and offered == ["CT"]
