"""A flat folder of nnU-Net channel files (``case_0000``, ``case_0001``: the channels of one case) is named as such,
with the nnU-Net v2 layout that reads it, instead of "no label for image(s) ['case1_0001.nii.gz', ...]".

Reproduction (before the fix), ``flat/`` holding ``case1_0000.nii.gz``, ``case1_0001.nii.gz``, ``case2_0000...``:
- ``mambahome dataset --images flat --labels labs`` (labels ``case1.nii.gz``...): "no label for image(s)
  ['case1_0001.nii.gz', 'case2_0001.nii.gz']. Files pair by name ...", as if a label were missing;
- ``mambahome dataset --images flat --labels flat`` (no labels): "no label files among [...]";
- ``mambahome train --dataset flat``: "all images ... Put the labels in a folder of their own ... and run:
  mambahome dataset ...", a command that then failed as above.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main
from engine.datasets import load_dataset


@pytest.fixture
def flat(tmp_path) -> Path:
    """``flat/``: two cases of two channels each; ``labs/``: their labels, named by case."""
    folder, labels = tmp_path / "flat", tmp_path / "labs"
    folder.mkdir(), labels.mkdir()
    rng = np.random.default_rng(0)
    for case in ("case1", "case2"):
        for channel in range(2):
            nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)),
                     str(folder / f"{case}_{channel:04d}.nii.gz"))
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:8, 4:8, 4:8] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / f"{case}.nii.gz"))
    return folder


def _hint_in(err: str, folder: Path) -> None:
    assert "no label for image" not in err and "no label files among" not in err, err
    assert "case1_0000.nii.gz, case1_0001.nii.gz are the 2 channels of one case, 'case1'" in err, err
    new = folder.with_name(f"{folder.name}_dataset")
    for part in (f"{new}/imagesTr/", f"{new}/labelsTr/", f"{new}/dataset.json",
                 '"channel_names": {"0": "MR", "1": "MR"}', '"file_ending": ".nii.gz"', "case1.nii.gz",
                 f"mambahome train --dataset {new}"):
        assert part in err, (part, err)


def test_dataset_with_labels_elsewhere_says_the_files_are_channels(flat, tmp_path, capsys):
    code = main(["dataset", "--images", str(flat), "--labels", str(tmp_path / "labs"), "--out", str(tmp_path / "o"),
                 "--modality", "MR"])
    err = capsys.readouterr().err
    assert code == 2
    _hint_in(err, flat)
    assert f"from {tmp_path / 'labs'}" in err
    assert not (tmp_path / "o").exists()


def test_dataset_without_labels_says_the_files_are_channels(flat, tmp_path, capsys):
    code = main(["dataset", "--images", str(flat), "--labels", str(flat), "--out", str(tmp_path / "o"),
                 "--modality", "MR"])
    assert code == 2
    _hint_in(capsys.readouterr().err, flat)


def test_train_on_the_flat_folder_says_the_files_are_channels(flat, tmp_path, capsys):
    code = main(["train", "--dataset", str(flat), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    _hint_in(err, flat)
    assert "mambahome dataset --images" not in err  # it cannot make a multi-channel dataset


def test_the_layout_the_hint_gives_is_read_as_two_channel_cases(flat, tmp_path, capsys):
    main(["dataset", "--images", str(flat), "--labels", str(tmp_path / "labs"), "--out", str(tmp_path / "o"),
          "--modality", "MR"])
    err = capsys.readouterr().err
    new = flat.with_name(f"{flat.name}_dataset")
    meta, _ = json.JSONDecoder().raw_decode(err[err.index("dataset.json: {") + len("dataset.json: "):])
    shutil.copytree(flat, new / "imagesTr")
    shutil.copytree(tmp_path / "labs", new / "labelsTr")
    (new / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(new)
    assert ds.case_ids == ["case1", "case2"] and ds.channel_names == ["MR", "MR"]
    assert [p.name for p in ds.cases[0].image_files] == ["case1_0000.nii.gz", "case1_0001.nii.gz"]


def test_cases_numbered_like_channels_with_labels_of_the_same_names_are_not_called_channels(tmp_path, capsys):
    """Images ``scan_0001`` ... labelled ``scan_0001`` ...: separate cases whose numbers look like channels."""
    images, labels = tmp_path / "imgs", tmp_path / "labs"
    images.mkdir(), labels.mkdir()
    for i in (1, 2):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((12, 12, 12)).astype(np.float32), np.eye(4)),
                 str(images / f"scan_{i:04d}.nii.gz"))
        label = np.zeros((12, 12, 12), np.uint8)
        label[2:5, 2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(labels / f"scan_{i:04d}.nii.gz"))
    code = main(["dataset", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o"),
                 "--modality", "MR"])
    assert code == 0, capsys.readouterr().err
    assert "channels of one case" not in capsys.readouterr().err


def _numbered(folder: Path, n: int, label_folder: Path, label_tag: str = "", skip: int = -1) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(exist_ok=True), label_folder.mkdir(exist_ok=True)
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)),
                 str(folder / f"case_{i:04d}.nii.gz"))
        if i != skip:
            label = np.zeros((16, 16, 16), np.uint8)
            label[4:8, 4:8, 4:8] = 1
            nib.save(nib.Nifti1Image(label, np.eye(4)), str(label_folder / f"case_{i:04d}{label_tag}.nii.gz"))


def test_cases_numbered_case_0000_with_labels_in_the_same_folder_are_not_called_channels(tmp_path, capsys):
    """case_0000, case_0001, case_0002 with case_000N_seg beside them: cases numbered so (the reviewer's repro)."""
    flat = tmp_path / "flat"
    _numbered(flat, 3, flat, "_seg")
    code = main(["train", "--dataset", str(flat), "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "channels of one case" not in err, err
    assert "mambahome dataset" in err  # the way to make a dataset of them, as before


def test_numbered_cases_with_one_label_missing_say_which(tmp_path, capsys):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    _numbered(imgs, 4, labs, skip=2)
    code = main(["dataset", "--images", str(imgs), "--labels", str(labs), "--out", str(tmp_path / "o"),
                 "--modality", "MR"])
    err = capsys.readouterr().err
    assert code == 2 and "channels of one case" not in err, err
    assert "no label for image(s) ['case_0002.nii.gz']" in err, err


def test_numbered_cases_from_case_0000_pair_with_their_labels(tmp_path, capsys):
    """case_0000 lost "_0000" as an image tag and missed its label case_0000.nii.gz: the set could not be made."""
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    _numbered(imgs, 3, labs)
    code = main(["dataset", "--images", str(imgs), "--labels", str(labs), "--out", str(tmp_path / "o"),
                 "--modality", "MR"])
    assert code == 0, capsys.readouterr().err
    assert len(load_dataset(tmp_path / "o").cases) == 3
