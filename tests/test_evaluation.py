"""engine.evaluation: Dice/HD95 against hand-computed cases, empty-class rules, folder reports, CLI."""
from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest

from engine.evaluation import (EvaluationError, dice_per_class, evaluate_arrays, evaluate_folders,
                               register_cli)
from engine.io import Volume, save_volume


def _cube(shape=(24, 24, 24), start=(4, 4, 4), size=8, value=1, into=None):
    arr = np.zeros(shape, np.uint8) if into is None else into
    sl = tuple(slice(s, s + size) for s in start)
    arr[sl] = value
    return arr


def test_shifted_cubes_hand_computed():
    truth = _cube()
    pred = _cube(start=(6, 4, 4))  # shifted by 2 voxels along axis 0
    res = evaluate_arrays(pred, truth, ["background", "organ"], spacing=(2.0, 2.0, 2.0))
    organ = res["classes"]["organ"]
    # overlap 6 of 8 slices: Dice = 2 * 6*64 / (2 * 8*64) = 0.75
    assert organ["dice"] == pytest.approx(0.75)
    assert organ["hd95"] == pytest.approx(4.0)  # 2 voxels * 2 mm
    assert organ["status"] == "ok" and res["n_missing"] == 0
    # spacing along the shifted axis is what counts
    aniso = evaluate_arrays(pred, truth, ["background", "organ"], spacing=(3.0, 1.0, 1.0))
    assert aniso["classes"]["organ"]["hd95"] == pytest.approx(6.0)
    identical = evaluate_arrays(truth, truth, ["background", "organ"], spacing=(2.0, 2.0, 2.0))
    assert identical["classes"]["organ"]["dice"] == 1.0 and identical["classes"]["organ"]["hd95"] == 0.0


def test_multiclass_and_empty_class_rules():
    truth = _cube(value=1)
    _cube(start=(14, 14, 14), size=4, value=2, into=truth)
    pred = _cube(value=1)
    # class 2 missed, class 3 absent from both, class 4 predicted but not in truth
    _cube(start=(16, 2, 2), size=2, value=4, into=pred)
    names = ["background", "organ", "lesion", "vessel", "cyst"]
    res = evaluate_arrays(pred, truth, names, spacing=(1.0, 1.0, 1.0))
    c = res["classes"]
    assert c["organ"]["dice"] == 1.0 and c["organ"]["status"] == "ok"
    assert c["lesion"]["dice"] == 0.0 and math.isnan(c["lesion"]["hd95"]) and c["lesion"]["status"] == "missed"
    assert c["vessel"] == {"dice": 1.0, "hd95": 0.0, "status": "both_empty", "pred_voxels": 0, "truth_voxels": 0}
    assert c["cyst"]["status"] == "false_positive" and math.isnan(c["cyst"]["hd95"]) and c["cyst"]["pred_voxels"] == 8
    assert res["n_missing"] == 2
    assert res["mean_dice"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert res["mean_hd95"] == pytest.approx(0.0)  # only finite values are averaged
    assert dice_per_class(pred, truth, [1, 2, 3]) == {1: 1.0, 2: 0.0, 3: 1.0}


def test_bad_inputs():
    truth = _cube()
    with pytest.raises(EvaluationError, match=r"case: prediction shape \(24, 24, 23\) differs"):
        evaluate_arrays(truth[..., :-1], truth, ["background", "organ"])
    with pytest.raises(EvaluationError, match=r"prediction has label values \[5\] outside 0..1"):
        evaluate_arrays(truth * 5, truth, ["background", "organ"])
    with pytest.raises(EvaluationError, match="integer label map"):
        evaluate_arrays(truth.astype(np.float32), truth, ["background", "organ"])


def _write_case(folder, name, labels, spacing=(2.0, 2.0, 2.0), shift=0.0):
    affine = np.diag(list(spacing) + [1.0])
    affine[0, 3] = shift
    ref = Volume.from_array(labels, affine)
    return save_volume(folder / f"{name}.nii.gz", labels, ref)


def test_folders_report_json_csv(tmp_path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    _write_case(truth_dir, "a", _cube())
    _write_case(pred_dir, "a", _cube(start=(6, 4, 4)))
    _write_case(truth_dir, "b", _cube())
    _write_case(pred_dir, "b", np.zeros((24, 24, 24), np.uint8))  # missed entirely
    _write_case(truth_dir, "c", _cube())
    _write_case(pred_dir, "c", _cube(), shift=5.0)  # another grid: not scored, reported
    _write_case(truth_dir, "only_truth", _cube())
    _write_case(pred_dir, "only_pred", _cube())
    out = tmp_path / "reports" / "eval.json"
    with pytest.raises(EvaluationError, match=r"1 of 4 ground truths .* have no prediction \(only_truth\).*--allow-missing"):
        evaluate_folders(pred_dir, truth_dir, class_names=["background", "organ"], out=out)
    assert not out.parent.exists()  # refused before anything was written
    report = evaluate_folders(pred_dir, truth_dir, class_names=["background", "organ"], out=out, allow_missing=True)
    assert sorted(report["cases"]) == ["a", "b"]
    assert report["unmatched_pred"] == ["only_pred"] and report["unmatched_truth"] == ["only_truth"]
    assert "c" in report["failed"] and "different grid than ground truth" in report["failed"]["c"]
    assert "image" not in report["failed"]["c"]  # the truth is a label map, not an image
    s = report["summary"]["organ"]
    assert s["n"] == 2 and s["n_missing"] == 1
    assert s["dice_mean"] == pytest.approx(0.375) and s["dice_std"] == pytest.approx(0.375)
    assert s["hd95_mean"] == pytest.approx(4.0) and s["hd95_std"] == 0.0  # NaN of case b not averaged

    on_disk = json.loads(out.read_text())  # strict JSON: NaN written as null
    assert on_disk["cases"]["b"]["classes"]["organ"]["hd95"] is None
    assert on_disk["summary"]["organ"]["n_missing"] == 1
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["case"], r["class"], r["status"]) for r in rows] == [("a", "organ", "ok"), ("b", "organ", "missed")]
    assert float(rows[0]["hd95_mm"]) == pytest.approx(4.0) and rows[1]["hd95_mm"] == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.csv", "eval.json"]


def test_class_names_from_dataset_json_and_errors(tmp_path):
    root = tmp_path / "ds"
    _write_case(root / "labelsTr", "x", _cube())
    _write_case(tmp_path / "pred", "x", _cube())
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}))
    report = evaluate_folders(tmp_path / "pred", root / "labelsTr")
    assert report["class_names"] == ["background", "liver"]
    assert report["cases"]["x"]["classes"]["liver"]["dice"] == 1.0
    with pytest.raises(EvaluationError, match="nothere: prediction folder not found"):
        evaluate_folders(tmp_path / "nothere", root / "labelsTr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no prediction file matches"):
        evaluate_folders(tmp_path / "empty", root / "labelsTr")


def test_evaluate_command(tmp_path, capsys):
    _write_case(tmp_path / "truth", "a", _cube())
    _write_case(tmp_path / "pred", "a", _cube(start=(6, 4, 4)))
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                              "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "class_1" in text and "0.7500" in text
    assert json.loads(out.read_text())["summary"]["class_1"]["hd95_mean"] == pytest.approx(4.0)
    assert out.with_suffix(".csv").is_file()

    # the report of that run is kept: a second run to the same --out is refused before anything is scored
    with pytest.raises(EvaluationError, match=rf"{out}, {out.with_suffix('.csv')}: a report exists already and "
                                              r"is kept; pass --overwrite"):
        args.func(args)
    assert json.loads(out.read_text())["summary"]["class_1"]["hd95_mean"] == pytest.approx(4.0)

    _write_case(tmp_path / "truth", "b", _cube())  # a case the run never predicted
    args = parser.parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                              "--out", str(out), "--overwrite"])
    with pytest.raises(EvaluationError, match=r"have no prediction \(b\)"):
        args.func(args)
    args = parser.parse_args(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                              "--out", str(out), "--allow-missing", "--overwrite"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "means over the 1 scored cases of 2 ground truths" in text and "ground truths without prediction: b" in text


# ---------------------------------------------------------------- score_on_cases (the widget's before/after)
def _case_store_with_renamed_classes(tmp_path):
    """Two phantom cases whose labels use the model's classes in another order, plus a new class."""
    from engine.cases import CaseStore
    from engine.synth import make_phantom

    store = CaseStore(tmp_path / "cases")
    for seed in (1, 2):
        image, truth = make_phantom((32, 32, 32), modality="CT", seed=seed).to_volumes()
        model_values = np.asarray(truth.data)
        # case values: 1 = "Vessel" (model's 2), 2 = "organ" (model's 1), 3 = "my lesion" (unknown to the model)
        labels = np.zeros_like(model_values)
        labels[model_values == 2] = 1
        labels[model_values == 1] = 2
        labels[:3, :3, :3] = 3
        store.add(image, labels, modality="CT", class_names=["background", "Vessel", "organ", "my lesion", "cleared"])
    return store


def test_score_on_cases_matches_classes_by_name_and_skips_empty_ones(tmp_path):
    from plugin_support import write_tiny_checkpoint

    from engine.cases import CaseStore
    from engine.evaluation import mean_per_class, score_on_cases
    from engine.inference import Predictor

    store = _case_store_with_renamed_classes(tmp_path)
    predictor = Predictor(write_tiny_checkpoint(tmp_path / "tiny.safetensors", patch=32), device="cpu")
    reports = []
    scores = score_on_cases(predictor, store, progress=lambda d, t, m: reports.append((d, t)))
    assert set(scores) == set(store.ids()) and reports[-1] == (2, 2)
    for case_id, per_class in scores.items():
        image, truth, _ = CaseStore(store.root).load(case_id)
        truth = np.asarray(truth.data)
        pred = predictor.predict(image, modality="CT").labels
        # "cleared" has no voxels: not scored; "my lesion" is new to the model: 0.0
        assert set(per_class) == {"Vessel", "organ", "my lesion"}
        assert per_class["my lesion"] == 0.0
        assert per_class["organ"] == pytest.approx(dice_per_class(pred == 1, truth == 2, [1])[1])
        assert per_class["Vessel"] == pytest.approx(dice_per_class(pred == 2, truth == 1, [1])[1])
    only = score_on_cases(predictor, store.list()[:1], classes=["ORGAN"])
    assert list(only) == [store.list()[0].case_id] and set(only[store.list()[0].case_id]) == {"organ"}
    means = mean_per_class(scores)
    assert means["my lesion"] == 0.0 and set(means) == {"Vessel", "organ", "my lesion"}


def test_score_on_cases_stops_when_cancelled(tmp_path):
    from plugin_support import write_tiny_checkpoint

    from engine.evaluation import score_on_cases
    from engine.progress import Cancelled, CancelToken

    store = _case_store_with_renamed_classes(tmp_path)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        score_on_cases(write_tiny_checkpoint(tmp_path / "t.safetensors", patch=32), store, device="cpu", cancel=token)


def test_folders_in_every_label_format_match_by_case_name(tmp_path):
    """What `predict` writes (.seg.nrrd, .nrrd, .mha) is scored against NIfTI or NRRD truths of the same case name;
    the class names come from the segments when no dataset.json names them."""
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    ref = Volume.from_array(_cube(), np.diag([2.0, 2.0, 2.0, 1.0]))
    save_volume(truth_dir / "a.nrrd", _cube(), ref)
    save_volume(pred_dir / "a.seg.nrrd", _cube(start=(6, 4, 4)), ref,
                segments=[{"value": 1, "name": "left kidney", "color": None}])
    save_volume(truth_dir / "b.nii.gz", _cube(), ref)
    save_volume(pred_dir / "b.mha", _cube(), ref)
    (pred_dir / "notes.txt").write_text("not a volume")
    report = evaluate_folders(pred_dir, truth_dir)
    assert report["class_names"] == ["background", "left kidney"]
    assert report["cases"]["a"]["classes"]["left kidney"]["dice"] == pytest.approx(0.75)
    assert report["cases"]["b"]["classes"]["left kidney"]["dice"] == 1.0
    assert report["failed"] == {} and report["unmatched_pred"] == []

    save_volume(pred_dir / "b.nii.gz", _cube(), ref)  # a second prediction of case b: which one is meant?
    with pytest.raises(EvaluationError, match=r"two files for case 'b' \(b.mha, b.nii.gz\)"):
        evaluate_folders(pred_dir, truth_dir)
