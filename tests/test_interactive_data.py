"""experiments/interactive_data.py on the shared real data: one combined interactive training set."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import REPO_ROOT
from engine.datasets import load_dataset
from engine.io import load_label, read_grid


def _builder():
    spec = importlib.util.spec_from_file_location("interactive_data", REPO_ROOT / "experiments" / "interactive_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    for sub in ("hippocampus/dataset.json", "abdomen_ct_mr/ct_label_auto.nii.gz", "spinal_cord_mri/t2_label.nii.gz"):
        if not (shared_data / sub).exists():
            pytest.skip(f"{shared_data / sub} not present")
    out = tmp_path_factory.mktemp("interactive-data")
    manifest = _builder().build(shared_data, out, phantoms=1, phantom_shape=(32, 32, 24), hippo_train_limit=6)
    return shared_data, out, manifest


def test_labels_unified_and_each_case_normalised_by_its_modality(built):
    shared, out, manifest = built
    ds = load_dataset(out / "train")
    assert ds.class_names == manifest["class_names"] and ds.class_names[:3] == [
        "background", "hippocampus anterior", "hippocampus posterior"]
    assert {"spleen", "liver", "spinal cord", "phantom organ"} <= set(ds.class_names)
    assert len(set(ds.class_names)) == len(ds.class_names)
    modality = {c.case_id: c.modality for c in ds.cases}
    assert modality["abdomen_ct"] == "CT" and modality["phantom_ct_000"] == "CT"
    assert modality["abdomen_mr"] == modality["spinal_t1"] == modality["hippocampus_003"] == "MR"
    index = {n: i for i, n in enumerate(ds.class_names)}
    # the same TotalSegmentator structure (spleen = id 1 in CT and MR) is one unified class
    for case_id in ("abdomen_ct", "abdomen_mr"):
        source = load_label(shared / "abdomen_ct_mr" / f"{case_id[-2:]}_label_auto.nii.gz").data
        remapped = load_label(ds.case(case_id).label, class_ids=range(len(ds.class_names))).data
        np.testing.assert_array_equal(remapped == index["spleen"], source == 1)
        counts = np.bincount(remapped.ravel())
        assert counts[np.nonzero(counts)].min() >= manifest["min_voxels"]  # tiny structures dropped
    spine = load_label(ds.case("spinal_t1").label).data
    np.testing.assert_array_equal(spine == index["spinal cord"],
                                  load_label(shared / "spinal_cord_mri" / "t1_label.nii.gz").data == 1)
    ds.validate(deep=True)  # every label on its image's grid, values within the class list


def test_heldout_and_t2_are_out_of_training_and_geometry_is_kept(built):
    shared, out, manifest = built
    train = load_dataset(out / "train")
    heldout = load_dataset(out / "hippocampus_heldout")
    t2 = load_dataset(out / "spinal_t2")
    split = json.loads((out / "manifest.json").read_text())["hippocampus_split"]
    assert len(heldout.cases) == 40 and set(heldout.case_ids) == set(split["heldout"])
    assert not set(heldout.case_ids) & set(train.case_ids)
    assert not set(split["heldout"]) & set(split["train"]) and len(split["train"]) == 160
    assert t2.case_ids == ["spinal_t2"] and "spinal_t2" not in train.case_ids
    sources = {str(c.image) for c in train.cases} | {str(c.label) for c in train.cases}
    assert not any("t2_" in s for s in sources)  # no T2 file reaches training through a link
    assert not any(h in s for h in split["heldout"] for s in sources)
    for case_id, src in (("abdomen_ct", "abdomen_ct_mr/ct_image.nii.gz"), ("spinal_t1", "spinal_cord_mri/t1_image.nii.gz"),
                         ("hippocampus_003", "hippocampus/imagesTr/hippocampus_003.nii.gz")):
        case = train.case(case_id)
        shape, affine = read_grid(shared / src)
        for f in (case.image, case.label):
            got_shape, got_affine = read_grid(f)
            assert got_shape == shape and np.allclose(got_affine, affine, atol=1e-4)
    t2_case = t2.cases[0]
    assert read_grid(t2_case.image)[0] == read_grid(shared / "spinal_cord_mri/t2_image.nii.gz")[0]
    assert manifest["val_seed"] >= 0


def test_rerun_keeps_complete_folders(built, capsys):
    shared, out, _ = built
    before = (out / "train" / "dataset.json").stat().st_mtime_ns
    _builder().build(shared, out, phantoms=1, phantom_shape=(32, 32, 24), hippo_train_limit=6)
    assert (out / "train" / "dataset.json").stat().st_mtime_ns == before
    assert "kept" in capsys.readouterr().out


def test_source_shares_and_the_abdomen_half_probe(built, tmp_path):
    """Sources get their share of the patches through the entries' weights; the half probe trains on the liver's
    side of each abdomen volume and keeps the spleen's side, on the same world grid, for evaluation."""
    shared = built[0]
    module = _builder()
    shares = {"hippocampus": 0.4, "abdomen_ct_mr": 0.3, "spinal_cord_mri": 0.1, "phantoms": 0.2}
    manifest = module.build(shared, tmp_path, phantoms=1, phantom_shape=(32, 32, 24), hippo_train_limit=6,
                            source_shares=shares, abdomen_half=True)
    ds = load_dataset(tmp_path / "train")
    weight = {c.case_id: c.weight for c in ds.cases}
    total = sum(weight.values())
    assert sum(w for k, w in weight.items() if k.startswith("hippocampus")) / total == pytest.approx(0.4)
    assert weight["abdomen_ct_liver_side"] / total == pytest.approx(0.15)
    assert weight["phantom_mr_000"] / total == pytest.approx(0.1)
    assert manifest["source_shares"] == shares and {"abdomen_ct_liver_side", "spinal_t1"} <= set(
        load_dataset(tmp_path / "train").case_ids)
    full = np.asarray(load_label(shared / "abdomen_ct_mr" / "ct_label_auto.nii.gz").data)
    liver_side = np.asarray(load_label(tmp_path / "train" / "labelsTr" / "abdomen_ct_liver_side.nii.gz").data)
    names = manifest["class_names"]
    assert names.index("liver") in liver_side and "spleen" not in names  # the spleen is on the other side
    spleen_side = load_label(tmp_path / "abdomen_spleen_side" / "ct_label.nii.gz")
    assert 1 in spleen_side.data and 2 not in spleen_side.data  # TotalSegmentator ids: spleen 1, right kidney 2
    assert liver_side.shape[0] + spleen_side.shape[0] == full.shape[0]
    # the spleen's half sits where it was: its first voxel's world position is the full volume's voxel there
    _, grid_affine = read_grid(shared / "abdomen_ct_mr" / "ct_label_auto.nii.gz")
    offset = full.shape[0] - spleen_side.shape[0] if np.argwhere(full == 1).mean(0)[0] > full.shape[0] / 2 else 0
    assert np.allclose(spleen_side.affine[:3, 3], grid_affine[:3, :3] @ [offset, 0, 0] + grid_affine[:3, 3])
    assert np.array_equal(np.asarray(spleen_side.data), full[offset:offset + spleen_side.shape[0]])
    with pytest.raises(module.InteractiveDataError, match="no share for phantoms"):
        module.source_weights(module._sources(shared, [], 1, (32, 32, 24)), {"hippocampus": 1.0,
                              "abdomen_ct_mr": 1.0, "spinal_cord_mri": 1.0})
