"""A finished run names the checkpoint it hands on (RunResult.checkpoint) when it says to fine-tune from it.

Before: a run with --val-fraction 0 (no validation: the run hands on last, best is a copy of it) or --select last,
asked again in its folder (a new run, or --resume), said "fine-tune from its checkpoint (mambahome finetune
--checkpoint RUN/best.safetensors)" while last.safetensors is the selected one.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.loop import train

TINY = ["--preset", "tiny", "--patch-size", "32", "32", "32", "--batch-size", "1", "--device", "cpu", "--steps", "2",
        "--val-every", "2", "--num-workers", "0", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("d") / "Dataset001_Phantom", cases=2, shape=(32, 32, 24),
                                 seed=11)


def _again(data: Path, run: Path, capsys, *extra: str) -> str:
    """The messages of the same command in the finished run's folder, as a new run and as --resume."""
    said = []
    for resume in ([], ["--resume"]):
        assert main(["train", "--dataset", str(data), "--out", str(run), *TINY, *extra, *resume]) == 2
        said.append(capsys.readouterr().err)
    return "\n".join(said)


def test_a_run_without_validation_names_last(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--out", str(run), *TINY, "--val-fraction", "0"]) == 0
    assert f"selected checkpoint: {run / 'last.safetensors'}" in capsys.readouterr().out
    err = _again(data, run, capsys, "--val-fraction", "0")
    assert err.count(f"mambahome finetune --checkpoint {run / 'last.safetensors'}") == 2, err
    assert f"--checkpoint {run / 'best.safetensors'}" not in err, err


def test_select_last_names_last_and_a_validated_run_best(data, tmp_path, capsys):
    run = tmp_path / "last"
    assert main(["train", "--dataset", str(data), "--out", str(run), *TINY, "--val-fraction", "0.5",
                 "--select", "last"]) == 0
    capsys.readouterr()
    err = _again(data, run, capsys, "--val-fraction", "0.5", "--select", "last")
    assert err.count(f"mambahome finetune --checkpoint {run / 'last.safetensors'}") == 2, err
    run = tmp_path / "best"
    result = train(TrainConfig(dataset=str(data), out=str(run), preset="tiny", patch_size=[32, 32, 32], batch_size=1,
                               device="cpu", steps=2, val_every=2, num_workers=0, seed=3, val_fraction=0.5))
    if result.best_dice is None:
        pytest.skip("the validation case gave no score")
    assert result.checkpoint == run / "best.safetensors"
    err = _again(data, run, capsys, "--val-fraction", "0.5")
    assert err.count(f"mambahome finetune --checkpoint {run / 'best.safetensors'}") == 2, err
