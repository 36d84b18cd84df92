"""A saved case's own image file, reopened, is the scan the case was saved from: the store finds that case for it, and
a new case from it records the original scan and is named after it (it was recorded as "image", a second case of the
same scan under that name)."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from engine.cases import CaseStore, scan_of
from engine.io import load_volume
from engine.synth import make_phantom


def _scan(tmp_path):
    ph = make_phantom((24, 24, 16), modality="MR", seed=3)
    path = tmp_path / "Patient 7.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path, ph.label.astype(np.uint8)


def test_a_reopened_case_file_maps_to_its_scan_and_its_case(tmp_path):
    path, labels = _scan(tmp_path)
    store = CaseStore(tmp_path / "cases")
    first = store.add(load_volume(path), labels, modality="MR", class_names=["background", "a", "b", "c"])
    assert first.source_file == str(path) and first.case_id == "Patient_7"
    for reopened in (first.image_path, first.label_path):
        assert scan_of(reopened) == str(path)
    assert [r.case_id for r in store.cases_of_scan(first.image_path)] == ["Patient_7"]
    assert [r.case_id for r in store.cases_of_scan(path)] == ["Patient_7"]
    assert store.cases_of_scan(tmp_path / "other.nii.gz") == [] and store.cases_of_scan(None) == []

    # a second case made from the reopened file: named after the scan and recording it
    second = store.add(load_volume(first.image_path), labels, modality="MR",
                       class_names=["background", "a", "b", "c"], source_file=first.image_path)
    assert second.case_id == "Patient_7_2" and second.source_file == str(path)
    assert [r.case_id for r in store.cases_of_scan(second.image_path)] == ["Patient_7", "Patient_7_2"]


def test_a_file_beside_no_case_record_is_its_own_scan(tmp_path):
    path, _ = _scan(tmp_path)
    assert scan_of(path) == str(path) and scan_of(None) is None
