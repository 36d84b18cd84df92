"""`mambahome evaluate --out` in a place the report cannot be written is refused before any case is scored.

Before, every case was read and scored (Dice and HD95 per class: minutes for a folder of CTs) and only then did the
report's write fail ("cannot write JSON file ...: the file system is mounted read-only", or "a part of the path is
a file"), so the whole measurement was lost; `predict` and `train` check their output first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine.evaluation as evaluation
from engine.cli import main
from engine.io import Volume, save_volume


def _pair(tmp_path: Path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    ref = Volume.from_array(np.zeros((8, 8, 8), np.float32), np.eye(4))
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    save_volume(pred / "a.nii.gz", label, ref)
    save_volume(truth / "a.nii.gz", label, ref)
    return pred, truth


def test_report_under_a_file_is_refused_before_scoring(tmp_path, monkeypatch, capsys):
    pred, truth = _pair(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")

    def must_not_score(*args, **kwargs):
        raise AssertionError("cases were scored before the report's place was checked")

    monkeypatch.setattr(evaluation, "evaluate_folders", must_not_score)
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(blocker / "report.json"),
                 "--classes", "background", "fg", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "report.json" in err and "not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_a_writable_report_folder_still_scores(tmp_path, capsys):
    pred, truth = _pair(tmp_path)
    out = tmp_path / "new" / "folder" / "report.json"
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out),
                 "--classes", "background", "fg", "--quiet"])
    assert code == 0
    assert out.is_file() and out.with_suffix(".csv").is_file()
