"""A new run's --out that holds model files no run wrote (a user's best.safetensors kept there): ``train`` took them
for a run stopped before its first resume state, "started it over" and overwrote the user's model without a word.
And --override values a network cannot take failed after every case was preprocessed, a MONAI network's with a
TypeError traceback."""
from __future__ import annotations

import pytest

from engine.train.config import TrainConfig
from engine.train.run_folder import RunFolderError, prepare_run_folder


def test_model_files_no_run_wrote_are_not_overwritten(tmp_path):
    folder = tmp_path / "mymodels"
    folder.mkdir()
    (folder / "best.safetensors").write_bytes(b"a model of mine")
    (folder / "notes.txt").write_text("notes")
    with pytest.raises(RunFolderError, match=r"holds best.safetensors but no training run.*choose a new --out"):
        prepare_run_folder(folder, resume=False, finished=False)
    assert (folder / "best.safetensors").read_bytes() == b"a model of mine"


def test_a_run_stopped_before_its_first_resume_state_still_starts_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "last.safetensors").write_bytes(b"first steps")
    (folder / "train_config.json").write_text("{}")  # a run writes its settings before any checkpoint
    with pytest.warns(UserWarning, match="starting it over"):
        assert prepare_run_folder(folder, resume=False, finished=False) is False


@pytest.mark.parametrize("network, overrides, match", [
    ("dynunet", {"drop_path": 0.2}, r"--override drop_path: dynunet has no such argument.*takes .*kernel_size"),
    ("segresnet", {"use_home": False}, r"--override use_home: segresnet has no such argument"),
    ("mambahome", {"drop_path": "abc"}, "drop_path must be a number"),
    ("mambahome", {"bogus": 1}, "unknown ModelConfig fields"),
])
def test_overrides_a_network_cannot_take_are_refused_before_any_case_is_read(tmp_path, network, overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(dataset=str(tmp_path / "not-read"), out=str(tmp_path / "run"), network=network,
                    network_overrides=overrides)
    assert not (tmp_path / "run").exists()
