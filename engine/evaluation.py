"""Segmentation metrics: per-case, per-class Dice and HD95 (mm) with MONAI, over arrays or folders.

Empty classes are defined, not guessed:

============================  ======  =========  ==================
prediction / ground truth     Dice    HD95       status
============================  ======  =========  ==================
both non-empty                MONAI   MONAI, mm  ``ok``
both empty                    1.0     0.0        ``both_empty``
truth empty, prediction not   0.0     NaN        ``false_positive``
prediction empty, truth not   0.0     NaN        ``missed``
============================  ======  =========  ==================

An undefined HD95 is never averaged as a number: summaries report the mean/std of the finite
values and count the others in ``n_missing``. HD95 uses the voxel spacing of the ground truth file
(MONAI ``HausdorffDistanceMetric(percentile=95)`` with ``spacing=``), the symmetric 95th
percentile of surface distances.
"""
from __future__ import annotations

import argparse
import csv
import io as _io
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from engine.formats import segment_names, volume_suffix
from engine.io import PathLike, VolumeError, load_label, onto_grid, write_json_atomic, write_text_atomic
from engine.progress import CancelToken, ProgressCallback, check, report

REPORT_FORMAT = "mambahome-evaluation"


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the file or case."""


def _binary(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def _class_metrics(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                   with_hd95: bool = True) -> Dict[str, Any]:
    """Dice and HD95 of one binary class; see the module table for empty masks."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    n_pred, n_truth = int(pred_mask.sum()), int(truth_mask.sum())
    out: Dict[str, Any] = {"pred_voxels": n_pred, "truth_voxels": n_truth}
    if n_pred == 0 and n_truth == 0:
        out.update(dice=1.0, hd95=0.0, status="both_empty")
        return out
    if n_pred == 0 or n_truth == 0:
        out.update(dice=0.0, hd95=float("nan"), status="missed" if n_pred == 0 else "false_positive")
        return out
    yp, yt = _binary(pred_mask), _binary(truth_mask)
    dice = DiceMetric(include_background=True, reduction="none")(yp, yt)
    out["dice"] = float(dice.reshape(-1)[0])
    if with_hd95:
        with warnings.catch_warnings():
            # MONAI 1.5+ warns about its own internal use of a deprecated argument
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                yp, yt, spacing=[float(s) for s in spacing])
        out["hd95"] = float(hd.reshape(-1)[0])
    else:
        out["hd95"] = float("nan")
    out["status"] = "ok"
    return out


def _check_arrays(pred: np.ndarray, truth: np.ndarray, num_classes: int, name: str) -> None:
    if pred.shape != truth.shape:
        raise EvaluationError(f"{name}: prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    for what, arr in (("prediction", pred), ("ground truth", truth)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise EvaluationError(f"{name}: {what} must be an integer label map, got {arr.dtype}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
            bad = sorted(set(np.unique(arr).tolist()) - set(range(num_classes)))
            raise EvaluationError(f"{name}: {what} has label values {bad[:10]} outside 0..{num_classes - 1}")


def evaluate_arrays(pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), name: str = "case") -> Dict[str, Any]:
    """Per-class Dice and HD95 of one case.

    Args:
        pred: integer label map ``(I, J, K)``.
        truth: integer label map, same shape and grid.
        class_names: index = label value; index 0 (background) is not scored.
        spacing: voxel size in mm along the array axes (HD95 is in mm).
        name: case name for error messages.

    Returns:
        ``{"classes": {class_name: {"dice", "hd95", "status", "pred_voxels", "truth_voxels"}},
        "mean_dice": float, "mean_hd95": float (finite values only, NaN if none), "n_missing": int}``.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    class_names = [str(c) for c in class_names]
    if len(class_names) < 2:
        raise EvaluationError(f"{name}: need background and at least one class, got {class_names}")
    if len(spacing) != pred.ndim:
        raise EvaluationError(f"{name}: spacing {tuple(spacing)} does not match {pred.ndim}D arrays")
    _check_arrays(pred, truth, len(class_names), name)
    classes = {cname: _class_metrics(pred == k, truth == k, spacing) for k, cname in enumerate(class_names) if k > 0}
    dices = [m["dice"] for m in classes.values()]
    hds = [m["hd95"] for m in classes.values() if np.isfinite(m["hd95"])]
    return {"classes": classes, "mean_dice": float(np.mean(dices)),
            "mean_hd95": float(np.mean(hds)) if hds else float("nan"),
            "n_missing": sum(1 for m in classes.values() if not np.isfinite(m["hd95"]))}


def dice_per_class(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> Dict[int, float]:
    """Dice of each label value in ``labels`` (no HD95; quick, for the GUI). Both empty -> 1.0.

    Args:
        pred, truth: integer label maps of the same shape.
        labels: label values to score.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    return {int(k): _class_metrics(pred == k, truth == k, (1.0,) * pred.ndim, with_hd95=False)["dice"]
            for k in labels}


def _name_key(name: str) -> str:
    # the same name matching as fine-tuning (engine.finetune.class_mapping): case and "_" do not matter
    return " ".join(str(name).strip().casefold().replace("_", " ").split())


def case_records(cases: Any) -> List[Any]:
    """The records of a case store (``.list()``) or of any iterable of records."""
    return cases.list() if hasattr(cases, "list") and callable(cases.list) else list(cases)


def load_case(record: Any) -> tuple:
    """A saved case's image :class:`~engine.io.Volume` and its labels ``(X, Y, Z)`` class ids on the image's
    grid (checked against the record's classes)."""
    from engine.io import load_volume

    image = load_volume(record.image_path)
    truth = np.asarray(load_label(record.label_path, reference=image, class_ids=range(len(record.class_names))).data)
    return image, truth


def score_on_cases(model_or_checkpoint: Any, cases: Any, device: str = "auto",
                   classes: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> Dict[str, Dict[str, float]]:
    """Dice of a model's segmentation of saved cases, per case and per class, classes matched by name.

    Only classes whose ground truth is non-empty in a case are scored there (a class the user cleared
    or never drew says nothing about the model; "both empty = 1.0" would flatter it). A class the
    model does not know (a new class of the user's) scores 0.0 where the truth has it.

    Args:
        model_or_checkpoint: a checkpoint path, an :class:`engine.inference.Predictor`, or
            ``(model, metadata)`` as :class:`~engine.inference.Predictor` accepts.
        cases: an :class:`engine.cases.CaseStore` (all its cases) or a sequence of
            :class:`engine.cases.CaseRecord` (e.g. the held-out ones).
        device: ``auto`` | ``cpu`` | ``cuda`` ... (ignored when a Predictor is given).
        classes: class names to score (default: every class present in each case's labels).
        progress: ``progress(done, total, message)`` after each case.
        cancel: checked before each case and inside each prediction.

    Returns:
        ``{case_id: {class_name: dice}}``; a case with nothing to score maps to ``{}``.

    Raises:
        engine.cases.CaseStoreError / engine.io.VolumeError: a case that cannot be read (names it).
        engine.progress.Cancelled: ``cancel`` was set.
    """
    from engine.inference import Predictor

    predictor = model_or_checkpoint if isinstance(model_or_checkpoint, Predictor) else Predictor(
        model_or_checkpoint, device=device)
    records = case_records(cases)
    model_index = {_name_key(n): i for i, n in enumerate(predictor.class_names) if i > 0}
    wanted = {_name_key(n) for n in classes} if classes is not None else None
    scores: Dict[str, Dict[str, float]] = {}
    for done, record in enumerate(records):
        check(cancel)
        image, truth = load_case(record)
        prediction = predictor.predict(image, modality=record.modality, cancel=cancel).labels
        per_class: Dict[str, float] = {}
        for value, name in enumerate(record.class_names):
            key = _name_key(name)
            if value == 0 or (wanted is not None and key not in wanted) or not (truth == value).any():
                continue
            predicted = prediction == model_index[key] if key in model_index else np.zeros(truth.shape, bool)
            per_class[str(name)] = float(_class_metrics(predicted, truth == value, (1.0,) * truth.ndim,
                                                        with_hd95=False)["dice"])
        scores[record.case_id] = per_class
        report(progress, done + 1, len(records), f"Dice: case {done + 1}/{len(records)}")
    return scores


def mean_per_class(scores: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Mean Dice of each class over the cases that scored it (``score_on_cases`` output)."""
    values: Dict[str, List[float]] = {}
    for per_class in scores.values():
        for name, dice in per_class.items():
            values.setdefault(name, []).append(float(dice))
    return {name: float(np.mean(v)) for name, v in values.items()}


def summarize(per_case: Dict[str, Dict[str, Any]], class_names: Sequence[str]) -> Dict[str, Any]:
    """Mean/std per class over cases; HD95 over finite values only, the rest counted in ``n_missing``."""
    summary: Dict[str, Any] = {}
    for cname in list(class_names)[1:]:
        rows = [c["classes"][cname] for c in per_case.values() if cname in c["classes"]]
        dice = np.array([r["dice"] for r in rows], dtype=np.float64)
        hd = np.array([r["hd95"] for r in rows], dtype=np.float64)
        finite = hd[np.isfinite(hd)]
        summary[cname] = {
            "n": len(rows),
            "dice_mean": float(dice.mean()) if rows else float("nan"),
            "dice_std": float(dice.std()) if rows else float("nan"),
            "hd95_mean": float(finite.mean()) if finite.size else float("nan"),
            "hd95_std": float(finite.std()) if finite.size else float("nan"),
            "n_missing": int((~np.isfinite(hd)).sum()),
        }
    per_class_dice = [s["dice_mean"] for s in summary.values() if np.isfinite(s["dice_mean"])]
    summary["__mean__"] = {"dice_mean": float(np.mean(per_class_dice)) if per_class_dice else float("nan")}
    return summary


def _case_files(folder: Path) -> Dict[str, Path]:
    """``{case name: label file}`` for every volume file in ``folder`` (any format the engine reads: a
    prediction written as ``.seg.nrrd`` matches a ground truth ``.nii.gz`` of the same name)."""
    files: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        suffix = volume_suffix(f.name)
        if f.name.startswith(".") or suffix is None or not f.is_file():
            continue
        case = f.name[: -len(suffix)]
        if case in files:
            raise EvaluationError(f"{folder}: two files for case {case!r} ({files[case].name}, {f.name}); "
                                  "keep one of them")
        files[case] = f
    return files


def _class_names_near(truth_dir: Path) -> Optional[List[str]]:
    """Class names from a dataset.json in the truth folder or its parent (nnU-Net labelsTr)."""
    from engine.datasets import DATASET_JSON, class_names_from_meta, read_dataset_json

    for candidate in (truth_dir / DATASET_JSON, truth_dir.parent / DATASET_JSON):
        if candidate.is_file():
            return class_names_from_meta(read_dataset_json(candidate), candidate)
    return None


def _names_from_segments(loaded: Sequence[tuple], top: int) -> List[str]:
    """Class names for values ``0..top`` from the segments of the label files (``.seg.nrrd``: the ground
    truth's first, then the prediction's), ``class_K`` where no file names a value."""
    names = ["background"] + [f"class_{k}" for k in range(1, top + 1)]
    volumes = [pred for _, pred, _ in loaded] + [truth for _, _, truth in loaded]  # the truths' names win
    for volume in volumes:
        for value, name in segment_names(volume.segments).items():
            if value <= top:
                names[value] = name
    return names


def _pairs(pred: Path, truth: Path) -> Tuple[Dict[str, Path], Dict[str, Path], Path]:
    """``(predictions, ground truths, folder for dataset.json)`` by case name: two folders are matched by file
    name; two files are one case (named after the ground truth's file), whatever their names."""
    for what, path in (("prediction", pred), ("ground truth", truth)):
        if not path.exists():
            kind = "folder" if volume_suffix(path.name) is None else "file"
            raise EvaluationError(f"{path}: {what} {kind} not found (--pred and --truth take two folders of label "
                                  "maps matched by case name, or two label files)")
        if not (path.is_dir() or path.is_file()):
            raise EvaluationError(f"{path}: {what} is neither a folder nor a file")
    if pred.is_file() != truth.is_file():
        file, folder = (pred, truth) if pred.is_file() else (truth, pred)
        raise EvaluationError(f"{file} is a file but {folder} is a folder: --pred and --truth take two folders "
                              "(files matched by case name) or two label files (one case)")
    if pred.is_dir():
        return _case_files(pred), _case_files(truth), truth
    for what, path in (("prediction", pred), ("ground truth", truth)):
        if volume_suffix(path.name) is None:
            raise EvaluationError(f"{path}: the {what} is not a label file the engine reads (NIfTI, NRRD, .seg.nrrd, "
                                  "MHA/MHD, MGZ)")
    case = truth.name[: -len(volume_suffix(truth.name))]
    return {case: pred}, {case: truth}, truth.parent


def evaluate_folders(pred_dir: PathLike, truth_dir: PathLike, class_names: Optional[Sequence[str]] = None,
                     out: Optional[PathLike] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, allow_missing: bool = False) -> Dict[str, Any]:
    """Evaluate every prediction against the ground truth file of the same name.

    A ground truth without a prediction is an error unless ``allow_missing`` (nnU-Net's ``chill``):
    a mean over the predictions that happen to exist would hide the cases a run failed on.

    Args:
        pred_dir: folder of predicted label maps (NIfTI, NRRD, ``.seg.nrrd``, MHA/MHD, MGZ), or one label file.
        truth_dir: folder of ground-truth label maps; files are matched by name (ending ignored). Or one label
            file when ``pred_dir`` is one: a single case named after this file. A prediction whose grid is the
            truth's voxels in another axis order or direction (DICOM slice order) is reoriented onto it.
        class_names: index = label value; default from a ``dataset.json`` in ``truth_dir`` or its
            parent, else the segment names of ``.seg.nrrd`` files (ground truth first), else
            ``class_K`` up to the largest value present.
        out: if given, the report is written there as JSON and the per-case table beside it as CSV
            (same name, ``.csv``), both atomically.
        allow_missing: score the matched cases only when some ground truths have no prediction; the
            report's ``unmatched_truth`` lists them and the means are over the matched cases.

    Returns:
        report dict: ``cases`` (per case :func:`evaluate_arrays` result), ``summary`` (per class
        mean/std and ``n_missing``), ``unmatched_pred``, ``unmatched_truth``, ``failed`` (case ->
        error message; such cases are not scored), ``class_names``.

    Raises:
        EvaluationError: a folder or file is missing, one is a file and the other a folder, no file names match, or (unless ``allow_missing``)
            a ground truth has no prediction.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    preds, truths, names_dir = _pairs(pred_dir, truth_dir)
    matched = sorted(set(preds) & set(truths))
    if not matched:
        raise EvaluationError(f"{pred_dir}: no prediction file matches a ground-truth file name in {truth_dir} "
                              f"({len(preds)} predictions, {len(truths)} ground truths)")
    without_prediction = sorted(set(truths) - set(preds))
    if without_prediction and not allow_missing:
        shown = ", ".join(without_prediction[:10]) + (" ..." if len(without_prediction) > 10 else "")
        raise EvaluationError(f"{pred_dir}: {len(without_prediction)} of {len(truths)} ground truths in {truth_dir} "
                              f"have no prediction ({shown}); predict them, or score only the matched cases "
                              "with --allow-missing")
    if class_names is None:
        class_names = _class_names_near(names_dir)
    per_case: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, str] = {}
    loaded = []
    for i, case in enumerate(matched):
        check(cancel)
        report(progress, i, len(matched), f"evaluating {case}")
        try:
            truth = load_label(truths[case])
            # the same voxels in another axis order/direction (e.g. DICOM slice order) are reoriented, not refused
            pred = onto_grid(load_label(preds[case]), truth, what="prediction", reference_what="ground truth")
        except VolumeError as exc:
            failed[case] = str(exc)
            continue
        loaded.append((case, pred, truth))
        if class_names is None:  # decided after all files are read, below
            continue
        try:
            per_case[case] = evaluate_arrays(pred.data, truth.data, class_names, truth.spacing, name=str(preds[case]))
        except EvaluationError as exc:
            failed[case] = str(exc)
    if class_names is None:
        top = max((int(max(p.data.max(), t.data.max())) for _, p, t in loaded), default=1)
        class_names = _names_from_segments(loaded, max(top, 1))
        for case, pred, truth in loaded:
            per_case[case] = evaluate_arrays(pred.data, truth.data, class_names, truth.spacing, name=str(preds[case]))
    report(progress, len(matched), len(matched), "evaluation done")
    result = {
        "format": REPORT_FORMAT,
        "pred_dir": str(pred_dir), "truth_dir": str(truth_dir),
        "class_names": list(class_names),
        "summary": summarize(per_case, class_names),
        "cases": per_case,
        "unmatched_pred": sorted(set(preds) - set(truths)),
        "unmatched_truth": without_prediction,
        "failed": failed,
    }
    if out is not None:
        write_report(result, out)
    return result


def write_report(result: Dict[str, Any], out: PathLike) -> Path:
    """Write the JSON report and the per-case, per-class CSV beside it (``.csv``), atomically.

    NaN (undefined HD95) is ``null`` in JSON and an empty cell in CSV.
    """
    out = Path(out)
    write_json_atomic(out, result)
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "class", "dice", "hd95_mm", "status", "pred_voxels", "truth_voxels"])
    for case, res in result["cases"].items():
        for cname, m in res["classes"].items():
            writer.writerow([case, cname, f"{m['dice']:.6f}", f"{m['hd95']:.6f}" if np.isfinite(m["hd95"]) else "",
                             m["status"], m["pred_voxels"], m["truth_voxels"]])
    write_text_atomic(out.with_suffix(".csv"), buf.getvalue())
    return out


def refuse_existing_report(files: Sequence[PathLike]) -> None:
    """The command line's guard: a report written over by mistake loses a measurement (a run of minutes or
    hours), so an existing one is kept unless ``--overwrite``, as ``mambahome predict`` keeps its outputs.
    :func:`evaluate_folders` itself still replaces (scripts re-run to refresh their reports).

    Raises:
        EvaluationError: naming the report files that exist.
    """
    existing = [str(f) for f in files if Path(f).exists()]
    if existing:
        raise EvaluationError(f"{', '.join(existing)}: a report exists already and is kept; pass --overwrite to "
                              "replace it, or choose another --out")


def format_summary(result: Dict[str, Any]) -> str:
    """A plain-text table of the summary for the terminal."""
    lines = [f"{'class':<20} {'n':>4} {'Dice mean':>10} {'Dice std':>9} {'HD95 mm':>9} {'HD95 std':>9} {'missing':>8}"]
    for cname, s in result["summary"].items():
        if cname == "__mean__":
            continue
        lines.append(f"{cname:<20} {s['n']:>4} {s['dice_mean']:>10.4f} {s['dice_std']:>9.4f} "
                     f"{s['hd95_mean']:>9.2f} {s['hd95_std']:>9.2f} {s['n_missing']:>8}")
    lines.append(f"mean foreground Dice: {result['summary']['__mean__']['dice_mean']:.4f}")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> int:
    if args.classes and args.classes[0].strip().lower() not in ("background", "bg", "0"):
        # `mambahome dataset --classes anterior posterior` names values 1, 2; here the first name is value 0, so the
        # same list made every case fail with "label values [2] outside 0..1" and no hint why
        shown = ", ".join(f"{i} = {n!r}" for i, n in enumerate(args.classes[:4]))
        print(f"note: --classes names label values from 0 ({shown}{', ...' if len(args.classes) > 4 else ''}); "
              f"if {args.classes[0]!r} is not the background, put background first: --classes background "
              f"{' '.join(args.classes)}", file=sys.stderr)
    if not args.overwrite:
        refuse_existing_report([args.out, Path(args.out).with_suffix(".csv")])
    result = evaluate_folders(args.pred, args.truth, class_names=args.classes, out=args.out,
                              progress=lambda d, t, m: None, allow_missing=args.allow_missing)
    print(format_summary(result))
    n_truth = len(result["cases"]) + len(result["failed"]) + len(result["unmatched_truth"])
    if len(result["cases"]) < n_truth:
        print(f"means over the {len(result['cases'])} scored cases of {n_truth} ground truths")
    for key, what in (("unmatched_pred", "predictions without ground truth"),
                      ("unmatched_truth", "ground truths without prediction")):
        if result[key]:
            print(f"{len(result[key])} {what}: {', '.join(result[key][:10])}")
    for case, msg in result["failed"].items():
        print(f"not scored: {case}: {msg}")
    print(f"report: {args.out} (table: {Path(args.out).with_suffix('.csv')})")
    return 1 if result["failed"] else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Dice and HD95 (mm) of predicted label maps against ground truth")
    p.add_argument("--pred", required=True,
                   help="folder of predicted label maps (NIfTI, NRRD, .seg.nrrd, MHA/MHD, MGZ), or one label file "
                        "when --truth is one file")
    p.add_argument("--truth", required=True,
                   help="folder of ground-truth label maps, matched by case name (the file name without its format "
                        "suffix: a.seg.nrrd is scored against a.nii.gz), or one label file (scored against the one "
                        "--pred file, whatever its name)")
    p.add_argument("--out", required=True, help="report JSON path; the per-case CSV is written beside it")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names, index = label value, background first: background anterior posterior "
                        "(default: dataset.json near --truth)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the cases that have a prediction (default: a ground truth without one is an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report at --out (by default it is kept and nothing runs)")
    p.set_defaults(func=_cli)
