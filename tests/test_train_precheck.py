"""A run refused for its data leaves its run folder as it was; train-eval refuses a held-out set with other
image channels before training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.datasets import DatasetError
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig, TrainingDataError
from engine.train.finetune import finetune
from engine.train.loop import train

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=1, seed=3,
            steps=1, val_fraction=0.25)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=4,
                                 shape=(32, 32, 24), seed=11)


def _broken(phantoms: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``phantoms`` with its third case (a training case or not, whichever) broken ``how``."""
    out = tmp_path / f"broken_{how}"
    shutil.copytree(phantoms, out)
    label_path = sorted((out / "labelsTr").glob("*.nii.gz"))[2]
    image_path = sorted((out / "imagesTr").glob("*.nii.gz"))[2]
    lab, img = nib.load(str(label_path)), nib.load(str(image_path))
    if how == "shape":
        data = np.asarray(lab.dataobj)[:, :, :20].copy()
        nib.save(nib.Nifti1Image(data, lab.affine, lab.header), str(label_path))
    elif how == "affine":
        affine = lab.affine.copy()
        affine[:3, 3] += 5.0  # same shape, shifted 5 mm: on another grid
        nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), str(label_path))
    elif how == "values":
        data = np.asarray(lab.dataobj).copy()
        data[0, 0, 0] = 9  # not a declared class
        nib.save(nib.Nifti1Image(data, lab.affine, lab.header), str(label_path))
    elif how == "nan":
        data = np.asarray(img.dataobj, dtype=np.float32).copy()
        data[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), str(image_path))
    return out


def _snapshot(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


MESSAGES = {"shape": r"shape", "affine": r"different grid", "values": r"label values \[9\]",
            "nan": r"NaN or infinite"}


@pytest.mark.parametrize("how", sorted(MESSAGES))
def test_a_refused_training_run_writes_nothing(phantoms, tmp_path, how):
    data = _broken(phantoms, tmp_path, how)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=MESSAGES[how]):
        train(TrainConfig(dataset=str(data), out=str(out), **TINY))
    assert not out.exists()


def test_a_refused_run_leaves_an_earlier_unfinished_run_folder_as_it_was(phantoms, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.json").write_text(json.dumps({"train": ["x"], "val": []}))
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"label values \[9\]"):
        train(TrainConfig(dataset=str(_broken(phantoms, tmp_path, "values")), out=str(out), **TINY))
    assert _snapshot(out) == before


def test_the_header_check_fails_before_any_case_is_preprocessed(phantoms, tmp_path, monkeypatch):
    import engine.train.prepare as prepare

    def preprocess(*a, **k):  # pragma: no cover - reached only when the check misses
        raise AssertionError("preprocessed before the header check")

    monkeypatch.setattr(prepare, "preprocess_cases", preprocess)
    with pytest.raises(TrainingDataError, match=r"phantom_002: label .* has shape \(32, 32, 20\)"):
        train(TrainConfig(dataset=str(_broken(phantoms, tmp_path, "shape")), out=str(tmp_path / "run"), **TINY))


def test_a_good_run_still_writes_its_config_and_split(phantoms, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(dataset=str(phantoms), out=str(out), **TINY))
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"phantom_{i:03d}" for i in range(4)]
    assert json.loads((out / "train_config.json").read_text())["dataset"] == str(phantoms)
    assert (out / "last.safetensors").is_file()


@pytest.mark.parametrize("how", ["affine", "values", "nan"])
def test_a_refused_finetune_writes_nothing(phantoms, tmp_path, how):
    torch.manual_seed(0)
    parent = tmp_path / "parent.safetensors"
    pp = Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0))
    class_names = json.loads((phantoms / "dataset.json").read_text())["labels"]
    names = [n for n, _ in sorted(class_names.items(), key=lambda kv: kv[1])]
    save_checkpoint(parent, build_network("mambahome", 1, len(names), "tiny"),
                    {"class_names": names, "modality": "CT", "preprocessing": pp.to_dict(),
                     "patch_size": [32, 32, 32], "version": "parent-v1", "parent": None, "cases": [],
                     "provenance": {"command": "test"}})
    out = tmp_path / "ft"
    with pytest.raises(ValueError, match=MESSAGES[how]):
        finetune(parent, _broken(phantoms, tmp_path, how), out, steps=1, device="cpu", val_fraction=0.25)
    assert not out.exists()


def _two_channel(phantoms: Path, out: Path) -> Path:
    shutil.copytree(phantoms, out)
    meta = json.loads((out / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT"}
    (out / "dataset.json").write_text(json.dumps(meta))
    for f in sorted((out / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    return out


@pytest.mark.parametrize("train_channels", [1, 2])
def test_train_eval_refuses_a_held_out_set_with_other_channels_before_training(phantoms, tmp_path, monkeypatch,
                                                                                 train_channels):
    import engine.experiments as experiments

    two = _two_channel(phantoms, tmp_path / "Dataset002_Two")
    train_set, test_set = (phantoms, two) if train_channels == 1 else (two, phantoms)

    def no_training(*a, **k):  # pragma: no cover - reached only when the check misses
        raise AssertionError("trained before checking --test")

    monkeypatch.setattr(experiments.loop, "train", no_training)
    out = tmp_path / "run"
    test_n, train_n = 3 - train_channels, train_channels
    with pytest.raises(DatasetError) as info:
        experiments.train_and_evaluate(str(train_set), str(test_set), str(out), preset="tiny", steps=1,
                                       max_minutes=None, device="cpu")
    msg = str(info.value)
    assert str(test_set) in msg and str(train_set) in msg
    assert f"{test_n} image channel" in msg and f"{train_n} image channel" in msg
    assert not out.exists()


def test_train_eval_accepts_a_held_out_set_with_the_same_channels(phantoms, tmp_path):
    from engine.experiments import check_held_out_dataset

    two = _two_channel(phantoms, tmp_path / "Dataset002_Two")
    other_two = _two_channel(phantoms, tmp_path / "Dataset003_Two")
    # copies of the same cases as training and test: refused without allow_overlap (tests/test_cli_review_reports.py)
    check_held_out_dataset(str(two), str(other_two), allow_overlap=True)
    check_held_out_dataset(str(phantoms), str(phantoms), allow_overlap=True)
