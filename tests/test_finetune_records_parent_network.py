"""A fine-tuning run's settings name the network it really builds, its parent's: the bundled default model is
``tiny``, yet its fine-tunes recorded ``preset: small`` (the default) in train_config.json and the checkpoint; a
DynUNet parent was recorded as ``mambahome`` (and the compile decision read that)."""
from __future__ import annotations

import pytest

from engine.checkpoint import read_checkpoint_metadata
from engine.config import ModelConfig
from engine.train.finetune import finetune_config
from napari_mambahome._models import BUNDLED_MODEL


@pytest.mark.parametrize("name", ["paper", "small", "tiny"])
def test_every_preset_is_recognised_from_its_saved_config_whatever_its_channels_and_classes(name):
    saved = ModelConfig.preset(name, in_channels=3, num_classes=7, deep_supervision=2).to_dict()
    assert ModelConfig.preset_of(saved) == name


def test_another_size_is_no_preset():
    assert ModelConfig.preset_of(ModelConfig.preset("tiny", hidden_size=96).to_dict()) is None


def test_a_fine_tune_of_the_bundled_tiny_model_records_tiny(tmp_path):
    meta = read_checkpoint_metadata(BUNDLED_MODEL)
    assert ModelConfig.preset_of(meta["network"]["config"]) == "tiny"
    cfg = finetune_config(BUNDLED_MODEL, tmp_path / "data", tmp_path / "run", meta)
    assert (cfg.network, cfg.preset) == ("mambahome", "tiny")


def test_a_fine_tune_of_another_network_records_that_network(tmp_path):
    meta = {"network": {"name": "dynunet", "config": {}}, "task": {"name": "segmentation"}}
    cfg = finetune_config(tmp_path / "parent.safetensors", tmp_path / "data", tmp_path / "run", meta)
    assert cfg.network == "dynunet"
