"""`mambahome train`, `train-eval` and `finetune` name every problem of a dataset in one error, as `mambahome dataset`
does, instead of the first one only.

Reproduction (before the fix): a dataset with a missing label (c5), two labels of another shape (c1, c2), NaN voxels
(c3) and a label value past the classes (c4) stopped `mambahome train` at "case c5: label file ... not found"; with
c5 fixed, at "case c1: label ... has shape ..."; and so on, one run per problem, while
`mambahome dataset --images imagesTr --labels labelsTr` listed every problem of those pairs at once.

Now the checks that need no voxel data (files there, headers readable, one voxel shape per case) report all their
problems in one error before any case is preprocessed; the voxel checks (NaN, label values) report every case in
one error after all cases were read, before the run folder is written. A long list shows the first 20.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import main
from engine.datasets import DatasetError, load_dataset
from train_support import four_phantoms, tiny_parent

TINY = ["--preset", "tiny", "--patch-size", "32", "32", "32", "--steps", "1", "--device", "cpu", "--quiet",
        "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def _copy(phantoms: Path, tmp_path: Path, name: str = "ds") -> Path:
    out = tmp_path / name
    shutil.copytree(phantoms, out)
    return out


def _label(ds: Path, i: int) -> Path:
    return ds / "labelsTr" / f"phantom_{i:03d}.nii.gz"


def _image(ds: Path, i: int) -> Path:
    return ds / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz"


def _crop_label(path: Path, z: int) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :z].copy(), img.affine, img.header), str(path))


def _header_problems(phantoms: Path, tmp_path: Path) -> Path:
    """Case 0's label missing (its image kept), cases 1 and 2 labelled on another voxel shape."""
    ds = _copy(phantoms, tmp_path)
    meta = json.loads((ds / "dataset.json").read_text())
    # an MSD-style list names every pair, so a case whose label file is gone is still listed (and refused)
    meta["training"] = [{"image": f"./imagesTr/phantom_{i:03d}_0000.nii.gz",
                         "label": f"./labelsTr/phantom_{i:03d}.nii.gz"} for i in range(4)]
    (ds / "dataset.json").write_text(json.dumps(meta))
    _label(ds, 0).unlink()
    _crop_label(_label(ds, 1), 20)
    _crop_label(_label(ds, 2), 18)
    return ds


def _voxel_problems(phantoms: Path, tmp_path: Path) -> Path:
    """NaN voxels in case 1's image, label value 9 (no class) in case 2's label."""
    ds = _copy(phantoms, tmp_path)
    img = nib.load(str(_image(ds, 1)))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(_image(ds, 1)))
    lab = nib.load(str(_label(ds, 2)))
    values = np.asarray(lab.dataobj).copy()
    values[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(values, lab.affine, lab.header), str(_label(ds, 2)))
    return ds


def _check_header_report(err: str, ds: Path) -> None:
    assert "3 problem(s)" in err, err
    assert "case phantom_000: label file" in err and "not found" in err
    assert "case phantom_001: label" in err and "(32, 32, 20)" in err
    assert "case phantom_002: label" in err and "(32, 32, 18)" in err
    assert str(ds) in err


def test_train_names_every_header_problem_in_one_error(phantoms, tmp_path, capsys):
    ds = _header_problems(phantoms, tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(ds), "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    _check_header_report(err, ds)
    assert not out.exists()


def test_train_names_every_voxel_problem_in_one_error(phantoms, tmp_path, capsys):
    ds = _voxel_problems(phantoms, tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(ds), "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 problem(s) in 4 case(s)" in err, err
    assert "case phantom_001:" in err and "NaN or infinite" in err
    assert "case phantom_002:" in err and "label values [9]" in err
    assert not out.exists()


def test_train_eval_names_every_problem_of_the_training_set(phantoms, tmp_path, capsys):
    ds = _header_problems(phantoms, tmp_path)
    out = tmp_path / "run"
    code = main(["train-eval", "--train", str(ds), "--test", str(phantoms), "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    _check_header_report(err, ds)
    assert not out.exists()


def test_finetune_names_every_problem(phantoms, tmp_path, capsys):
    names = [n for n, _ in sorted(json.loads((phantoms / "dataset.json").read_text())["labels"].items(),
                                  key=lambda kv: kv[1])]
    parent = tiny_parent(tmp_path / "parent.safetensors", names)
    ds = _header_problems(phantoms, tmp_path)
    out = tmp_path / "ft"
    code = main(["finetune", "--checkpoint", str(parent), "--dataset", str(ds), "--out", str(out), "--steps", "1",
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    _check_header_report(err, ds)
    assert not out.exists()


def test_a_long_list_shows_the_first_20_and_counts_the_rest(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
        "training": [{"image": f"./imagesTr/c{i:02d}.nii.gz", "label": f"./labelsTr/c{i:02d}.nii.gz"}
                     for i in range(23)]}))
    code = main(["train", "--dataset", str(ds), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "23 problem(s)" in err and "... and 3 more" in err, err
    assert "case c19: image file" in err and "case c20:" not in err


def test_load_dataset_names_every_missing_file(phantoms, tmp_path):
    """Every command reading a dataset (evaluate-interactive, train-eval's --test) gets the whole list too."""
    ds = _copy(phantoms, tmp_path)
    _image(ds, 1).unlink()
    _image(ds, 3).unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(ds)
    text = str(err.value)
    assert "2 problem(s)" in text and "case phantom_001: image file" in text and "case phantom_003: image file" in text


def test_one_problem_keeps_its_one_line_message(phantoms, tmp_path):
    ds = _copy(phantoms, tmp_path)
    _image(ds, 2).unlink()
    with pytest.raises(DatasetError, match=r"^\S+: case phantom_002: image file .*phantom_002_0000.nii.gz not found$"):
        load_dataset(ds)
