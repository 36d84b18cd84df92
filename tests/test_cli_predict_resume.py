"""`mambahome predict` over a folder, stopped by Ctrl-C and run again.

Before: after Ctrl-C the command said only "interrupted", and the same command run again refused to start
because the finished outputs existed, while --overwrite segmented every scan again. Now the interruption
says what was kept, and --skip-existing finishes the folder without touching the finished outputs.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from engine.cli import main
from engine.inference import Predictor, predict_paths

CLASSES = ["background", "a", "b"]


def _metadata():
    from engine.preprocess import Preprocessing

    return {"class_names": CLASSES, "modality": "CT", "patch_size": [32, 32, 32],
            "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()}


@pytest.fixture
def folder(tmp_path, tmp_volume):
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"):
        (src / name).write_bytes(tmp_volume[0].read_bytes())
    return src


@pytest.fixture
def checkpoint(tmp_path):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, build_network("mambahome", 1, 3, "tiny"), _metadata())
    return path


class _InterruptedAt(Predictor):
    """Raises KeyboardInterrupt (what SIGINT raises in Python) when the n-th file is being segmented."""

    def __init__(self, model, n):
        super().__init__(model, device="cpu")
        self.n, self.calls = n, 0

    def predict(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().predict(*args, **kwargs)


def test_ctrl_c_keeps_finished_outputs_and_skip_existing_finishes_the_rest(tmp_path, folder):
    from engine.networks import build_network

    torch.manual_seed(0)
    model = (build_network("mambahome", 1, 3, "tiny"), _metadata())
    out = tmp_path / "labels"
    logs = []
    with pytest.raises(KeyboardInterrupt):
        predict_paths(_InterruptedAt(model, 3), folder, out, log=logs.append)
    # the two finished files are whole, the third was never written, and no temporary file is left
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    for p in out.iterdir():
        assert nib.load(str(p)).shape == nib.load(str(folder / p.name)).shape
    note = [m for m in logs if "interrupted" in m]
    assert len(note) == 1 and "2 of 4" in note[0] and "--skip-existing" in note[0]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}

    # the plain rerun still refuses (nothing is replaced silently) and names the way forward
    with pytest.raises(ValueError, match="--skip-existing"):
        predict_paths(Predictor(model, device="cpu"), folder, out, log=lambda m: None)

    counting = _InterruptedAt(model, n=0)  # never interrupts; counts the files it segments
    logs = []
    results = predict_paths(counting, folder, out, log=logs.append, skip_existing=True)
    assert [p.name for p, _ in results] == ["c.nii.gz", "d.nii.gz"]
    assert counting.calls == 2
    assert any("2 of 4 outputs exist and are kept" in m for m in logs)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.name in before} == before


def test_skip_existing_does_not_take_a_half_set_of_outputs(tmp_path, folder):
    """With --probabilities an input counts as done only when both its files exist."""
    from engine.networks import build_network

    model = (build_network("mambahome", 1, 3, "tiny"), _metadata())
    out = tmp_path / "labels"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"an earlier label map")
    with pytest.raises(ValueError, match="exist already"):
        predict_paths(Predictor(model, device="cpu"), folder, out, probabilities=True, skip_existing=True,
                      log=lambda m: None)
    assert (out / "a.nii.gz").read_bytes() == b"an earlier label map"


def test_cli_skip_existing_and_its_conflict_with_overwrite(tmp_path, folder, checkpoint, capsys):
    out = tmp_path / "labels"
    out.mkdir()
    kept = out / "b.nii.gz"
    kept.write_bytes(b"finished earlier")
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
            "--device", "cpu", "--quiet"]
    assert main(args) == 2
    assert "--skip-existing" in capsys.readouterr().err
    assert main(args + ["--skip-existing", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(args + ["--skip-existing"]) == 0
    assert kept.read_bytes() == b"finished earlier"
    for name in ("a.nii.gz", "c.nii.gz", "d.nii.gz"):
        written = nib.load(str(out / name))
        np.testing.assert_allclose(written.affine, nib.load(str(folder / name)).affine, atol=1e-5)
