"""Reports a reviewer found misleading: `evaluate --out FOLDER`, `evaluate` with no case scored, and `train-eval` scored
on its own training cases.

Before:
- `evaluate --out evdir` with `evdir` an existing (empty) folder said "a report exists already and is kept"; with
  `--overwrite`, "cannot write file evdir: the path is a folder"; `--out evnew/` wrote a JSON file named `evnew` and
  `evnew.csv` (`evaluate-interactive --out` takes a folder, so the two are mixed up).
- `evaluate` with images given as predictions (every case "not scored") wrote a report of NaN rows, printed "mean
  foreground Dice: nan" and exited 1 ("finished, some inputs not scored"), where `predict` with every input skipped
  exits 2 and writes nothing.
- `train-eval --train D --test D` printed "mean Dice ... on 8 cases" as if held out, without a word.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

import engine.experiments as experiments
from engine.cli import main
from engine.datasets import DatasetError
from engine.synth import write_phantom_dataset
from test_walk3_evaluate_unwritable_out import _pair  # a one-case prediction and truth

TINY = ["--preset", "tiny", "--steps", "2", "--max-minutes", "5", "--device", "cpu", "--quiet"]


# ----------------------------------------------------------------------------- evaluate --out FOLDER
def _evaluate(pred: Path, truth: Path, out: str, *extra: str) -> int:
    return main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", out,
                 "--classes", "background", "fg", "--quiet", *extra])


def test_evaluate_out_an_existing_folder_writes_the_report_inside(tmp_path, capsys):
    pred, truth = _pair(tmp_path)
    folder = tmp_path / "evdir"
    folder.mkdir()
    assert _evaluate(pred, truth, str(folder)) == 0
    out = capsys.readouterr().out
    report = json.loads((folder / "evaluation.json").read_text())
    assert report["cases"]["a"]["classes"]["fg"]["dice"] == 1.0
    assert (folder / "evaluation.csv").read_text().startswith("case,class,dice")
    assert f"report: {folder / 'evaluation.json'} (table: {folder / 'evaluation.csv'})" in out
    assert not (tmp_path / "evdir.csv").exists()

    # the report inside is protected as a report file is: kept without --overwrite, replaced with it
    assert _evaluate(pred, truth, str(folder)) == 2
    err = capsys.readouterr().err
    assert "a report exists already and is kept" in err and str(folder / "evaluation.json") in err
    (folder / "evaluation.json").write_text("{}")
    assert _evaluate(pred, truth, str(folder), "--overwrite") == 0
    assert json.loads((folder / "evaluation.json").read_text())["cases"]


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "case.nrrd", "case.seg.nrrd", "case.mha", "case.MGZ"])
def test_evaluate_out_naming_a_volume_is_refused_even_with_overwrite(tmp_path, capsys, name):
    # `--out truth/a.nii.gz --overwrite` wrote the JSON report over the ground truth being scored (read-only or not)
    pred, truth = _pair(tmp_path)
    target = truth / name
    if name != "a.nii.gz":
        target.write_bytes(b"volume bytes")
    before = target.read_bytes()
    assert _evaluate(pred, truth, str(target), "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"--out {target}: names an image or label file, and the report is JSON" in err
    assert target.read_bytes() == before and not target.with_suffix(".csv").exists()


def test_evaluate_with_one_folder_as_predictions_and_truth_is_refused(tmp_path, capsys):
    # `--pred test/labs --truth test/labs` by mistake reported "mean foreground Dice: 1.0000" without a word
    pred, truth = _pair(tmp_path)
    assert _evaluate(truth, tmp_path / "truth" / ".", str(tmp_path / "ev.json")) == 2
    assert "--pred and --truth are the same folder" in capsys.readouterr().err
    assert not (tmp_path / "ev.json").exists()


def test_evaluate_out_a_name_ending_in_a_separator_is_a_folder_made_for_the_report(tmp_path, capsys):
    pred, truth = _pair(tmp_path)
    folder = tmp_path / "evnew"
    assert _evaluate(pred, truth, str(folder) + "/") == 0
    assert folder.is_dir() and (folder / "evaluation.json").is_file() and (folder / "evaluation.csv").is_file()
    assert not (tmp_path / "evnew.csv").exists()
    assert f"report: {folder / 'evaluation.json'}" in capsys.readouterr().out


def test_evaluate_out_a_file_path_is_still_the_report_file(tmp_path):
    pred, truth = _pair(tmp_path)
    out = tmp_path / "reports" / "r.json"
    assert _evaluate(pred, truth, str(out)) == 0
    assert out.is_file() and out.with_suffix(".csv").is_file()
    assert _evaluate(pred, truth, str(out)) == 2  # kept
    assert _evaluate(pred, truth, str(out), "--overwrite") == 0


def test_evaluate_out_under_a_file_is_still_refused(tmp_path, capsys):
    pred, truth = _pair(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    assert _evaluate(pred, truth, str(blocker) + "/") == 2
    assert "evaluation.json" in capsys.readouterr().err and blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------- evaluate: no case scored
def _images_as_predictions(shared_data: Path, tmp_path: Path, cases=("hippocampus_003", "hippocampus_004")):
    """Real MRI images (float voxels) given as predictions of their own ground truths."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    for case in cases:
        shutil.copy(shared_data / "hippocampus" / "imagesTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
        shutil.copy(shared_data / "hippocampus" / "labelsTr" / f"{case}.nii.gz", truth / f"{case}.nii.gz")
    return pred, truth


@pytest.mark.parametrize("quiet", [False, True], ids=["lines", "quiet"])
def test_evaluate_with_no_case_scored_exits_2_and_writes_no_report(shared_data, tmp_path, capsys, quiet):
    pred, truth = _images_as_predictions(shared_data, tmp_path)
    out = tmp_path / "report.json"
    code = main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out)]
                + (["--quiet"] if quiet else []))
    captured = capsys.readouterr()
    assert code == 2
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert "nan" not in captured.out and "mean foreground Dice" not in captured.out
    err = captured.err
    assert "mambahome evaluate: error:" in err
    assert "2 of 2 matched cases were not scored (hippocampus_003" in err and "no report was written" in err
    # why, for each case: the case lines (or, with --quiet, the error itself)
    assert err.count("is this an image rather than a label map?") == 2


def test_evaluate_one_file_that_cannot_be_scored_exits_2(shared_data, tmp_path, capsys):
    pred, truth = _images_as_predictions(shared_data, tmp_path, cases=("hippocampus_003",))
    out = tmp_path / "evdir"
    code = main(["evaluate", "--pred", str(pred / "hippocampus_003.nii.gz"),
                 "--truth", str(truth / "hippocampus_003.nii.gz"), "--out", str(out) + "/", "--quiet"])
    assert code == 2 and not out.exists()
    assert "no report was written" in capsys.readouterr().err


def test_evaluate_with_some_cases_scored_still_exits_1_with_a_report(shared_data, tmp_path, capsys):
    pred, truth = _images_as_predictions(shared_data, tmp_path)
    shutil.copy(truth / "hippocampus_004.nii.gz", pred / "hippocampus_004.nii.gz")  # one good prediction
    out = tmp_path / "report.json"
    assert main(["evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(out), "--quiet"]) == 1
    report = json.loads(out.read_text())
    assert list(report["cases"]) == ["hippocampus_004"] and list(report["failed"]) == ["hippocampus_003"]
    assert "not scored: hippocampus_003" in capsys.readouterr().out


# ----------------------------------------------------------------------------- train-eval on training cases
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Phantom", cases=2,
                                 shape=(32, 32, 32), seed=3)


def _renamed(source: Path, out: Path, prefix: str) -> Path:
    """A copy of a phantom dataset whose cases are named ``<prefix>_XXX``: the same images under other names."""
    shutil.copytree(source, out)
    for folder in ("imagesTr", "labelsTr"):
        for f in sorted((out / folder).iterdir()):
            f.rename(f.with_name(f.name.replace("phantom", prefix)))
    return out


def _distinct(phantoms: Path, out: Path) -> Path:
    """Other phantoms (other seeds, other names) of the same layout and classes."""
    write_phantom_dataset(out / "src", cases=2, shape=(32, 32, 32), seed=50)
    return _renamed(out / "src", out / "held_out", "heldout")


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):  # pragma: no cover - reached only when the check misses
        raise AssertionError("trained before the held-out set was checked")

    monkeypatch.setattr(experiments.loop, "train", refuse)


def test_train_eval_refuses_its_training_set_as_the_held_out_set(phantoms, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    code = main(["train-eval", "--train", str(phantoms), "--test", str(phantoms), "--out", str(out), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 of 2 held-out cases are training cases" in err and "(the same folder)" in err
    assert "phantom_000, phantom_001" in err and "--allow-overlap" in err
    assert not out.exists()


def test_train_eval_refuses_training_images_under_other_names(phantoms, tmp_path, capsys, no_training):
    copies = _renamed(phantoms, tmp_path / "copies", "copy")
    code = main(["train-eval", "--train", str(phantoms), "--test", str(copies), "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert "copy_000 (the image of training case phantom_000)" in err
    assert "copy_001 (the image of training case phantom_001)" in err


def test_the_refusal_names_a_few_overlapping_cases_and_counts_the_rest(tmp_path, no_training):
    many = write_phantom_dataset(tmp_path / "many", cases=7, shape=(16, 16, 16))
    with pytest.raises(DatasetError) as info:
        experiments.check_held_out_dataset(str(many), str(many))
    msg = str(info.value)
    assert "7 of 7 held-out cases" in msg and "phantom_004 and 2 more" in msg and "phantom_005" not in msg


def test_a_held_out_set_with_other_cases_is_accepted(phantoms, tmp_path):
    held_out = _distinct(phantoms, tmp_path)
    assert experiments.check_held_out_dataset(str(phantoms), str(held_out)) == []


def test_allow_overlap_scores_with_a_warning_and_marks_the_report(phantoms, tmp_path, capsys):
    out = tmp_path / "run"
    # (the command line prints it as "mambahome train-eval: warning: ..."; pytest catches it first)
    with pytest.warns(UserWarning, match=r"2 held-out case\(s\) are training cases too .*not a held-out score"):
        code = main(["train-eval", "--train", str(phantoms), "--test", str(phantoms), "--out", str(out),
                     "--allow-overlap", *TINY])
    captured = capsys.readouterr()
    assert code == 0
    assert "NOT held out: 2 of them are training cases" in captured.out
    summary = json.loads((out / "train_eval.json").read_text())
    assert summary["held_out"] is False and summary["training_cases"] == ["phantom_000", "phantom_001"]
    assert summary["test"]["n_cases"] == 2
    report = json.loads((out / "test" / "evaluation.json").read_text())
    assert report["held_out"] is False and report["training_cases"] == ["phantom_000", "phantom_001"]


def test_a_distinct_held_out_set_is_reported_as_held_out(phantoms, tmp_path, capsys):
    held_out = _distinct(phantoms, tmp_path)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*held-out")
        assert main(["train-eval", "--train", str(phantoms), "--test", str(held_out), "--out", str(out), *TINY]) == 0
    assert "held out" not in capsys.readouterr().out
    summary = json.loads((out / "train_eval.json").read_text())
    assert summary["held_out"] is True and summary["training_cases"] == []
    assert json.loads((out / "test" / "evaluation.json").read_text())["held_out"] is True
