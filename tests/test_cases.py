"""engine.cases: the case store shared with the napari plugin."""
from __future__ import annotations

import json
import os
import stat

import nibabel as nib
import numpy as np
import pytest

import engine.io
from engine.cases import CaseExistsError, CaseNotFoundError, CaseStore, CaseStoreError, case_id_from_filename
from engine.io import Volume, VolumeError, load_volume
from engine.synth import make_phantom

CLASSES = ["background", "organ", "vessel", "gland"]


@pytest.fixture
def phantom_case(tmp_path):
    """An image read from a file (so it has a header and a path) and its label map."""
    ph = make_phantom((32, 32, 24), modality="CT", seed=2)
    path = tmp_path / "src" / "Patient 7.nii.gz"
    path.parent.mkdir()
    img = nib.Nifti1Image(ph.image, ph.affine)
    img.set_qform(ph.affine, code=1)
    img.set_sform(ph.affine, code=2)
    nib.save(img, str(path))
    return load_volume(path), ph.label


def test_add_writes_image_label_and_description(tmp_path, phantom_case):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store" / "nested")
    rec = store.add(image, labels, modality="CT", class_names=CLASSES, model_version="v3-abc")
    assert rec.case_id == "Patient_7"
    assert (rec.folder / "image.nii.gz").is_file() and (rec.folder / "label.nii.gz").is_file()
    meta = json.loads((rec.folder / "case.json").read_text())
    assert meta["case_id"] == "Patient_7" and meta["modality"] == "CT"
    assert meta["class_names"] == CLASSES and meta["model_version"] == "v3-abc"
    assert meta["source_file"] == image.path and meta["shape"] == [32, 32, 24]
    assert meta["spacing"] == pytest.approx([1.5, 1.5, 2.0])
    assert meta["created"].endswith("+00:00")
    assert meta["label_counts"][1] == int((labels == 1).sum())

    img2, lab2, rec2 = store.load("Patient_7")
    np.testing.assert_array_equal(img2.data, image.data)
    np.testing.assert_array_equal(lab2.data, labels)
    np.testing.assert_allclose(lab2.affine, image.affine)
    hdr = nib.load(str(rec.label_path)).header
    assert hdr["sform_code"] == 2 and hdr["qform_code"] == 1  # opens aligned in Slicer/ITK-SNAP
    assert rec2 == store.get("Patient_7") and rec2.case_id == rec.case_id


def test_ids_are_unique_list_is_sorted_remove_works(tmp_path, phantom_case):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    ids = [store.add(image, labels, modality="CT", class_names=CLASSES).case_id for _ in range(3)]
    assert ids == ["Patient_7", "Patient_7_2", "Patient_7_3"]
    assert len(store) == 3 and [r.case_id for r in store.list()] == ids  # oldest first
    assert "Patient_7_2" in store
    store.remove("Patient_7_2")
    assert store.ids() == ["Patient_7", "Patient_7_3"]
    assert not (tmp_path / "store" / "Patient_7_2").exists()
    with pytest.raises(CaseNotFoundError, match="no case 'Patient_7_2'"):
        store.get("Patient_7_2")
    # a freed id is reused by the next case from the same file
    assert store.add(image, labels, modality="CT", class_names=CLASSES).case_id == "Patient_7_2"
    assert [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".")] == []


def test_refuses_silent_overwrite(tmp_path, phantom_case):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    store.add(image, labels, modality="CT", class_names=CLASSES, case_id="liver01")
    edited = labels.copy()
    edited[edited == 2] = 0
    with pytest.raises(CaseExistsError, match="case 'liver01' already exists"):
        store.add(image, edited, modality="CT", class_names=CLASSES, case_id="liver01")
    np.testing.assert_array_equal(store.load("liver01")[1].data, labels)  # unchanged
    store.add(image, edited, modality="CT", class_names=CLASSES, case_id="liver01", overwrite=True)
    np.testing.assert_array_equal(store.load("liver01")[1].data, edited)
    assert store.ids() == ["liver01"]


def test_validation(tmp_path, phantom_case):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    with pytest.raises(CaseStoreError, match=r"label shape \(32, 32, 23\) differs from image shape"):
        store.add(image, labels[..., :-1], modality="CT", class_names=CLASSES)
    with pytest.raises(VolumeError, match=r"label values \[3\] are not in the label set \[0, 1, 2\]"):
        store.add(image, labels, modality="CT", class_names=CLASSES[:3])
    with pytest.raises(VolumeError, match="non-integer"):
        store.add(image, labels + 0.5, modality="CT", class_names=CLASSES)
    with pytest.raises(CaseStoreError, match="invalid case id"):
        store.add(image, labels, modality="CT", class_names=CLASSES, case_id="../escape")
    # one slice can be prompted, but saved as a case it made every later fine-tune on the store fail
    one_slice = Volume.from_array(np.asarray(image.data)[..., 10:11], image.affine)
    with pytest.raises(CaseStoreError, match=r"single slice \(shape \(32, 32, 1\).*learn from"):
        store.add(one_slice, labels[..., 10:11], modality="CT", class_names=CLASSES)
    assert len(store) == 0 and list((tmp_path / "store").iterdir()) == []


def test_crash_mid_write_leaves_no_half_case(tmp_path, phantom_case, monkeypatch):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    store.add(image, labels, modality="CT", class_names=CLASSES, case_id="keep")
    real_save = engine.io.save_volume
    calls = []

    def failing_save(path, array, reference, dtype=None):
        calls.append(path)
        if len(calls) == 2:  # image written, label write dies
            raise OSError("No space left on device")
        return real_save(path, array, reference, dtype)

    monkeypatch.setattr("engine.cases.save_volume", failing_save)
    with pytest.raises(OSError, match="No space left"):
        store.add(image, labels, modality="CT", class_names=CLASSES, case_id="half")
    with pytest.raises(OSError, match="No space left"):  # also when replacing: the old case survives
        calls.clear()
        store.add(image, (labels == 1).astype(labels.dtype), modality="CT", class_names=CLASSES, case_id="keep",
                  overwrite=True)
    monkeypatch.undo()
    assert store.ids() == ["keep"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["keep"]  # no temp folders
    np.testing.assert_array_equal(store.load("keep")[1].data, labels)

    def failing_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr("engine.cases.write_json_atomic", failing_json)
    with pytest.raises(OSError, match="disk full"):
        store.add(image, labels, modality="CT", class_names=CLASSES)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["keep"]


def test_damaged_case_is_skipped_with_warning(tmp_path, phantom_case):
    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    store.add(image, labels, modality="CT", class_names=CLASSES, case_id="good")
    bad = tmp_path / "store" / "bad"
    bad.mkdir()
    (bad / "case.json").write_text("{not json")
    with pytest.warns(UserWarning, match="bad/case.json: unreadable case description"):
        assert store.ids() == ["good"]


def test_unusable_root(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CaseStoreError, match="afile: is a file"):
        CaseStore(afile)
    with pytest.raises(CaseStoreError, match="cannot create"):
        CaseStore(afile / "sub")
    with pytest.raises(CaseStoreError, match="not found"):
        CaseStore(tmp_path / "missing", readonly=True)


def test_read_only_root(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(ro, os.W_OK):
            # root ignores permission bits; simulate what the kernel answers to anyone else
            monkeypatch.setattr("engine.cases.os.access", lambda path, mode: False)
        with pytest.raises(CaseStoreError, match="ro: case store folder is read-only"):
            CaseStore(ro)
        store = CaseStore(ro, readonly=True)  # reading a shared store is fine
        assert len(store) == 0
        with pytest.raises(CaseStoreError, match="opened read-only"):
            store.add(None, np.zeros((2, 2, 2)), modality="CT", class_names=CLASSES)
    finally:
        ro.chmod(stat.S_IRWXU)


def test_case_id_from_filename():
    assert case_id_from_filename("/data/Patient 7.nii.gz") == "Patient_7"
    assert case_id_from_filename("scan.v2.nrrd") == "scan.v2"
    assert case_id_from_filename(None) == "case"
    assert case_id_from_filename("///") == "case"


def test_interactive_origin_is_recorded_read_back_and_old_records_are_not_interactive(tmp_path, phantom_case):
    from engine.cases import InteractiveOrigin

    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    origin = InteractiveOrigin(class_ids=(2, 1), objects=3, prompts=7, model_version="int-v2",
                               model_name="interactive.safetensors")
    rec = store.add(image, labels, modality="CT", class_names=CLASSES, interactive=origin)
    assert rec.is_interactive and rec.interactive.class_ids == (1, 2)
    meta = json.loads((rec.folder / "case.json").read_text())  # plain JSON beside the volumes
    assert meta["interactive"] == {"class_ids": [1, 2], "classes": ["organ", "vessel"], "objects": 3,
                                   "prompts": 7, "model_version": "int-v2", "model_name": "interactive.safetensors"}
    back = store.get(rec.case_id)
    assert back == rec and back.interactive == InteractiveOrigin((1, 2), 3, 7, "int-v2", "interactive.safetensors")

    plain = store.add(image, labels, modality="CT", class_names=CLASSES)
    assert not plain.is_interactive and json.loads((plain.folder / "case.json").read_text())["interactive"] is None
    # a case folder written before the field existed has no "interactive" key: read as not interactive
    old = json.loads((plain.folder / "case.json").read_text())
    del old["interactive"]
    (plain.folder / "case.json").write_text(json.dumps(old))
    assert store.get(plain.case_id).interactive is None and len(store.list()) == 2


def test_bad_interactive_records_are_refused_naming_the_case(tmp_path, phantom_case):
    from engine.cases import InteractiveOrigin

    image, labels = phantom_case
    store = CaseStore(tmp_path / "store")
    with pytest.raises(CaseStoreError, match=r"interactive class ids \[4\]"):
        store.add(image, labels, modality="CT", class_names=CLASSES,
                  interactive=InteractiveOrigin(class_ids=(4,), objects=1, prompts=1))
    assert store.list() == []  # nothing half-written
    with pytest.raises(CaseStoreError, match="'prompts' must be a count"):
        InteractiveOrigin.from_json_dict({"class_ids": [1], "objects": 1, "prompts": -2}, 4, "client x")
    rec = store.add(image, labels, modality="CT", class_names=CLASSES,
                    interactive=InteractiveOrigin(class_ids=(1,), objects=1, prompts=2))
    meta = json.loads((rec.folder / "case.json").read_text())
    meta["interactive"]["class_ids"] = "everything"  # a hand-edited record
    (rec.folder / "case.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=rf"{rec.case_id}.*class_ids"):
        assert store.list() == []
    with pytest.raises(CaseStoreError, match=rec.case_id):
        store.get(rec.case_id)
