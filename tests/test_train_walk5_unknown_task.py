"""An unknown ``--task`` is refused as such, listing the known tasks, before anything is read.

Before: `mambahome finetune --task bogus --checkpoint interactive.safetensors ...` said "trained for task
'interactive'; fine-tuning keeps it (asked for 'bogus' ...)", never that bogus is no task; `train --task bogus` and
`train-eval --task bogus` first met the dataset's problems (or trained up to the task's lookup).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.train.config import TrainConfig
from engine.train.finetune import finetune
from engine.train.task import UnknownTaskError


def _interactive_parent(path: Path) -> Path:
    """A tiny checkpoint whose metadata says it was trained for the interactive task (only its header is read)."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    save_checkpoint(path, build_network("mambahome", 1, 2, "tiny"),
                    {"class_names": ["background", "foreground"], "modality": "CT", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("CT", target_spacing=(1.5, 1.5, 2.0)).to_dict(),
                     "task": {"name": "interactive"}})
    return path


def _says_unknown(err: str) -> None:
    assert "unknown training task 'bogus'" in err, err
    assert "interactive" in err and "segmentation" in err, err
    assert "trained for task" not in err and "not found" not in err, err


def test_finetune_refuses_an_unknown_task_before_the_parent(tmp_path, capsys):
    parent = _interactive_parent(tmp_path / "interactive.safetensors")
    tmp_path.joinpath("store").mkdir()
    assert main(["finetune", "--task", "bogus", "--checkpoint", str(parent), "--cases", str(tmp_path / "store"),
                 "--out", str(tmp_path / "ft"), "--quiet"]) == 2
    _says_unknown(capsys.readouterr().err)
    # the folder, the parent and the cases named wrongly too: still the task first
    assert main(["finetune", "--task", "bogus", "--checkpoint", str(tmp_path / "nope.safetensors"), "--cases",
                 str(tmp_path / "nowhere"), "--out", str(tmp_path / "ft"), "--quiet"]) == 2
    _says_unknown(capsys.readouterr().err)
    assert not (tmp_path / "ft").exists()
    with pytest.raises(UnknownTaskError, match="unknown training task 'bogus'"):
        finetune(parent, tmp_path / "store", tmp_path / "ft", task="bogus")


def test_train_and_train_eval_refuse_an_unknown_task_first(tmp_path, capsys):
    nope = str(tmp_path / "nope")
    assert main(["train", "--task", "bogus", "--dataset", nope, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    _says_unknown(capsys.readouterr().err)
    assert main(["train-eval", "--task", "bogus", "--train", nope, "--test", nope, "--out", str(tmp_path / "te"),
                 "--quiet"]) == 2
    _says_unknown(capsys.readouterr().err)
    with pytest.raises(UnknownTaskError, match="unknown training task 'bogus'"):
        TrainConfig(dataset=nope, out=str(tmp_path / "run"), task="bogus")
    assert not (tmp_path / "run").exists() and not (tmp_path / "te").exists()
    # the known ones are still taken
    assert TrainConfig(dataset=nope, out=str(tmp_path / "run"), task="interactive").task == "interactive"
