"""engine.datasets: training data stored the ways users store it (nnU-Net v1/v2 raw, plain folders, 3D Slicer
exports) is read, or refused with a message that names the file and says what to do."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.datasets import DatasetError, load_dataset, make_dataset
from engine.io import Volume, load_label, save_volume

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _pair(image_path, label_path, seed=0, shape=(12, 12, 10), label_values=(1, 2)):
    """A small image and its label map (a cube of ``label_values[0]``, a corner of ``label_values[1]``)."""
    data = np.random.default_rng(seed).normal(100.0, 10.0, shape).astype(np.float32)
    ref = Volume.from_array(data, AFFINE)
    save_volume(image_path, data, ref)
    lab = np.zeros(shape, np.uint8)
    lab[3:8, 3:8, 3:8] = label_values[0]
    lab[0:2, 0:2, 0:2] = label_values[1]
    if label_path is not None:
        save_volume(label_path, lab, ref)
    return ref, lab


def _nnunet(root, ids=("a", "b"), ending=".nii.gz", channels=1):
    for i, case in enumerate(ids):
        for c in range(channels):
            _pair(root / "imagesTr" / f"{case}_{c:04d}{ending}", root / "labelsTr" / f"{case}{ending}", seed=i)
    meta = {"channel_names": {str(c): ["T1", "T2"][c] for c in range(channels)},
            "labels": {"background": 0, "cube": 1, "corner": 2}, "numTraining": len(ids), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    return meta


# ------------------------------------------------------------------------ nnU-Net raw
@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_nnunet_v2_raw_with_each_file_ending_reads_and_validates(tmp_path, ending):
    _nnunet(tmp_path, ending=ending)
    ds = load_dataset(tmp_path)
    assert ds.layout == "nnunet" and ds.case_ids == ["a", "b"] and ds.class_names == ["background", "cube", "corner"]
    assert ds.cases[0].image.name == f"a_0000{ending}"
    ds.validate(deep=True)


def test_nnunet_v1_training_list_names_images_without_their_channel_suffix(tmp_path):
    """nnU-Net v1 (and MSD-converted v1 task folders) list ``./imagesTr/a.nii.gz`` under 'training' while the files
    are ``a_0000.nii.gz`` (one per modality): before, 'image file .../a.nii.gz not found' with the file right there."""
    _nnunet(tmp_path, channels=2)
    meta = {"name": "Task001", "modality": {"0": "T1", "1": "T2"},
            "labels": {"0": "background", "1": "cube", "2": "corner"}, "numTraining": 2,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in "ab"]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    assert ds.case_ids == ["a", "b"] and ds.channel_names == ["T1", "T2"]
    assert [p.name for p in ds.cases[1].image_files] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    ds.validate(deep=True)
    (tmp_path / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case b: image file .*b.nii.gz not found.*b_0000.nii.gz is there.*"
                                           r"b_0001.nii.gz is not"):
        load_dataset(tmp_path)


def test_nnunet_v2_files_with_another_ending_are_named_not_silently_dropped(tmp_path):
    """file_ending .nii.gz with a case saved as .nrrd: that case used to vanish from training without a word; a case
    saved twice (.nii.gz and .nrrd) is ambiguous. Both are refused naming the files."""
    _nnunet(tmp_path)
    _pair(tmp_path / "imagesTr" / "c_0000.nrrd", tmp_path / "labelsTr" / "c.nrrd", seed=3)
    with pytest.raises(DatasetError, match=r"imagesTr/c_0000.nrrd, labelsTr/c.nrrd do\(es\) not end with the dataset's file_ending '.nii.gz'"):
        load_dataset(tmp_path)
    for f in ("imagesTr/c_0000.nrrd", "labelsTr/c.nrrd"):
        (tmp_path / f).unlink()
    _pair(tmp_path / "imagesTr" / "a_0000.nrrd", tmp_path / "labelsTr" / "a.nrrd")
    with pytest.raises(DatasetError, match=r"a.nrrd"):
        load_dataset(tmp_path)
    (tmp_path / "labelsTr" / "notes.txt").write_text("not a volume")  # other files stay ignored
    for f in ("imagesTr/a_0000.nrrd", "labelsTr/a.nrrd"):
        (tmp_path / f).unlink()
    assert load_dataset(tmp_path).case_ids == ["a", "b"]


def test_nnunet_v2_predictions_written_into_imagestr_are_named_and_never_read_as_images(tmp_path):
    """`mambahome predict --input imagesTr --output imagesTr` writes a.nii.gz beside a_0000.nii.gz: they were
    skipped without a word, a_probabilities.nii.gz stopped loading as an unlabelled case, and the prediction of a
    case named x_0001 looked like channel 1 of case x."""
    _nnunet(tmp_path, ids=("a", "x", "x_0001"))
    for name in ("a.nii.gz", "a_probabilities.nii.gz", "x_0001.nii.gz", "a_0001.nii.gz"):
        _pair(tmp_path / "imagesTr" / name, None)
    with pytest.warns(UserWarning, match=r"imagesTr: not read as images: a.nii.gz, a_probabilities.nii.gz, "
                                         r"x_0001.nii.gz: named like a case's label.*predict.*; a_0001.nii.gz: "
                                         r"channel\(s\) beyond the 1 in dataset.json's channel_names"):
        ds = load_dataset(tmp_path)
    assert {c.case_id: [p.name for p in c.image_files] for c in ds.cases} == {
        "a": ["a_0000.nii.gz"], "x": ["x_0000.nii.gz"], "x_0001": ["x_0001_0000.nii.gz"]}


def test_nnunet_v1_listed_image_beside_its_channel_files_is_refused_not_read_as_the_image(tmp_path):
    """A v1 entry lists ./imagesTr/a.nii.gz for a_0000.nii.gz; once predict wrote its mask a.nii.gz there, the mask
    was read as case a's image and trained on."""
    _nnunet(tmp_path)
    meta = {"name": "Task001", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cube", "2": "corner"},
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in "ab"]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    _pair(tmp_path / "imagesTr" / "a.nii.gz", None)
    with pytest.raises(DatasetError, match=r"case a: both a.nii.gz \(as listed\) and a_0000.nii.gz .*prediction"):
        load_dataset(tmp_path)


def test_nnunet_region_labels_are_refused_naming_the_region(tmp_path):
    meta = _nnunet(tmp_path)
    meta["labels"] = {"background": 0, "whole": [1, 2], "corner": 2}
    meta["regions_class_order"] = [1, 2]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"'whole' is a region .*not supported"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------ plain folders
def test_plain_imagestr_labelstr_without_dataset_json_gets_the_exact_command(tmp_path):
    for i, c in enumerate("ab"):
        _pair(tmp_path / "imagesTr" / f"{c}.nii.gz", tmp_path / "labelsTr" / f"{c}.nii.gz", seed=i)
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    msg = str(info.value)
    assert f"--images {tmp_path / 'imagesTr'} --labels {tmp_path / 'labelsTr'}" in msg
    assert "nnU-Net" in msg and "MSD" in msg


def test_flat_folder_of_pairs_without_dataset_json_gets_the_exact_command(tmp_path):
    src = tmp_path / "src"
    for i, c in enumerate("ab"):
        _pair(src / f"{c}.nii.gz", src / f"{c}_seg.nii.gz", seed=i)
    with pytest.raises(DatasetError, match=f"--images {src} --labels {src} .*--out {tmp_path / 'src_dataset'}"):
        load_dataset(src)
    ds = make_dataset(src, src, tmp_path / "src_dataset", "CT")
    assert ds.case_ids == ["a", "b"]


# ------------------------------------------------------------------------ 3D Slicer exports
def _slicer_seg(path, ref, lab, segments):
    save_volume(path, lab, ref, segments=segments)


def test_slicer_volume_and_seg_nrrd_with_the_same_name_pair_in_one_folder(tmp_path):
    """Slicer saves ``case.nrrd`` and its segmentation ``case.seg.nrrd``: before, 'case.nrrd and case.seg.nrrd are
    both images of case 'case''."""
    src = tmp_path / "src"
    segs = [{"value": 1, "name": "cube", "color": None}, {"value": 2, "name": "corner", "color": None}]
    for i, c in enumerate(("p1", "p2")):
        ref, lab = _pair(src / f"{c}.nrrd", None, seed=i)
        _slicer_seg(src / f"{c}.seg.nrrd", ref, lab, segs)
    ds = make_dataset(src, src, tmp_path / "ds", "MR")
    assert [(c.image.name, c.label.name) for c in ds.cases] == [("p1.nrrd", "p1.seg.nrrd"), ("p2.nrrd", "p2.seg.nrrd")]
    assert ds.class_names == ["background", "cube", "corner"]
    ds.validate(deep=True)


def test_slicer_labelmap_volumes_named_dash_label_pair(tmp_path):
    """Slicer names a labelmap volume ``<volume>-label`` (e.g. ``case-label.nrrd``)."""
    src = tmp_path / "src"
    for i, c in enumerate(("p1", "p2")):
        _pair(src / f"{c}.nrrd", src / f"{c}-label.nrrd", seed=i)
    ds = make_dataset(src, src, tmp_path / "ds", "MR", class_names=["cube", "corner"])
    assert [c.label.name for c in ds.cases] == ["p1-label.nrrd", "p2-label.nrrd"]


def test_label_values_that_are_not_1_to_n_are_refused_not_padded_with_empty_classes(tmp_path):
    """Slicer segments exported with a colour table keep their table's values (e.g. 5 and 12): the set used to become
    12 classes, 10 of them ``class_k`` present in no file, trained and scored as if real."""
    src = tmp_path / "src"
    segs = [{"value": 5, "name": "cube", "color": None}, {"value": 12, "name": "corner", "color": None}]
    for i, c in enumerate(("p1", "p2")):
        ref, lab = _pair(src / f"{c}.nrrd", None, seed=i, label_values=(5, 12))
        _slicer_seg(src / f"{c}_seg.seg.nrrd", ref, lab, segs)
    with pytest.raises(DatasetError, match=r"label values \[5, 12\].*values \[1, 2, 3, 4, 6, 7, 8, 9, 10, 11\] occur "
                                           r"in no label file.*renumber"):
        make_dataset(src, src, tmp_path / "ds", "MR")
    assert not (tmp_path / "ds").exists()
    # naming every value is the user's explicit choice (classes absent from this set are allowed then)
    names = [f"c{k}" for k in range(1, 13)]
    assert make_dataset(src, src, tmp_path / "ds", "MR", class_names=names).class_names[1:] == names


def test_real_spinal_cord_pairs_make_a_dataset_that_loads(shared_data, tmp_path):
    src = shared_data / "spinal_cord_mri"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    ds = make_dataset(src, src, tmp_path / "ds", "MR", class_names=["cord"])
    assert ds.case_ids == ["t1", "t2"]
    load_dataset(tmp_path / "ds").validate(deep=True)
    assert int(load_label(ds.case("t1").label).data.max()) == 1


def test_one_folder_whose_labels_carry_no_label_tag_says_how_labels_are_told_apart(tmp_path):
    """The shared abdomen folder's ``ct_label_auto.nii.gz`` carries no tag at its end: before, 'no label files' in a
    folder full of them."""
    src = tmp_path / "src"
    _pair(src / "ct_image.nii.gz", src / "ct_label_auto.nii.gz")
    with pytest.raises(DatasetError, match=r"no label files among \['ct_image.nii.gz', 'ct_label_auto.nii.gz'\]: "
                                           r"in one folder .*label tag .*_label"):
        make_dataset(src, src, tmp_path / "ds", "CT")


def test_msd_entries_naming_one_case_twice_with_different_endings_name_both_files(tmp_path):
    for i, end in enumerate((".nii.gz", ".nrrd")):
        _pair(tmp_path / "imagesTr" / f"a{end}", tmp_path / "labelsTr" / f"a{end}", seed=i)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cube", "2": "corner"},
        "training": [{"image": f"./imagesTr/a{e}", "label": f"./labelsTr/a{e}"} for e in (".nii.gz", ".nrrd")]}))
    with pytest.raises(DatasetError, match=r"duplicate case ids \['a'\]: case 'a' is labelled by .*a.nii.gz and "
                                           r".*a.nrrd"):
        load_dataset(tmp_path)
