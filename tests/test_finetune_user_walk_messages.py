"""The "learn from corrections" loop walked as a user does, from the command line: what it said, and did not say.

- A store whose validation cases hold no labelled voxel: the run printed "best validation Dice: n/a" and handed on
  ``last`` without a word. The result (``RunResult.no_score_reason``) and the printed line now say why.
- A store of one case at the default --val-fraction: no validation split; the end line now says so too (a warning
  at the start already did, once).
- A run's ``resume.safetensors`` given as ``--checkpoint`` (finetune, predict): refused as "not a napari-mambahome
  checkpoint (format='napari-mambahome-resume/1')". It is now named as the run's resume state, with the command
  that continues the run and the checkpoints to predict with.
- The parent checkpoint moved between a cancel and ``finetune --resume --out RUN``: the resume read it from its
  recorded place and stopped at "checkpoint not found", and ``--checkpoint NEW`` was refused as "different
  settings". The message now names the missing file and says to give its new place; the same file (SHA-256) there
  continues the run exactly, another file is refused (in its old place too).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.cases import CaseStore
from engine.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_metadata
from engine.cli import main
from engine.io import Volume
from engine.networks import build_network
from engine.train.finetune import finetune
from engine.train.resume import save_resume_state
from train_support import cancel_at, four_phantoms, tiny_parent

FAST = dict(patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=3, seed=3, val_fraction=0.25, steps=6,
            num_workers=0)
NAMES = ["background", "organ"]
QUICK = ["--steps", "2", "--val-every", "2", "--patch-size", "32", "32", "32", "--batch-size", "1",
         "--device", "cpu", "--num-workers", "0", "--quiet"]


def _parent(path: Path, names) -> Path:
    return tiny_parent(path, names)


def _store(root: Path, labelled) -> Path:
    """A case store of ``len(labelled)`` cases ``c0, c1...``; case i has a labelled cube when ``labelled[i]``."""
    store = CaseStore(root)
    rng = np.random.default_rng(0)
    for i, has in enumerate(labelled):
        labels = np.zeros((32, 32, 24), np.uint8)
        if has:
            labels[10:20, 10:20, 8:16] = 1
        image = Volume(data=(rng.normal(size=labels.shape) * 100).astype(np.float32),
                       affine=np.diag([1.5, 1.5, 2.0, 1.0]), spacing=(1.5, 1.5, 2.0))
        store.add(image, labels, modality="CT", class_names=NAMES, case_id=f"c{i}")
    return root


@pytest.fixture(scope="module")
def small_parent(tmp_path_factory) -> Path:
    return _parent(tmp_path_factory.mktemp("parent") / "parent.safetensors", NAMES)


def test_validation_cases_without_labels_say_why_there_is_no_score(small_parent, tmp_path, capsys):
    # 3 cases at the default --val-fraction 0.2 and seed 0: one validation case, which split_cases picks thus
    val = int(np.random.default_rng(0).permutation(3)[0])
    store = _store(tmp_path / "cases", [i != val for i in range(3)])
    run = tmp_path / "run"
    assert main(["finetune", "--checkpoint", str(small_parent), "--cases", str(store), "--out", str(run)]
                + QUICK) == 0
    assert json.loads((run / "split.json").read_text())["val"] == [f"c{val}"]
    out = capsys.readouterr().out
    assert ("best validation Dice: n/a (no validation case holds a labelled voxel; the last checkpoint is used)"
            in out), out
    assert f"selected checkpoint: {run / 'last.safetensors'}" in out


def test_one_case_says_there_is_no_validation_split(small_parent, tmp_path, capsys, recwarn):
    store = _store(tmp_path / "cases", [True])
    run = tmp_path / "run"
    assert main(["finetune", "--checkpoint", str(small_parent), "--cases", str(store), "--out", str(run)]
                + QUICK) == 0
    captured = capsys.readouterr()
    assert "best validation Dice: n/a (1 case: no validation split; the last checkpoint is used)" in captured.out
    # the start's warning (the CLI prints it as "mambahome finetune: warning: ..."), once
    assert sum("leaves none for validation" in str(w.message) for w in recwarn) == 1
    result = finetune(small_parent, store, tmp_path / "api", steps=1, patch_size=[32, 32, 32], device="cpu",
                      num_workers=0)
    assert result.best_dice is None
    assert result.no_score_reason == "1 case: no validation split; the last checkpoint is used"


@pytest.fixture(scope="module")
def resume_file(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run7"
    run.mkdir()
    model = build_network("mambahome", 1, 2, "tiny")
    optimizer = torch.optim.AdamW(model.parameters())
    save_resume_state(run / "resume.safetensors", model, optimizer, {"step": 2, "history": []})
    return run / "resume.safetensors"


def test_resume_state_given_as_a_checkpoint_names_what_it_is(resume_file):
    from engine.checkpoint import save_checkpoint

    run = resume_file.parent
    for read in (load_checkpoint, read_checkpoint_metadata):
        with pytest.raises(CheckpointError) as caught:
            read(resume_file)
        msg = str(caught.value)
        assert "is a training run's resume state, not a model checkpoint" in msg, msg
        assert f"--resume --out {run}`" in msg and "format=" not in msg, msg
        # before its first validation the run has saved no model: none is named (it named files not there)
        assert "the run has saved no model yet" in msg and "best.safetensors" not in msg, msg
    last = save_checkpoint(run / "last.safetensors", build_network("mambahome", 1, 2, "tiny"), {})
    try:
        msg = str(pytest.raises(CheckpointError, read_checkpoint_metadata, resume_file).value)
        assert f"or give {last} to predict or fine-tune from" in msg and "best.safetensors" not in msg, msg
    finally:
        last.unlink()


def test_resume_state_given_to_finetune_and_predict(resume_file, tmp_path, capsys):
    run = resume_file.parent
    assert main(["finetune", "--checkpoint", str(resume_file), "--dataset", str(tmp_path), "--out",
                 str(tmp_path / "new"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"resume state, not a model checkpoint: continue the run with `--resume --out {run}`" in err, err
    assert not (tmp_path / "new").exists()
    assert main(["predict", "--checkpoint", str(resume_file), "--input", str(tmp_path / "x.nii.gz"), "--output",
                 str(tmp_path / "y.nii.gz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--resume --out {run}`" in err and "the run has saved no model yet" in err, err


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return four_phantoms(tmp_path_factory)


def test_resume_after_the_parent_moved(phantoms, tmp_path, capsys):
    names = list(json.loads((phantoms / "dataset.json").read_text())["labels"])
    old = _parent(tmp_path / "models" / "parent.safetensors", names)
    whole = finetune(old, phantoms, tmp_path / "whole", **FAST)
    run = tmp_path / "run"
    cancel_at(2, lambda **hooks: finetune(old, phantoms, run, **hooks, **FAST))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    new = tmp_path / "elsewhere" / "parent-moved.safetensors"
    new.parent.mkdir()
    old.rename(new)
    # --out alone: the message names the missing parent and how to give its new place
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the run's parent checkpoint {old} (train_config.json) is not found" in err, err
    assert "resume with --checkpoint and its new place" in err, err
    # another model there (another SHA-256) is refused, and so is one put in the old place; nothing changes
    other = _parent(tmp_path / "other.safetensors", names[::-1])
    assert main(["finetune", "--resume", "--out", str(run), "--checkpoint", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{other} is not the run's parent checkpoint: its SHA-256 is" in err, err
    shutil.copy(other, old)
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 2
    assert f"{old} is not the run's parent checkpoint" in capsys.readouterr().err
    old.unlink()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # the same file in its new place: the run continues exactly where it stopped
    assert main(["finetune", "--resume", "--out", str(run), "--checkpoint", str(new), "--quiet"]) == 0
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    assert read_checkpoint_metadata(run / "last.safetensors")["parent"]["path"] == str(new.resolve())
