"""``mambahome train --resume --out R``: the options not given are the run's own (R's train_config.json).

Before: `train --resume --out R` alone failed: --dataset was required, and without it given the command's
defaults were compared with the run's settings ("cannot resume with different settings (patch_size ... -> None,
preset 'tiny' -> 'small', steps 200 -> 1000)"). Options given that contradict the run stay refused, and the
resumed run continues exactly (the same weights as an uninterrupted run).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.cli import main
from engine.train.loop import train
from engine.train.config import TrainConfig
from train_support import cancel_at, four_phantoms

TINY = dict(preset="tiny", patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=3, seed=3,
            val_fraction=0.25, steps=6, num_workers=0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def _cancelled_run(data: Path, out: Path, at: int = 2) -> None:
    cancel_at(at, lambda **hooks: train(TrainConfig(dataset=str(data), out=str(out), **TINY), **hooks))


def test_resume_with_out_alone_continues_the_run_exactly(phantoms, tmp_path, capsys):
    whole = train(TrainConfig(dataset=str(phantoms), out=str(tmp_path / "whole"), **TINY))
    run = tmp_path / "run"
    _cancelled_run(phantoms, run)
    # the folder given with a trailing slash: the same run folder
    assert main(["train", "--resume", "--out", str(run) + "/", "--quiet"]) == 0
    assert "steps: 6" in capsys.readouterr().out
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_given_options_that_contradict_the_run_are_refused(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    _cancelled_run(phantoms, run)
    assert main(["train", "--resume", "--out", str(run), "--steps", "50", "--preset", "small", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with different settings (preset: 'tiny' -> 'small', steps: 6 -> 50)" in err, err
    # options that agree with the run, or that a resume may change, are fine given
    assert main(["train", "--resume", "--out", str(run), "--preset", "tiny", "--num-workers", "0", "--quiet"]) == 0


def test_dataset_is_needed_without_resume_or_a_run_to_resume(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "new")]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no train_config.json, so there is no run to resume there" in capsys.readouterr().err
