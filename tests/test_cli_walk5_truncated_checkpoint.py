"""A checkpoint cut short (an interrupted copy or download) given to ``evaluate-interactive`` or ``prompt`` (CLI walk 5).

Both commands read only the checkpoint's header first, to refuse an automatic model before any work; on a file cut
anywhere after its first bytes that read stopped with the safetensors library's own words ("is not a readable
safetensors checkpoint (Error while deserializing header: incomplete metadata, file not fully covered)"), while
``mambahome info`` and ``finetune`` on the same file said what happened: the weights are cut short, the file may be
truncated. Now the header read says the same, with what to do, and nothing is written.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.checkpoint import CheckpointError, read_checkpoint_metadata
from engine.cli import main

BUNDLED = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"


@pytest.fixture()
def truncated(tmp_path) -> Path:
    path = tmp_path / "interactive.safetensors"
    path.write_bytes(BUNDLED.read_bytes()[:100_000])  # header whole, weights cut
    return path


def test_header_read_of_a_truncated_checkpoint_says_truncated(truncated):
    with pytest.raises(CheckpointError, match="may be truncated") as info:
        read_checkpoint_metadata(truncated)
    message = str(info.value)
    assert str(truncated) in message and "again" in message and "deserializing" not in message


def test_evaluate_interactive_on_a_truncated_checkpoint(truncated, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate-interactive", "--checkpoint", str(truncated), "--dataset", str(tmp_path / "ds"),
                 "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "may be truncated" in err and str(truncated) in err and err.count("\n") == 1
    assert not out.exists()


def test_prompt_on_a_truncated_checkpoint(truncated, tmp_path, capsys):
    output = tmp_path / "mask.nii.gz"
    assert main(["prompt", "--checkpoint", str(truncated), "--input", str(tmp_path / "scan.nii.gz"),
                 "--output", str(output), "--point", "1", "1", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "may be truncated" in err and err.count("\n") == 1
    assert not output.exists()
