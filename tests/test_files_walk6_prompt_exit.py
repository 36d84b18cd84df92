"""``mambahome prompt --worklist`` exits as ``predict`` does (files walk 6): 1 when it finished with some images
skipped (the others written), 2 when every image failed and nothing was written; it exited 1 for both, which reads as
"done, some left out" for a run that produced nothing."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.cli import build_parser, main

INTERACTIVE = Path(__file__).resolve().parents[1] / "napari_mambahome" / "models" / "interactive.safetensors"
pytestmark = pytest.mark.skipif(not INTERACTIVE.is_file(), reason="bundled interactive model not present")


def _no_network(session, volume, prompts, world=False, where=None):
    """A one-voxel mask: the exit code, not the network, is under test."""
    mask = np.zeros(volume.shape, bool)
    mask[3, 4, 5] = True
    return mask


def _scan(path: Path) -> Path:
    data = np.random.default_rng(0).normal(100.0, 20.0, (20, 18, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _run(tmp_path: Path, rows: str) -> int:
    worklist = tmp_path / "list.csv"
    worklist.write_text("image,label,prompt\n" + rows)
    return main(["prompt", "--checkpoint", str(INTERACTIVE), "--worklist", str(worklist), "--output-dir",
                 str(tmp_path / "masks"), "--device", "cpu", "--quiet"])


def test_every_image_failed_exits_2_as_predict(tmp_path, monkeypatch, capsys):
    from engine.interactive import command

    monkeypatch.setattr(command, "apply_prompts", _no_network)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a scan at all")
    code = _run(tmp_path, "missing.nii.gz,1,point 1 1 1\nbroken.nii.gz,1,point 2 2 2\n")
    out = capsys.readouterr().out
    assert code == 2
    assert "0 label map(s)" in out and "2 image(s) failed" in out
    assert "missing.nii.gz" in out and "broken.nii.gz" in out
    assert not (tmp_path / "masks").exists() or not any((tmp_path / "masks").iterdir())


def test_some_images_failed_still_exits_1(tmp_path, monkeypatch, capsys):
    from engine.interactive import command

    monkeypatch.setattr(command, "apply_prompts", _no_network)
    _scan(tmp_path / "good.nii.gz")
    code = _run(tmp_path, "good.nii.gz,1,point 3 4 5\nmissing.nii.gz,1,point 1 1 1\n")
    out = capsys.readouterr().out
    assert code == 1
    assert (tmp_path / "masks" / "good.nii.gz").is_file() and "1 image(s) failed" in out


def test_all_written_exits_0(tmp_path, monkeypatch, capsys):
    from engine.interactive import command

    monkeypatch.setattr(command, "apply_prompts", _no_network)
    _scan(tmp_path / "good.nii.gz")
    assert _run(tmp_path, "good.nii.gz,1,point 3 4 5\n") == 0


def test_the_help_states_the_rule():
    text = build_parser().format_help()
    assert "every input was skipped" in " ".join(text.split())
