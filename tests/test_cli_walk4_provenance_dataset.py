"""A trained checkpoint's ``provenance.dataset`` is the dataset's absolute (resolved) path.

Reproduction (before the fix): ``cd work && mambahome train --dataset ../data/Dataset001_Phantom --out run`` wrote
``"dataset": "../data/Dataset001_Phantom"`` into ``run/best.safetensors``: read from anywhere else (``mambahome
info``, the napari "trained on" line, a colleague given the file) it pointed nowhere, or at another folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.checkpoint import read_checkpoint_metadata
from engine.cli import main
from engine.synth import write_phantom_dataset


def test_train_records_the_resolved_dataset_path(tmp_path, monkeypatch):
    data = write_phantom_dataset(tmp_path / "data" / "Dataset001_Phantom", cases=4, shape=(32, 32, 24), seed=11)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    typed = os.path.join("..", "data", ".", "Dataset001_Phantom")
    code = main(["train", "--dataset", typed, "--out", "run", "--preset", "tiny", "--patch-size", "32", "32", "32",
                 "--steps", "1", "--device", "cpu", "--quiet", "--val-fraction", "0.25"])
    assert code == 0
    for name in ("best.safetensors", "last.safetensors"):
        provenance = read_checkpoint_metadata(work / "run" / name)["provenance"]
        assert provenance["dataset"] == str(data.resolve()), provenance["dataset"]
        assert Path(provenance["dataset"]).is_absolute()
        assert provenance["replay"] is None
