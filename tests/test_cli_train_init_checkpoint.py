"""`mambahome train --init-checkpoint` with architecture options the checkpoint contradicts.

Before: the network always came from the checkpoint and `--preset`, `--network`, `--target-spacing` and
`--override` were parsed and dropped without a word (`--init-checkpoint tiny.safetensors --preset small`
trained the tiny network, and train_config.json said "small"). Now a typed value that disagrees with the
checkpoint stops the command before anything is written; a value that agrees (what the bundled
scripts pass) and the defaults still run.
"""
from __future__ import annotations

import pytest
import torch

from engine.cli import build_parser, main
from engine.train.cli import architecture_conflicts, config_settings


@pytest.fixture
def tiny_parent(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "MR", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("MR", target_spacing=(1.0, 1.0, 1.5)).to_dict()})
    return path


@pytest.mark.parametrize("flags, named", [
    (["--preset", "small"], "--preset small (the checkpoint's: tiny)"),
    (["--preset", "paper"], "--preset paper (the checkpoint's: tiny)"),
    (["--network", "dynunet"], "--network dynunet (the checkpoint's: mambahome)"),
    (["--target-spacing", "2", "2", "2"], "--target-spacing 2.0 2.0 2.0 (the checkpoint's: 1.0 1.0 1.5)"),
    (["--override", "hidden_size=32"], "--override hidden_size=32 (the checkpoint's: 64)"),
    (["--override", "no_such=1"], "--override no_such=1 (the checkpoint's: no such setting)"),
])
def test_contradicting_architecture_options_are_refused(tmp_path, tiny_parent, capsys, flags, named):
    run = tmp_path / "run"
    code = main(["train", "--dataset", str(tmp_path / "data"), "--out", str(run), "--init-checkpoint",
                 str(tiny_parent), "--steps", "1", "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and str(tiny_parent) in err
    assert not run.exists()  # refused before the run folder (or anything else) was made


def test_agreeing_options_and_defaults_pass(tiny_parent):
    assert architecture_conflicts(str(tiny_parent), {"network": "mambahome", "preset": "tiny",
                                                     "target_spacing": [1.0, 1.0, 1.5],
                                                     "network_overrides": {"hidden_size": 64}}) == []
    assert architecture_conflicts(str(tiny_parent), {}) == []


def test_untyped_architecture_options_keep_their_defaults():
    """`train` parses them as None to see what was typed; the config still gets the documented defaults."""
    args = build_parser().parse_args(["train", "--dataset", "d", "--out", "o"])
    settings = config_settings(args)
    assert (settings["network"], settings["preset"], settings["target_spacing"]) == ("mambahome", "small", None)
    args = build_parser().parse_args(["train", "--dataset", "d", "--out", "o", "--preset", "tiny"])
    assert config_settings(args)["preset"] == "tiny"
    assert "(default small)" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()
