"""Three messages of the training and prediction commands.

Before: `train --resume` on a finished run said it "cannot be resumed exactly" (as if something broke) instead of
that the run is finished; a 1-case dataset at --val-fraction 0.2 trained with no validation and no notice; and a
2-channel model given one file said "expects 2 input channel(s) ... provides 1" but not how to give two.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.inference import PredictionError, Predictor
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.synth import make_phantom, write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.loop import train
from engine.train.run_folder import RunFolderError

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=2, seed=3, steps=2,
            num_workers=0)


def test_resume_of_a_finished_run_says_it_is_finished(tmp_path):
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=2, shape=(32, 32, 24), seed=11)
    run = tmp_path / "run"
    train(TrainConfig(dataset=str(data), out=str(run), val_fraction=0.5, **TINY))
    assert not (run / "resume.safetensors").exists()
    with pytest.raises(RunFolderError, match=r"the run is finished .*nothing to resume.*mambahome finetune "
                                             r"--checkpoint"):
        train(TrainConfig(dataset=str(data), out=str(run), val_fraction=0.5, resume=True, **TINY))


def test_one_case_with_a_validation_fraction_gets_a_note(tmp_path):
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=1, shape=(32, 32, 24), seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(TrainConfig(dataset=str(data), out=str(tmp_path / "run"), val_fraction=0.2, **TINY))
    notes = [str(w.message) for w in caught if "leaves none for validation" in str(w.message)]
    assert len(notes) == 1 and "1 case(s), all kept for training" in notes[0] and "--val-fraction 0.2" in notes[0]
    assert result.best_dice is None
    assert json.loads((tmp_path / "run" / "split.json").read_text())["val"] == []


def test_one_case_without_a_validation_fraction_gets_no_note(tmp_path):
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=1, shape=(32, 32, 24), seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(dataset=str(data), out=str(tmp_path / "run"), val_fraction=0.0, **TINY))
    assert not [w for w in caught if "leaves none for validation" in str(w.message)]


def test_a_two_channel_model_given_one_file_says_how_to_give_two():
    torch.manual_seed(0)
    model = build_network("mambahome", 2, 2, "tiny")
    meta = {"class_names": ["background", "organ"], "patch_size": [32, 32, 32], "modality": "CT",
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()}
    image, _ = make_phantom((40, 44, 30), "CT", seed=1).to_volumes()
    with pytest.raises(PredictionError, match=r"expects 2 input channel.*provides 1; give one file per channel, "
                                              r"named <case>_0000.nii.gz to <case>_0001.nii.gz .*--input"):
        Predictor((model, meta), device="cpu").predict(image)
