"""The "learn from corrections" loop walked as a user does, from the command line: what broke.

- ``--out`` naming a file: the run loaded the parent, read and preprocessed every case and built the network, then
  failed with a bare "<path>: File exists". It is now refused first, saying it is a file.
- A case whose image has NaN voxels: ``CaseStore.add`` (napari's Save case) saved it, and then every fine-tune on the
  store was refused for that case. It is now refused when saved, and the store stays as it was.
- A case store moved to another folder between a cancelled fine-tune and its resume: ``--resume --out R`` said only
  "<old folder>: dataset folder not found", and ``--resume --out R --cases NEW`` was refused as "different settings
  (dataset: OLD -> NEW)", so the run could never be continued. A data folder whose old place is gone may now be given
  anew (the run's split cases must be in it), and the resume continues exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from engine.cases import CaseStore, CaseStoreError
from engine.cli import main
from engine.io import Volume
from engine.train.finetune import finetune
from engine.train.run_folder import RunFolderError, prepare_run_folder
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


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(RunFolderError, match="is a file, not a run folder"):
        prepare_run_folder(out, resume=False)
    assert out.read_text() == "mine"


def test_out_that_is_a_file_cli_names_it(parent, phantoms, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["finetune", "--checkpoint", str(parent), "--dataset", str(phantoms), "--out", str(out),
                 "--steps", "2", "--patch-size", "32", "32", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: is a file, not a run folder" in err, err
    assert out.read_text() == "mine"


def test_case_with_nan_voxels_is_refused_when_saved(tmp_path):
    store = CaseStore(tmp_path / "cases")
    data = np.zeros((8, 9, 10), np.float32)
    labels = np.zeros(data.shape, np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    store.add(Volume(data=data.copy(), affine=np.eye(4), spacing=(1.0, 1.0, 1.0)), labels, modality="MR",
              class_names=["background", "cord"], case_id="good")
    data[1, 1, 1:4] = np.nan
    with pytest.raises(CaseStoreError, match=r"scan7\.nii\.gz: 3 of 720 voxels are NaN or infinite"):
        store.add(Volume(data=data, affine=np.eye(4), spacing=(1.0, 1.0, 1.0)), labels, modality="MR",
                  class_names=["background", "cord"], source_file="/data/scan7.nii.gz")
    assert store.ids() == ["good"]
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == ["good"]


def test_resume_after_the_data_folder_moved(parent, phantoms, tmp_path, capsys):
    whole = finetune(parent, phantoms, tmp_path / "whole", **FAST)
    old, new = tmp_path / "cases_here", tmp_path / "moved" / "cases_there"
    shutil.copytree(phantoms, old)
    run = tmp_path / "run"
    cancel_at(2, lambda **hooks: finetune(parent, old, run, **hooks, **FAST))
    assert (run / "resume.safetensors").is_file()
    new.parent.mkdir()
    old.rename(new)
    # --out alone: the old place is gone; the message says how to go on
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the run's data folder {old}" in err and "if it was moved, resume with --cases" in err, err
    assert (run / "resume.safetensors").is_file()
    # the new place given: the run continues exactly where it stopped
    assert main(["finetune", "--resume", "--out", str(run), "--dataset", str(new), "--quiet"]) == 0
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_resume_on_another_existing_data_folder_is_still_refused(parent, phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    cancel_at(2, lambda **hooks: finetune(parent, phantoms, run, **hooks, **FAST))
    other = tmp_path / "other"
    shutil.copytree(phantoms, other)
    assert main(["finetune", "--resume", "--out", str(run), "--dataset", str(other), "--quiet"]) == 2
    assert "cannot resume with different settings (dataset:" in capsys.readouterr().err


def test_a_resume_from_new_places_records_them_for_the_next_resume(parent, phantoms, tmp_path, capsys):
    """Moved data folder and parent, resumed once from their new places and stopped again: the next
    ``--resume --out R`` alone finds them (train_config.json kept the old places, so it stopped at "not found")."""
    # 9 steps: a cancel is taken at the next validation (every 3 steps), so the second stop (asked at 4) is at 6,
    # before the end
    fast = dict(FAST, steps=9)
    whole = finetune(parent, phantoms, tmp_path / "whole", **fast)
    old, new = tmp_path / "cases_here", tmp_path / "moved" / "cases_there"
    old_parent, new_parent = tmp_path / "parent_here.safetensors", tmp_path / "moved" / "parent_there.safetensors"
    shutil.copytree(phantoms, old)
    shutil.copy(parent, old_parent)
    run = tmp_path / "run"
    cancel_at(2, lambda **hooks: finetune(old_parent, old, run, **hooks, **fast))
    new.parent.mkdir()
    old.rename(new)
    old_parent.rename(new_parent)
    cancel_at(4, lambda **hooks: finetune(new_parent, new, run, resume=True, **hooks, **fast))
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["dataset"], saved["init_checkpoint"]) == (str(new), str(new_parent))
    assert json.loads((run / "split.json").read_text())["dataset"] == str(new)
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_a_run_stopped_at_its_last_step_keeps_its_model_on_resume(parent, phantoms, tmp_path):
    """A stop asked at step 4 of a 6-step run is taken at the step-6 validation boundary, before the final checkpoint:
    the resume then trained nothing, wrote no checkpoint and removed the resume state (the model was lost)."""
    whole = finetune(parent, phantoms, tmp_path / "whole", **FAST)
    run = tmp_path / "run"
    cancel_at(2, lambda **hooks: finetune(parent, phantoms, run, **hooks, **FAST))
    cancel_at(4, lambda **hooks: finetune(parent, phantoms, run, resume=True, **hooks, **FAST))
    assert not (run / "last.safetensors").exists()
    assert main(["finetune", "--resume", "--out", str(run), "--quiet"]) == 0
    resumed, uninterrupted = load_file(str(run / "last.safetensors")), load_file(str(whole.last_checkpoint))
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    assert (run / "best.safetensors").is_file()
