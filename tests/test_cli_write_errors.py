"""An output path whose folder part is a file.

Before: `mambahome predict --output notes.txt/seg.nii.gz` ended with "cannot write NIfTI volume
notes.txt/seg.nii.gz: File exists" (mkdir's EEXIST), which reads as if the output were already there.
"""
from __future__ import annotations

import errno

import pytest
import torch

from engine.cli import main
from engine.io import WriteError, atomic_write_all


def test_a_file_in_the_folder_part_is_named_as_such(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    with pytest.raises(WriteError) as info:
        atomic_write_all([(blocker / "deeper" / "seg.json", lambda tmp: open(tmp, "w").write("{}"))])
    assert info.value.errno == errno.ENOTDIR
    assert "a part of the path is a file, not a folder" in str(info.value)
    assert "File exists" not in str(info.value)
    assert blocker.read_text() == "keep me"


def test_predict_into_a_path_through_a_file(tmp_path, tmp_volume, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.networks import build_network
    from engine.preprocess import Preprocessing

    torch.manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, build_network("mambahome", 1, 3, "tiny"),
                    {"class_names": ["background", "a", "b"], "modality": "CT", "patch_size": [32, 32, 32],
                     "preprocessing": Preprocessing.for_modality("CT", target_spacing=(2.0, 2.0, 2.0)).to_dict()})
    blocker = tmp_path / "labels"
    blocker.write_text("not a folder")
    code = main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_volume[0]), "--output",
                 str(blocker / "seg.nii.gz"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot write NIfTI volume {blocker / 'seg.nii.gz'}: a part of the path is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


class _Counting:
    """Stands in for a Predictor: predict_paths must refuse the output folder before it calls this."""

    def __init__(self):
        self.calls = 0

    def predict_file(self, *args, **kwargs):
        self.calls += 1
        raise AssertionError("segmented although the output folder cannot be written")


def test_an_unwritable_output_folder_stops_predict_before_any_scan_is_segmented(tmp_path, tmp_volume,
                                                                                monkeypatch):
    """The write used to fail only after the network had run (minutes for a large CT, and after the first
    case of a folder)."""
    import os

    from engine.inference import predict_paths

    blocker = tmp_path / "labels"
    blocker.write_text("not a folder")
    predictor = _Counting()
    with pytest.raises(WriteError, match="a part of the path is a file, not a folder"):
        predict_paths(predictor, tmp_volume[0], blocker / "sub" / "seg.nii.gz", log=lambda m: None)
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    # root may write anywhere, so the test cannot chmod its way to EACCES: the folder answers "not writable"
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(out) else real_access(p, mode))
    with pytest.raises(WriteError) as info:
        predict_paths(predictor, tmp_volume[0], out / "new" / "seg.nii.gz", log=lambda m: None)
    assert info.value.errno == errno.EACCES
    assert str(info.value) == (f"cannot write NIfTI volume {out / 'new' / 'seg.nii.gz'}: permission denied (the "
                               "folder is not writable for this user)")
    assert predictor.calls == 0
    assert not (out / "new").exists()
