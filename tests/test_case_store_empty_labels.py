"""Labels holding background only never replace a labelled case: an annotator's Clear class then Save replaced a
corrected case with an empty one ("1 class(es) made by prompting") without a word. A new case without a class may be
meant (a scan without the structure) and is saved; napari warns of it. A class recorded as made by prompting but
erased since is not recorded as such."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from engine.cases import CaseStore, CaseStoreError, EmptyLabelsError, InteractiveOrigin
from engine.io import load_volume
from engine.synth import make_phantom

CLASSES = ["background", "organ", "vessel", "gland"]


@pytest.fixture
def case(tmp_path):
    ph = make_phantom((32, 32, 24), modality="CT", seed=2)
    path = tmp_path / "src" / "scan.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(path))
    return load_volume(path), ph.label.astype(np.uint8)


def test_empty_labels_never_replace_a_labelled_case(tmp_path, case):
    image, labels = case
    store = CaseStore(tmp_path / "store")
    saved = store.add(image, labels, modality="CT", class_names=CLASSES)
    before = (saved.folder / "label.nii.gz").read_bytes()
    with pytest.raises(EmptyLabelsError) as info:
        store.add(image, np.zeros_like(labels), modality="CT", class_names=CLASSES, case_id=saved.case_id,
                  overwrite=True)
    text = str(info.value)
    assert isinstance(info.value, CaseStoreError) and "scan.nii.gz" in text and "every voxel is background" in text
    assert f"would replace case {saved.case_id!r}, which holds {int((labels > 0).sum())} labelled voxels" in text
    assert "nothing was saved" in text
    assert (saved.folder / "label.nii.gz").read_bytes() == before  # the corrected case is untouched
    # a new case without a class (a scan without the structure) is saved, and an empty case may be replaced
    empty = store.add(image, np.zeros_like(labels), modality="CT", class_names=CLASSES)
    assert empty.case_id != saved.case_id and not any(empty.label_counts[1:])
    again = store.add(image, np.zeros_like(labels), modality="CT", class_names=CLASSES, case_id=empty.case_id,
                      overwrite=True)
    assert again.case_id == empty.case_id and len(store.list()) == 2


def test_a_prompted_class_erased_since_is_not_recorded_as_prompted(tmp_path, case):
    image, labels = case
    only_organ = np.where(labels == 1, 1, 0).astype(np.uint8)
    assert only_organ.any()
    origin = InteractiveOrigin(class_ids=(1, 2), objects=2, prompts=5, model_version="v1")
    store = CaseStore(tmp_path / "store")
    rec = store.add(image, only_organ, modality="CT", class_names=CLASSES, interactive=origin)
    assert rec.interactive.class_ids == (1,)
    meta = json.loads((rec.folder / "case.json").read_text())
    assert meta["interactive"]["class_ids"] == [1] and meta["interactive"]["classes"] == ["organ"]
    # every prompted class erased: no interactive record at all
    rec = store.add(image, np.zeros_like(labels), modality="CT", class_names=CLASSES, interactive=origin)
    assert rec.interactive is None
