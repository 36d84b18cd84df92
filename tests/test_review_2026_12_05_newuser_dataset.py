"""A new user's `mambahome dataset` and `evaluate-interactive` runs (their /tmp/newuser/b and h folders).

Reproductions (before the fix):
- ``mambahome dataset --images b/imgs --labels b/labs --classes anterior posterior``: 5 problems (a 2D image, a
  label of another shape, NaN voxels, an off-grid label, a truncated file) were listed, and the case whose label
  held 0/127/254 only in the next run, after they were fixed ("every problem of every case reported in one run");
- that case's error said only "name every value from 1 to 254": the renumbering hint came only when every label
  file together held no more values than classes (here the other cases' 1 and 2 made four), not for the one mask;
- ``mambahome evaluate-interactive --dataset h/imgs`` (images, no labels) suggested ``mambahome dataset --images
  h/imgs --labels h/imgs``, which then failed with "no label files among ...".
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main
from engine.datasets import DatasetError, load_dataset, make_dataset

SHAPE = (12, 12, 10)


def _write(folder: Path, name: str, data: np.ndarray, affine=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(folder / name))


def _label(values=(1, 2)) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:8, 3:8, 3:8] = values[0]
    lab[0:2, 0:2, 0:2] = values[1]
    return lab


def _image(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 10.0, SHAPE).astype(np.float32)


def _folders(tmp_path: Path, label_of_bad=(127, 254)) -> tuple:
    """good (1/2), nan (NaN voxels), shift (label 5 mm off), l255 (a label of ``label_of_bad``)."""
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    for i, case in enumerate(("good", "nan", "shift", "l255")):
        image = _image(i)
        if case == "nan":
            image[0, 0, :3] = np.nan
        _write(imgs, f"{case}.nii.gz", image)
        affine = np.eye(4)
        if case == "shift":
            affine[0, 3] = 5.0
        _write(labs, f"{case}.nii.gz", _label(label_of_bad if case == "l255" else (1, 2)), affine)
    return imgs, labs


def test_a_label_past_the_classes_is_reported_with_every_other_problem_in_one_run(tmp_path):
    imgs, labs = _folders(tmp_path)
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["anterior", "posterior"])
    text = str(err.value)
    assert "3 problem(s)" in text, text
    assert "case nan:" in text and "NaN" in text, text
    assert "case shift:" in text and "different grid" in text, text
    assert "case l255:" in text and "l255.nii.gz" in text and "go up to 254" in text, text
    assert not (tmp_path / "ds").exists()


def test_a_mask_of_no_more_values_than_classes_gets_the_renumbering_value_by_value(tmp_path):
    """The hint is about the one mask: the other cases' values 1 and 2 no longer hide it."""
    imgs, labs = _folders(tmp_path)
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["anterior", "posterior"])
    line = next(x for x in str(err.value).splitlines() if "case l255:" in x)
    assert "127 -> 1 (anterior), 254 -> 2 (posterior)" in line, line
    assert "renumber" in line, line


def test_a_mask_of_more_values_than_classes_gets_no_mapping(tmp_path):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    _write(imgs, "a.nii.gz", _image())
    lab = _label((1, 2))
    lab[9, 9, 9] = 7
    _write(labs, "a.nii.gz", lab)
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["anterior", "posterior"])
    text = str(err.value)
    assert "case a:" in text and "name every value from 1 to 7" in text and "->" not in text, text


def test_a_single_value_mask_is_told_to_be_rewritten_as_0_1(tmp_path):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    _write(imgs, "a.nii.gz", _image())
    _write(labs, "a.nii.gz", (_label((1, 1)) * 255).astype(np.uint8))
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR", class_names=["cord"])
    text = str(err.value)
    assert "0/255" in text and "as 0/1" in text and "255 -> 1 (cord)" in text, text


def test_class_names_from_a_dataset_json_beside_the_labels_are_checked_in_the_same_run(tmp_path):
    imgs, labs = _folders(tmp_path, label_of_bad=(1, 2))
    (labs / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cube": 1}}))
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR")
    text = str(err.value)
    assert "case nan:" in text and "case shift:" in text, text
    assert "up to 2 but 1 class name(s) were named in" in text and "dataset.json" in text, text
    assert "2 -> 1" not in text  # [1, 2] are two values for one class: no mapping


def test_values_that_skip_numbers_are_reported_with_the_other_problems(tmp_path):
    """Without class names, labels valued 5 and 12 (a colour table's) are refused: with the NaN image, in one run."""
    imgs, labs = _folders(tmp_path, label_of_bad=(5, 12))
    with pytest.raises(DatasetError) as err:
        make_dataset(imgs, labs, tmp_path / "ds", "MR")
    text = str(err.value)
    assert "case nan:" in text and "case shift:" in text and "are not numbered 1.." in text, text


def test_the_command_line_lists_every_problem_at_once(tmp_path, capsys):
    imgs, labs = _folders(tmp_path)
    assert main(["dataset", "--images", str(imgs), "--labels", str(labs), "--modality", "MR", "--out",
                 str(tmp_path / "ds"), "--classes", "anterior", "posterior"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "127 -> 1 (anterior)" in err and "case nan:" in err, err
    # fixed as the hint says, the set is made
    lab = np.asarray(nib.load(str(labs / "l255.nii.gz")).dataobj)
    _write(labs, "l255.nii.gz", np.select([lab == 127, lab == 254], [1, 2], 0).astype(np.uint8))
    for case in ("nan", "shift"):
        (imgs / f"{case}.nii.gz").unlink()
        (labs / f"{case}.nii.gz").unlink()
    assert main(["dataset", "--images", str(imgs), "--labels", str(labs), "--modality", "MR", "--out",
                 str(tmp_path / "ds"), "--classes", "anterior", "posterior"]) == 0


def test_a_folder_of_images_without_labels_is_told_labels_are_needed(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(2):
        _write(imgs, f"case_{i}.nii.gz", _image(i))
    with pytest.raises(DatasetError) as err:
        load_dataset(imgs)
    text = str(err.value)
    assert f"--labels {imgs} " not in text, text  # the command that failed with "no label files among ..."
    assert f"--images {imgs} --labels LABELS_FOLDER" in text and "needs a label" in text, text


def test_evaluate_interactive_on_images_without_labels_suggests_a_command_that_can_work(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    for i in range(2):
        _write(imgs, f"case_{i}.nii.gz", _image(i))
    checkpoint = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"
    assert main(["evaluate-interactive", "--checkpoint", str(checkpoint), "--dataset", str(imgs),
                 "--out", str(tmp_path / "report"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--labels LABELS_FOLDER" in err and f"--labels {imgs} " not in err, err
    # the suggested command, with a labels folder, works
    labs = tmp_path / "labs"
    for i in range(2):
        _write(labs, f"case_{i}.nii.gz", _label())
    ds = make_dataset(imgs, labs, tmp_path / "imgs_dataset", "MR")
    assert ds.case_ids == ["case_0", "case_1"]


def test_a_folder_of_image_and_label_pairs_still_gets_itself_as_both_folders(tmp_path):
    src = tmp_path / "src"
    _write(src, "a.nii.gz", _image())
    _write(src, "a_seg.nii.gz", _label())
    with pytest.raises(DatasetError, match=f"--images {src} --labels {src} "):
        load_dataset(src)
