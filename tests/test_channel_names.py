"""The input channels' names in the checkpoint: ``mambahome info`` and predict say which file is which channel.

Before: a model trained on a 2-channel dataset (dataset.json ``channel_names`` {"0": "T1", "1": "T2"}) recorded
only its channel count, so neither ``info`` nor predict's wrong-channel-count message could say that ``_0000`` must
be the T1 and ``_0001`` the T2. Now the names travel in the JSON metadata; older checkpoints without them still
load; a fine-tune keeps the parent's names, refuses the parent's channels in another order and warns about names
that merely differ.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from engine.cli import main
from engine.inference import PredictionError, Predictor
from engine.io import load_volume
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.synth import write_phantom_dataset
from engine.train.config import TrainConfig
from engine.train.finetune import finetune
from engine.train.loop import train

FAST = dict(patch_size=[32, 32, 32], batch_size=1, device="cpu", val_every=1, seed=3, val_fraction=0.25, steps=1,
            num_workers=0)


def _two_channels(src: Path, dst: Path, names) -> Path:
    """``src`` (a 1-channel phantom dataset) with a second channel (the first, inverted) named ``names``."""
    shutil.copytree(src, dst)
    for first in sorted((dst / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(first, first.with_name(first.name.replace("_0000", "_0001")))
    meta = json.loads((dst / "dataset.json").read_text())
    meta["channel_names"] = {str(i): n for i, n in enumerate(names)}
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=3,
                                 shape=(32, 32, 24), seed=11, modality="MR")


@pytest.fixture(scope="module")
def t1_t2(phantoms, tmp_path_factory) -> Path:
    return _two_channels(phantoms, tmp_path_factory.mktemp("data2") / "Dataset002_T1T2", ["T1", "T2"])


@pytest.fixture(scope="module")
def trained(t1_t2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    return Path(train(TrainConfig(dataset=str(t1_t2), out=str(out), preset="tiny", **FAST)).last_checkpoint)


def test_channel_names_recorded_shown_by_info_and_named_by_predict(trained, phantoms, capsys):
    assert read_checkpoint_metadata(trained)["channel_names"] == ["T1", "T2"]
    assert main(["info", str(trained)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_channels"] == {"count": 2, "names": ["T1", "T2"], "files": "_0000 = T1, _0001 = T2"}
    one = load_volume(sorted((phantoms / "imagesTr").glob("*_0000.nii.gz"))[0])
    with pytest.raises(PredictionError, match=r"nnU-Net's layout: _0000 = T1, _0001 = T2\)"):
        Predictor(trained, device="cpu").predict(one)


def test_checkpoint_without_channel_names_still_loads(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "old.safetensors"
    pp = Preprocessing.for_modality("MR", target_spacing=(1.5, 1.5, 2.0))
    save_checkpoint(path, build_network("mambahome", 2, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "MR", "preprocessing": pp.to_dict(),
                     "patch_size": [32, 32, 32]})
    _, meta = load_checkpoint(path)
    assert "channel_names" not in meta
    assert main(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["input_channels"] == {"count": 2, "names": None, "files": None}
    predictor = Predictor(path, device="cpu")
    assert predictor.channel_names == []


def test_finetune_keeps_parent_names_refuses_another_order_warns_other_names(trained, phantoms, tmp_path):
    swapped = _two_channels(phantoms, tmp_path / "Dataset003_T2T1", ["T2", "t1"])
    with pytest.raises(ValueError, match=r"names its channels _0000 = T2, _0001 = t1 but checkpoint .* was trained on "
                                         r"_0000 = T1, _0001 = T2"):
        finetune(trained, swapped, tmp_path / "swapped", **FAST)
    assert not (tmp_path / "swapped" / "last.safetensors").exists()
    renamed = _two_channels(phantoms, tmp_path / "Dataset004_T1wT2w", ["T1w", "T2w"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(trained, renamed, tmp_path / "renamed", **FAST)
    assert any("keeps the parent's names" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert read_checkpoint_metadata(result.last_checkpoint)["channel_names"] == ["T1", "T2"]


def test_finetune_of_a_parent_without_names_takes_the_dataset_names(t1_t2, tmp_path):
    torch.manual_seed(0)
    names = list(json.loads((t1_t2 / "dataset.json").read_text())["labels"])
    parent = tmp_path / "old.safetensors"
    pp = Preprocessing.for_modality("MR", target_spacing=(1.5, 1.5, 2.0))
    save_checkpoint(parent, build_network("mambahome", 2, len(names), "tiny"),
                    {"class_names": names, "modality": "MR", "preprocessing": pp.to_dict(), "patch_size": [32] * 3,
                     "version": "old", "parent": None, "cases": []})
    result = finetune(parent, t1_t2, tmp_path / "ft", **FAST)
    assert read_checkpoint_metadata(result.last_checkpoint)["channel_names"] == ["T1", "T2"]
