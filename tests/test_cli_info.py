"""`mambahome info --checkpoint` with options that describe a network to build.

Before: `info --checkpoint tiny.safetensors --preset paper --classes 14` printed the tiny checkpoint and
dropped the two options without a word.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"), {"class_names": ["background", "a", "b"]})
    return path


def test_network_options_with_a_checkpoint_are_refused(tiny_checkpoint, capsys):
    assert main(["info", "--checkpoint", str(tiny_checkpoint), "--preset", "paper", "--classes", "14"]) == 2
    captured = capsys.readouterr()
    assert "--preset, --classes describe a network to build" in captured.err and captured.out == ""


def test_checkpoint_alone_and_preset_alone_still_work(tiny_checkpoint, capsys):
    assert main(["info", "--checkpoint", str(tiny_checkpoint)]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["num_classes"] == 3
    assert main(["info", "--preset", "tiny", "--classes", "5", "--in-channels", "2"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["num_classes"], config["in_channels"], config["hidden_size"]) == (5, 2, 64)
    assert main(["info"]) == 0  # the documented defaults: paper, 2 classes, 1 channel
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["num_classes"], config["in_channels"], config["hidden_size"]) == (2, 1, 768)


# `mambahome info CHECKPOINT`: the checkpoint as the command's argument (it failed with "unrecognized arguments";
# only --checkpoint worked).
def test_positional_checkpoint_reads_it(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    positional = json.loads(capsys.readouterr().out)
    assert positional["config"]["num_classes"] == 3
    assert main(["info", "--checkpoint", str(tiny_checkpoint)]) == 0  # still works, same answer
    assert json.loads(capsys.readouterr().out) == positional


def test_positional_and_flag_together_are_refused(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--checkpoint", str(tiny_checkpoint)]) == 2
    captured = capsys.readouterr()
    assert "either as the argument" in captured.err and "not both" in captured.err and captured.out == ""


def test_positional_checkpoint_with_network_options_is_refused(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--preset", "paper"]) == 2
    captured = capsys.readouterr()
    assert "--preset describe a network to build" in captured.err and captured.out == ""
