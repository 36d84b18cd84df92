"""engine.datasets: nnU-Net v2 raw, MSD and case-store layouts; validation; deterministic split."""
from __future__ import annotations

import json

import pytest

from engine.cases import CaseStore
from engine.datasets import CaseRef, DatasetError, load_dataset, split_cases
from engine.io import Volume, save_volume
from engine.synth import make_phantom, write_phantom_dataset


@pytest.fixture
def nnunet_dir(tmp_path):
    return write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=3, modality="CT", shape=(16, 16, 16), seed=1)


def test_shared_hippocampus_msd(shared_data):
    root = shared_data / "hippocampus"
    if not (root / "dataset.json").exists():
        pytest.skip(f"{root} not present")
    ds = load_dataset(root)
    assert ds.layout == "msd"  # the 'training' list is preferred over nnU-Net naming
    assert len(ds.cases) == 200
    assert ds.class_names == ["background", "anterior", "posterior"]
    assert ds.modality == "MR" and ds.channel_names == ["MRI"]
    first = ds.cases[0]
    assert first.case_id == "hippocampus_001" and first.modality == "MR"
    assert first.image.name == "hippocampus_001.nii.gz" and first.image.parent.name == "imagesTr"
    assert first.label.parent.name == "labelsTr"
    ds.validate(deep=True)
    assert load_dataset(root / "dataset.json").case_ids == ds.case_ids


def test_nnunet_layout(nnunet_dir):
    ds = load_dataset(nnunet_dir)
    assert ds.layout == "nnunet" and ds.modality == "CT" and ds.channel_names == ["CT"]
    assert ds.case_ids == ["phantom_000", "phantom_001", "phantom_002"]
    assert ds.class_names == ["background", "organ", "vessel", "gland"]
    assert ds.cases[1].image == nnunet_dir / "imagesTr" / "phantom_001_0000.nii.gz"
    assert ds.cases[1].label == nnunet_dir / "labelsTr" / "phantom_001.nii.gz"
    ds.validate(deep=True)


def test_nnunet_multichannel_and_modality_names(tmp_path):
    root = tmp_path / "mc"
    ph = make_phantom((16, 16, 16), modality="MR", seed=0)
    image, label = ph.to_volumes()
    for c in range(2):
        save_volume(root / "imagesTr" / f"brain_{c:04d}.nii.gz", image.data + c, image)
    save_volume(root / "labelsTr" / "brain.nii.gz", label.data, image)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"1": "FLAIR", "0": "T1"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "organ": 1, "vessel": 2, "gland": 3}}))
    ds = load_dataset(root)
    assert ds.channel_names == ["T1", "FLAIR"] and ds.modality == "MR"
    assert ds.cases[0].image == [root / "imagesTr" / "brain_0000.nii.gz", root / "imagesTr" / "brain_0001.nii.gz"]
    ds.validate(deep=True)


def test_errors_name_the_file(nnunet_dir, tmp_path):
    with pytest.raises(DatasetError, match="nowhere: dataset folder not found"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="plain: no dataset.json"):
        load_dataset(tmp_path / "plain")

    meta_path = nnunet_dir / "dataset.json"
    meta = json.loads(meta_path.read_text())
    (nnunet_dir / "labelsTr" / "phantom_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr: no label file for case\(s\) \['phantom_001'\]"):
        load_dataset(nnunet_dir)
    (nnunet_dir / "imagesTr" / "phantom_001_0000.nii.gz").unlink()
    (nnunet_dir / "imagesTr" / "phantom_002_0000.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case phantom_002: image file .*phantom_002_0000.nii.gz not found"):
        load_dataset(nnunet_dir)

    meta_path.write_text("{broken")
    with pytest.raises(DatasetError, match="dataset.json: cannot read JSON"):
        load_dataset(nnunet_dir)
    meta_path.write_text(json.dumps({**meta, "labels": {"background": 0, "organ": 2}}))
    with pytest.raises(DatasetError, match=r"label ids must be 0..N-1 without gaps .* got \[0, 2\]"):
        load_dataset(nnunet_dir)
    meta_path.write_text(json.dumps({**meta, "labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(DatasetError, match="'whole' is a region"):
        load_dataset(nnunet_dir)

    empty = tmp_path / "empty"
    (empty / "labelsTr").mkdir(parents=True)
    (empty / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="empty/dataset.json: the dataset has no cases"):
        load_dataset(empty)


def test_msd_missing_file(tmp_path, nnunet_dir):
    meta = json.loads((nnunet_dir / "dataset.json").read_text())
    meta["training"] = [{"image": "./imagesTr/phantom_000_0000.nii.gz", "label": "./labelsTr/phantom_000.nii.gz"},
                        {"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/phantom_001.nii.gz"}]
    (nnunet_dir / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="case phantom_001: image file .*ghost.nii.gz not found"):
        load_dataset(nnunet_dir)


def test_msd_entries_may_carry_their_own_modality(nnunet_dir):
    """A mixed CT/MR dataset: an entry's ``modality`` overrides the dataset's (each case keeps its own rule)."""
    meta = json.loads((nnunet_dir / "dataset.json").read_text())
    meta["training"] = [{"image": f"./imagesTr/phantom_00{i}_0000.nii.gz", "label": f"./labelsTr/phantom_00{i}.nii.gz"}
                        for i in range(3)]
    meta["training"][1]["modality"] = "T2"
    (nnunet_dir / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(nnunet_dir)
    assert ds.modality == "CT" and [c.modality for c in ds.cases] == ["CT", "MR", "CT"]
    meta["training"][2]["modality"] = 7
    (nnunet_dir / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="training entry 2 \\(case phantom_002\\): 'modality' must be"):
        load_dataset(nnunet_dir)


def test_validate_deep_finds_bad_label_values_and_grids(nnunet_dir):
    ds = load_dataset(nnunet_dir)
    ds.validate()  # shallow: files exist
    ph = make_phantom((16, 16, 16), seed=1)
    image, _ = ph.to_volumes()
    bad = ph.label.copy()
    bad[0, 0, 0] = 7
    save_volume(nnunet_dir / "labelsTr" / "phantom_000.nii.gz", bad, image)
    shifted_affine = image.affine.copy()
    shifted_affine[0, 3] += 3.0
    shifted = Volume.from_array(image.data, shifted_affine)
    save_volume(nnunet_dir / "labelsTr" / "phantom_002.nii.gz", ph.label, shifted)
    ds.validate()  # values are not read without deep
    with pytest.raises(DatasetError) as info:
        ds.validate(deep=True)
    msg = str(info.value)
    assert "2 problem(s)" in msg
    assert "case phantom_000:" in msg and "label values [7] are not in the label set [0, 1, 2, 3]" in msg
    assert "case phantom_002: label" in msg and "different grid" in msg


def test_case_store_as_dataset(tmp_path):
    store = CaseStore(tmp_path / "store")
    for seed, modality in ((0, "CT"), (1, "CT"), (2, "MR")):
        ph = make_phantom((16, 16, 16), modality=modality, seed=seed)
        image, _ = ph.to_volumes()
        store.add(image, ph.label, modality=modality, class_names=ph.class_names, case_id=f"c{seed}")
    ds = load_dataset(store.root)
    assert ds.layout == "casestore" and ds.case_ids == ["c0", "c1", "c2"]
    assert ds.class_names == ["background", "organ", "vessel", "gland"]
    assert ds.modality == "CT" and [c.modality for c in ds.cases] == ["CT", "CT", "MR"]
    assert ds.cases[2].image == store.root / "c2" / "image.nii.gz"
    ds.validate(deep=True)
    # a case saved with a different label set is refused, naming it
    ph = make_phantom((16, 16, 16), seed=3, num_structures=2)
    image, _ = ph.to_volumes()
    store.add(image, ph.label, modality="CT", class_names=["background", "liver", "spleen"], case_id="odd")
    with pytest.raises(DatasetError, match="odd/case.json: class names .* disagree"):
        load_dataset(store.root)


def test_split_is_deterministic_and_order_independent():
    cases = [CaseRef(f"case_{i:03d}", image=None, label=None, modality="CT") for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    train2, val2 = split_cases(list(reversed(cases)), 0.2, seed=0)
    assert [c.case_id for c in val2] == [c.case_id for c in val]
    _, val_other = split_cases(cases, 0.2, seed=1)
    assert [c.case_id for c in val_other] != [c.case_id for c in val]
    assert [len(x) for x in split_cases(cases[:2], 0.1)] == [1, 1]  # at least one validation case
    assert [len(x) for x in split_cases(cases[:1], 0.5)] == [1, 0]  # never an empty training set
    assert [len(x) for x in split_cases(cases, 0.0)] == [10, 0]
    with pytest.raises(DatasetError, match="duplicate case ids"):
        split_cases(cases + cases[:1])
