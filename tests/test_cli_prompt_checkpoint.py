"""`mambahome prompt` with a checkpoint that cannot prompt: refused before the scan is read.

Before: the scan was loaded and its "shape ..., modality ..." line printed, as if prompting had begun, and
only then the automatic checkpoint was refused.
"""
from __future__ import annotations

import torch

from engine.cli import main


def test_an_automatic_checkpoint_is_refused_before_the_scan_is_read(tmp_path, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network

    torch.manual_seed(0)
    ckpt = tmp_path / "auto.safetensors"
    save_checkpoint(ckpt, build_network("mambahome", 1, 3, "tiny"), {"class_names": ["background", "a", "b"]})
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not even a volume")  # reading it would fail with another message
    out = tmp_path / "mask.nii.gz"
    assert main(["prompt", "--checkpoint", str(ckpt), "--input", str(scan), "--output", str(out),
                 "--point", "1", "2", "3"]) == 2
    err = capsys.readouterr().err
    assert "is not an interactive model" in err and str(ckpt) in err
    assert "cannot read" not in err and "shape" not in err
    assert not out.exists()
