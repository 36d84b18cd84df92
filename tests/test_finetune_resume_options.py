"""``mambahome finetune --resume --out R``: the options not given are the run's own (R's train_config.json),
the parent checkpoint and the data included, as ``train --resume --out R``.

Before: `finetune --resume --out R` alone was refused by argparse ("the following arguments are required:
--checkpoint, one of the arguments --dataset --cases"), and given only those, the command's defaults were compared
with the run's settings ("cannot resume with different settings (...)"). Options given that contradict the run
stay refused, and the resumed run continues exactly (the same weights as an uninterrupted run).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.cli import main
from engine.train.finetune import finetune
from train_support import cancel_at, four_phantoms, tiny_parent

FAST = dict(patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=3, seed=3, val_fraction=0.25, steps=6,
            num_workers=0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, phantoms) -> Path:
    names = list(json.loads((phantoms / "dataset.json").read_text())["labels"])
    return tiny_parent(tmp_path_factory.mktemp("parent") / "parent.safetensors", names)


def _cancelled_run(parent: Path, data: Path, out: Path, at: int = 2) -> None:
    cancel_at(at, lambda **hooks: finetune(parent, data, out, **hooks, **FAST))


def test_finetune_resume_with_out_alone_continues_the_run_exactly(parent, phantoms, tmp_path, capsys):
    whole = finetune(parent, phantoms, tmp_path / "whole", **FAST)
    run = tmp_path / "run"
    _cancelled_run(parent, phantoms, run)
    assert (run / "resume.safetensors").is_file()
    assert main(["finetune", "--resume", "--out", str(run) + "/", "--quiet"]) == 0
    assert "steps: 6" in capsys.readouterr().out
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_finetune_given_options_that_contradict_the_run_are_refused(parent, phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    _cancelled_run(parent, phantoms, run)
    assert main(["finetune", "--resume", "--out", str(run), "--steps", "50", "--lr", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with different settings (lr: 0.0005 -> 0.1, steps: 6 -> 50)" in err, err
    other = tmp_path / "other.safetensors"
    other.write_bytes(parent.read_bytes())
    assert main(["finetune", "--resume", "--out", str(run), "--checkpoint", str(other), "--quiet"]) == 2
    assert "init_checkpoint" in capsys.readouterr().err
    # options that agree with the run, or that a resume may change, are fine given
    assert main(["finetune", "--resume", "--out", str(run), "--checkpoint", str(parent), "--dataset", str(phantoms),
                 "--steps", "6", "--num-workers", "0", "--quiet"]) == 0


def test_finetune_needs_parent_and_data_without_resume_or_a_run_to_resume(parent, tmp_path, capsys):
    assert main(["finetune", "--checkpoint", str(parent), "--out", str(tmp_path / "new")]) == 2
    assert "--dataset or --cases required" in capsys.readouterr().err
    assert main(["finetune", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "no train_config.json, so there is no run to resume there" in capsys.readouterr().err
