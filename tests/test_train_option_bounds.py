"""Absurd --num-workers, --pos/--neg and --seed are refused up front, with one line and no run folder.

Reproductions (before the fix), each on any dataset:
- ``mambahome train ... --num-workers -2``: refused only after preprocessing, leaving ``run/`` with
  train_config.json and split.json behind;
- ``mambahome train ... --pos -1``: a MONAI ValueError traceback, and the same half-made folder;
- ``mambahome train ... --seed -1``: a numpy traceback ("expected non-negative integer").
"""
import pytest

from engine.cli import main
from engine.train.config import TrainConfig


@pytest.mark.parametrize("kwargs, words", [
    ({"num_workers": -2}, "num_workers"),
    ({"pos": -1.0}, "pos and neg"),
    ({"pos": 0.0, "neg": 0.0}, "pos and neg"),
    ({"seed": -1}, "seed"),
    ({"seed": 2 ** 32}, "seed"),
])
def test_config_refuses(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(dataset=str(tmp_path / "d"), out=str(tmp_path / "r"), **kwargs)


def test_config_accepts_edges(tmp_path):
    TrainConfig(dataset=str(tmp_path / "d"), out=str(tmp_path / "r"), num_workers=0, pos=0.0, neg=1.0,
                seed=2 ** 32 - 1)


@pytest.mark.parametrize("option", [["--num-workers", "-2"], ["--pos", "-1"], ["--seed", "-1"]])
def test_cli_leaves_no_run_folder(tmp_path, capsys, option):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["synth", "--out", str(data), "--cases", "2", "--shape", "16", "16", "16"]) == 0
    code = main(["train", "--dataset", str(data), "--out", str(run), "--preset", "tiny", "--steps", "1",
                 "--patch-size", "16", "16", "16", "--device", "cpu", "--quiet", *option])
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not run.exists()
