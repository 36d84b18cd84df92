"""Resuming a run from another working directory.

Before: train_config.json recorded --cases/--dataset (and a relative --init-checkpoint or --replay) exactly as
typed, so `cd /tmp/x && mambahome finetune --cases store --out ft3 ...`, interrupted, then `cd /tmp && mambahome
finetune --resume --out /tmp/x/ft3` stopped at "the run's data folder store (train_config.json) is not found; if it
was moved..." (it was not moved); the relative --out was refused as a changed setting too. Now the places are
recorded absolute; a run recorded before that (relative places) is resolved against the directory its relative
--out was typed in, and where that is not known the message says the path was recorded relative and what to do.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.cli import main
from engine.train.config import TrainConfig
from engine.train.finetune import finetune
from engine.train.loop import train
from train_support import cancel_at, four_phantoms, tiny_parent

FAST = dict(patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=2, seed=3, val_fraction=0.25, steps=4,
            num_workers=0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


@pytest.fixture()
def workdir(tmp_path, phantoms, monkeypatch) -> Path:
    """``tmp/x`` holding the data (``store``) and the parent (``parent.safetensors``), the current directory."""
    x = tmp_path / "x"
    x.mkdir()
    shutil.copytree(phantoms, x / "store")
    names = list(json.loads((phantoms / "dataset.json").read_text())["labels"])
    tiny_parent(x / "parent.safetensors", names)
    monkeypatch.chdir(x)
    return x


def _config(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


def test_finetune_records_places_absolute_and_resumes_from_another_directory(workdir, monkeypatch, capsys):
    cancel_at(2, lambda **hooks: finetune("parent.safetensors", "store", "ft3", **hooks, **FAST))
    saved = _config(workdir / "ft3")
    assert saved["dataset"] == str((workdir / "store").resolve())
    assert saved["init_checkpoint"] == str((workdir / "parent.safetensors").resolve())
    monkeypatch.chdir(workdir.parent)
    assert main(["finetune", "--resume", "--out", str(workdir / "ft3"), "--quiet"]) == 0, capsys.readouterr().err
    assert "steps: 4" in capsys.readouterr().out


def test_train_records_places_absolute_and_relative_options_on_resume_are_the_same(workdir, monkeypatch, capsys):
    cfg = TrainConfig(dataset="store", out="run", init_checkpoint="parent.safetensors", **FAST)
    cancel_at(2, lambda **hooks: train(cfg, **hooks))
    saved = _config(workdir / "run")
    assert saved["dataset"] == str((workdir / "store").resolve())
    assert saved["init_checkpoint"] == str((workdir / "parent.safetensors").resolve())
    # typed relative on resume (from the directory they were typed in): the recorded absolute places
    assert main(["train", "--resume", "--out", "run", "--dataset", "store", "--init-checkpoint", "parent.safetensors",
                 "--steps", "4", "--quiet"]) == 0, capsys.readouterr().err
    assert "steps: 4" in capsys.readouterr().out


def _legacy_run(workdir: Path, out: str = "ft3") -> Path:
    """A run folder as written before the fix: its places recorded as typed (relative)."""
    cancel_at(2, lambda **hooks: finetune("parent.safetensors", "store", out, **hooks, **FAST))
    run = workdir / out
    saved = _config(run)
    saved.update(dataset="store", init_checkpoint="parent.safetensors", out=out)
    (run / "train_config.json").write_text(json.dumps(saved))
    return run


def test_a_run_recorded_relative_resumes_from_another_directory(workdir, monkeypatch, capsys):
    run = _legacy_run(workdir)
    monkeypatch.chdir(workdir.parent)
    # the relative --out "ft3" was typed where the run folder's parent is: its places were typed there too
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert "steps: 4" in capsys.readouterr().out


def test_a_run_recorded_relative_in_an_unknown_directory_says_what_to_do(workdir, monkeypatch, capsys):
    run = _legacy_run(workdir)
    saved = _config(run)
    saved["out"] = "somewhere/else"  # the directory the places were typed in cannot be told from it
    (run / "train_config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(workdir.parent)
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "recorded relative" in err and "directory the run was started in" in err, err
    assert "--cases" in err, err
    # the same folder and parent given with their places (typed relative to this directory): accepted
    assert main(["finetune", "--resume", "--out", str(run), "--cases", "x/store", "--checkpoint",
                 "x/parent.safetensors", "--quiet"]) == 0, capsys.readouterr().err
    assert "steps: 4" in capsys.readouterr().out
    # and recorded absolute, so --out alone is enough from now on
    assert _config(run)["dataset"] == str((workdir / "store").resolve())
