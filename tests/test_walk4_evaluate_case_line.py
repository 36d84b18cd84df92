"""``mambahome evaluate``'s line per case said "mean Dice 0.9922" for a wholly wrong 0/255 mask (each unused value
2..254 scored "both empty", Dice 1) while its own report and table said 0.0000: the line was written before the values
no file holds were dropped. Now each case's line is its report entry."""
from __future__ import annotations

import re

import nibabel as nib
import numpy as np

from engine.evaluation import evaluate_folders


def _save(path, array):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])), str(path))


def test_the_case_line_matches_the_report_for_a_0_255_mask(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir(), truth.mkdir()
    t = np.zeros((24, 24, 12), np.uint8)
    t[8:16, 8:16, 4:8] = 1
    p = np.zeros_like(t)
    p[0:4, 0:4, 0:3] = 255  # a wrong place, and 255 for foreground as many tools write it
    _save(truth / "case1.nii.gz", t)
    _save(pred / "case1.nii.gz", p)
    t2 = t.copy()
    _save(truth / "case2.nii.gz", t2)
    _save(pred / "case2.nii.gz", t2 * 255)  # the right place under value 255: the truth has no 255, so a miss too
    lines = []
    result = evaluate_folders(pred, truth, out=tmp_path / "report.json", log=lines.append)
    said = {m.group(1): float(m.group(2)) for line in lines
            if (m := re.match(r"(case\d): mean Dice ([0-9.]+)", line))}
    assert set(said) == {"case1", "case2"}
    for case, entry in result["cases"].items():
        assert said[case] == round(entry["mean_dice"], 4), (case, said[case], entry["mean_dice"])
    assert said["case1"] < 0.01  # the wrong mask reads as wrong in the log as in the report
