"""`mambahome info CHECKPOINT`: the checkpoint as the command's argument.

Before: `mambahome info run1/best.safetensors` failed with "unrecognized arguments"; only
`--checkpoint run1/best.safetensors` worked.
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
