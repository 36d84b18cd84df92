"""`mambahome evaluate --classes` given foreground names only, as `mambahome dataset --classes` takes them.

Before: `--classes anterior posterior` made 'anterior' the background and every case failed with
"prediction has label values [2] outside 0..1", with no hint that background must come first.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np

from engine.cli import main


def _folders(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    label = np.zeros((12, 10, 8), dtype=np.uint8)
    label[2:6, 2:6, 2:6] = 1
    label[7:10, 5:9, 3:7] = 2
    for folder in (pred, truth):
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / "case1.nii.gz"))
    return pred, truth


def test_foreground_only_names_get_a_note_that_says_how_to_fix_them(tmp_path, capsys):
    pred, truth = _folders(tmp_path)
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "r.json"),
                 "--classes", "anterior", "posterior"])
    err = capsys.readouterr().err
    assert code == 2  # still refused: the names do not cover value 2 (the only case: nothing scored)
    assert "0 = 'anterior', 1 = 'posterior'" in err
    assert "--classes background anterior posterior" in err


def test_names_with_background_first_score_without_a_note(tmp_path, capsys):
    pred, truth = _folders(tmp_path)
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(tmp_path / "r.json"),
                 "--classes", "background", "anterior", "posterior"])
    captured = capsys.readouterr()
    assert code == 0 and "note:" not in captured.err
    assert "anterior" in captured.out and "mean foreground Dice: 1.0000" in captured.out
