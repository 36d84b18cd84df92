"""A dataset whose training label maps are all background is refused before training, as `mambahome dataset`
refuses the same files ("every label map is empty (all 0); nothing to learn").

Before, `mambahome train` on such a folder (labels exported before anyone annotated, a wrong label folder) ran
every step, printed MONAI's "Num foregrounds 0 ... unable to generate class balanced samples" and handed on a
checkpoint that had learnt nothing but background. One empty case among labelled ones still trains.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.train.config import TrainConfig, TrainingDataError
from engine.train.loop import train
from train_support import four_phantoms

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=1, seed=3,
            steps=1, val_fraction=0.25)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def _emptied(phantoms: Path, out: Path, how_many: int) -> Path:
    shutil.copytree(phantoms, out)
    for label_path in sorted((out / "labelsTr").glob("*.nii.gz"))[:how_many]:
        lab = nib.load(str(label_path))
        nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine, lab.header), str(label_path))
    return out


def test_train_refuses_a_dataset_whose_labels_are_all_background(phantoms, tmp_path):
    data = _emptied(phantoms, tmp_path / "empty", how_many=4)
    run = tmp_path / "run"
    with pytest.raises(TrainingDataError, match="nothing to learn") as info:
        train(TrainConfig(dataset=str(data), out=str(run), **TINY))
    assert str(data) in str(info.value)
    assert not run.exists() or not any(run.iterdir())  # refused before the run folder was written


def test_one_empty_label_among_labelled_cases_still_trains(phantoms, tmp_path):
    data = _emptied(phantoms, tmp_path / "one_empty", how_many=1)
    result = train(TrainConfig(dataset=str(data), out=str(tmp_path / "run"), **TINY))
    assert Path(result.checkpoint).is_file()


def test_fine_tuning_a_parent_on_all_background_cases_is_a_correction_and_runs(phantoms, tmp_path):
    """Erasing a model's false positives leaves corrected cases with no foreground: teaching the parent to find
    nothing there is what fine-tuning is for, not a background-only model made from scratch."""
    parent = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "parent"), **TINY))
    data = _emptied(phantoms, tmp_path / "erased", how_many=4)
    result = train(TrainConfig(dataset=str(data), out=str(tmp_path / "ft"), init_checkpoint=str(parent.checkpoint),
                               **TINY))
    assert Path(result.checkpoint).is_file()
