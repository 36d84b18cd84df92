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
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from engine.formats import segment_names, volume_suffix
from engine.io import (LabelValuesError, PathLike, VolumeError, is_file_or_broken_link, load_label,
                       looks_like_label_map, onto_grid, write_json_atomic, write_text_atomic)
from engine.progress import CancelToken, ProgressCallback, check, report

REPORT_FORMAT = "mambahome-evaluation"

REPORT_FILE = "evaluation.json"
"""The report's name in a folder (``evaluate --out FOLDER``, ``train-eval``'s ``test/``); its table is
``evaluation.csv`` beside it."""


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the file or case."""


class NoCaseScored(EvaluationError):
    """Every matched case failed (each named with its reason), so no report is written: the command line exits 2, as
    ``predict`` does when every input was skipped; a report of NaN means with exit 1 read as "done, with some left
    out"."""

    def __init__(self, message: str, failed: Dict[str, str]):
        super().__init__(message)
        self.failed = dict(failed)


def _binary(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def _union_box(pred_mask: np.ndarray, truth_mask: np.ndarray) -> Tuple[slice, ...]:
    """The bounding box of ``pred_mask | truth_mask`` grown by one voxel, clipped to the array.

    MONAI's HD95 crops to this same box (``get_mask_edges``: union, ``margin=1``, zeros beyond the array), and
    Dice only counts voxels inside it (float32 sums of 0/1 are exact in any order below 2**24 voxels), so both
    metrics are bit-identical on the crop (tests/test_evaluate_memory.py); but MONAI makes float32
    copies of whatever it is handed first: two of a 512x512x224 grid per class are 470 MB, for a gland of a
    few thousand voxels."""
    union = pred_mask | truth_mask
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return tuple(box)


def _class_metrics(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                   with_hd95: bool = True) -> Dict[str, Any]:
    """Dice and HD95 of one binary class (bool masks); see the module table for empty masks."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    n_pred, n_truth = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(truth_mask))
    out: Dict[str, Any] = {"pred_voxels": n_pred, "truth_voxels": n_truth}
    if n_pred == 0 and n_truth == 0:
        out.update(dice=1.0, hd95=0.0, status="both_empty")
        return out
    if n_pred == 0 or n_truth == 0:
        out.update(dice=0.0, hd95=float("nan"), status="missed" if n_pred == 0 else "false_positive")
        return out
    box = _union_box(pred_mask, truth_mask)
    yp, yt = _binary(pred_mask[box]), _binary(truth_mask[box])
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


def _check_arrays(pred: np.ndarray, truth: np.ndarray, num_classes: int, name: str,
                  class_names: Optional[Sequence[str]] = None) -> None:
    if pred.shape != truth.shape:
        raise EvaluationError(f"{name}: prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    for what, arr in (("prediction", pred), ("ground truth", truth)):
        _check_labels(arr, num_classes, name, what, class_names)


def _check_labels(arr: np.ndarray, num_classes: int, name: str, what: str,
                  class_names: Optional[Sequence[str]] = None) -> None:
    """Refuse a label map with values outside ``0..num_classes - 1``, naming ``name`` (its file), a few of the values,
    the range and, for an image given in its place, that it looks like one: a bare list of values does not tell the
    user which file is wrong or why."""
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise EvaluationError(f"{name}: {what} must be an integer label map, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        raise EvaluationError(f"{name}: {what} has label values {_values_outside(arr, num_classes)} outside "
                              f"0..{num_classes - 1}{_classes_words(class_names)}{_image_hint(arr)}")


_SHOWN_VALUES = 5


def _values_outside(arr: np.ndarray, num_classes: int) -> str:
    """The first few values of ``arr`` outside ``0..num_classes - 1``, how many there are and the largest."""
    bad = np.unique(arr[(arr < 0) | (arr >= num_classes)]).astype(np.int64)
    shown = bad[:_SHOWN_VALUES].tolist()
    return f"{shown} and {bad.size - len(shown)} more up to {int(bad[-1])}" if bad.size > len(shown) else f"{shown}"


def _classes_words(class_names: Optional[Sequence[str]]) -> str:
    if not class_names:
        return ""
    listed = ", ".join(str(n) for n in list(class_names)[:4]) + (", ..." if len(class_names) > 4 else "")
    return f" (the {len(class_names)} classes {listed})"


def _image_hint(arr: np.ndarray) -> str:
    if arr.ndim == 3 and min(arr.shape) >= 2 and not looks_like_label_map(arr):
        return "; it looks like an image (a scan stored as whole numbers?), not a label map"
    return ""


def _value_metrics(pred: np.ndarray, truth: np.ndarray, values: Sequence[int], spacing: Sequence[float],
                   labels: Sequence[str], progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> Dict[int, Dict[str, Any]]:
    """:func:`_class_metrics` of each label value, ``progress(values_done, len(values), label)`` before each
    one (HD95 of one organ on a clinical CT is seconds) and ``cancel`` checked between them."""
    metrics: Dict[int, Dict[str, Any]] = {}
    for done, (value, label) in enumerate(zip(values, labels)):
        check(cancel)
        report(progress, done, len(values), label)
        metrics[value] = _class_metrics(pred == value, truth == value, spacing)
    return metrics


def _case_result(classes: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    dices = [m["dice"] for m in classes.values()]
    hds = [m["hd95"] for m in classes.values() if np.isfinite(m["hd95"])]
    return {"classes": classes, "mean_dice": float(np.mean(dices)),
            "mean_hd95": float(np.mean(hds)) if hds else float("nan"),
            "n_missing": sum(1 for m in classes.values() if not np.isfinite(m["hd95"]))}


def evaluate_arrays(pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), name: str = "case",
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> Dict[str, Any]:
    """Per-class Dice and HD95 of one case.

    Args:
        pred: integer label map ``(I, J, K)``.
        truth: integer label map, same shape and grid.
        class_names: index = label value; index 0 (background) is not scored.
        spacing: voxel size in mm along the array axes (HD95 is in mm).
        name: case name for error messages.
        progress: ``progress(classes_done, classes_total, class_name)`` before each class.
        cancel: checked before each class; raises :class:`engine.progress.Cancelled`.

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
    _check_arrays(pred, truth, len(class_names), name, class_names)
    values = list(range(1, len(class_names)))
    metrics = _value_metrics(pred, truth, values, spacing, class_names[1:], progress, cancel)
    return _case_result({class_names[k]: metrics[k] for k in values})


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


PREDICTION_NAME_TAGS = ("_pred", "_prediction")
"""Endings of prediction file names (``case_pred.nii.gz``) that, as a label's ``_seg``, do not name the case."""


def _matched_without_tags(preds: Dict[str, Path], truths: Dict[str, Path]) -> Dict[str, Path]:
    """``preds`` keyed by the ground truth's case name where the two differ only by a label or prediction tag
    (``case_seg`` for ``case``, ``case_pred`` for ``case_seg``: what ``mambahome dataset`` pairs by, and what other
    tools name their outputs), so that more cases match; as given when that matches none more or a name would
    stand for two files."""
    from engine.datasets import LABEL_NAME_TAGS

    tags = sorted(LABEL_NAME_TAGS + PREDICTION_NAME_TAGS, key=len, reverse=True)

    def stem(name: str) -> str:
        low = name.lower()
        return next((name[: -len(tag)] for tag in tags if low.endswith(tag) and len(name) > len(tag)), name)

    pred_stems, truth_stems = {stem(c): c for c in preds}, {stem(c): c for c in truths}
    if len(pred_stems) != len(preds) or len(truth_stems) != len(truths):
        return preds  # case and case_seg side by side: which is meant is not for this rule to guess
    if len(set(pred_stems) & set(truth_stems)) <= len(set(preds) & set(truths)):
        return preds
    return {truth_stems.get(s, pred_stems[s]): preds[pred_stems[s]] for s in pred_stems}


def _case_files(folder: Path) -> Dict[str, Path]:
    """``{case name: label file}`` for every volume file in ``folder`` (any format the engine reads: a
    prediction written as ``.seg.nrrd`` matches a ground truth ``.nii.gz`` of the same name)."""
    files: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        suffix = volume_suffix(f.name)
        if f.name.startswith(".") or suffix is None or not is_file_or_broken_link(f):
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


def _name_clashes(loaded: Iterable[tuple]) -> Dict[int, Tuple[str, str]]:
    """``{value: (prediction's name, ground truth's name)}`` where the two name a value differently (case-insensitive):
    another label set's classes scored against these by number alone."""
    from engine.class_names import name_key

    clashes: Dict[int, Tuple[str, str]] = {}
    for _, pred, truth in loaded:
        theirs, ours = segment_names(pred.segments), segment_names(truth.segments)
        for value in set(theirs) & set(ours):
            if name_key(theirs[value]) != name_key(ours[value]):
                clashes.setdefault(value, (theirs[value], ours[value]))
    return clashes


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


def _log(log: Optional[Callable[[str], None]], line: str) -> None:
    if log is not None:
        log(line)


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


def _score_files(pred_file: Path, truth_file: Path, class_names: Optional[Sequence[str]],
                 progress: ProgressCallback, cancel: Optional[CancelToken]) -> Tuple[Dict[str, Any], Any]:
    """One case of :func:`evaluate_folders`: ``(evaluate_arrays result, None)``; without ``class_names``, the
    result by label value (``label <v>``) and ``(metrics by value, pred segments, truth segments)`` to name them by."""
    truth = _load_labels(truth_file, "ground truth", class_names)
    check(cancel)
    if class_names is not None:
        # before the prediction is read: an image given as the ground truth is named as such, not its prediction
        _check_labels(np.asarray(truth.data), len(class_names), str(truth_file), "ground truth", class_names)
    # the same voxels in another axis order/direction (e.g. DICOM slice order) are reoriented, not refused
    pred = onto_grid(_load_labels(pred_file, "prediction", class_names), truth, what="prediction",
                     reference_what="ground truth")
    check(cancel)
    if class_names is not None:
        return evaluate_arrays(pred.data, truth.data, class_names, truth.spacing, name=str(pred_file),
                               progress=progress, cancel=cancel), None
    p_data, t_data = np.asarray(pred.data), np.asarray(truth.data)
    _refuse_images(p_data, t_data, pred_file, truth_file, (pred, truth))
    integer = all(np.issubdtype(a.dtype, np.integer) or a.dtype == bool for a in (p_data, t_data))
    top = max(int(p_data.max(initial=0)), int(t_data.max(initial=0)), 1) if integer else 1
    _check_arrays(p_data, t_data, top + 1, str(pred_file))
    values = list(range(1, top + 1))
    metrics = _value_metrics(p_data, t_data, values, truth.spacing, [f"label {v}" for v in values], progress, cancel)
    return (_case_result({f"label {v}": m for v, m in metrics.items()}),
            (metrics, SimpleNamespace(segments=_named_values(pred)), SimpleNamespace(segments=_named_values(truth))))


def _load_labels(path: Path, what: str, class_names: Optional[Sequence[str]]) -> Any:
    """:func:`load_label`; a file with negative or fractional values is refused naming the range the classes allow."""
    try:
        return load_label(path)
    except LabelValuesError as exc:
        if class_names is None:
            raise
        text = str(exc)
        raise LabelValuesError(f"{text}{' ' if text.endswith(('?', '.')) else '. '}The {what} must hold label values "
                               f"0..{len(class_names) - 1}{_classes_words(class_names)}.") from None


_IMAGE_MIN_VALUES = 32
"""Without class names, the distinct values beyond the known ones from which a file that does not look like a label
map is taken for an image: a 0/255 mask adds one value and a class the other file lacks a few, and a small object
alone fails the neighbour test (:func:`engine.io.looks_like_label_map`); each of the 200 integer hippocampus MRIs of
the shared real data adds 107 to 361."""


def _refuse_images(p_data: np.ndarray, t_data: np.ndarray, pred_file: Path, truth_file: Path,
                   volumes: Sequence[Any]) -> None:
    """Without class names, refuse an image given as the prediction or ground truth (an MRI stored as whole numbers),
    which would otherwise be scored as a class per grey value: a file holding many values beyond every value the other
    file holds and any file names, that does not look like a label map. A label map's value the other file lacks (a
    class missed or wrongly predicted, a 0/255 mask) is still scored."""
    named = max((int(s["value"]) for v in volumes for s in (_named_values(v) or [])), default=0)
    for what, data, path, other in (("ground truth", t_data, truth_file, p_data),
                                    ("prediction", p_data, pred_file, t_data)):
        known = max(int(other.max(initial=0)), named, 1)
        many = int(data.max(initial=0)) > known and np.unique(data[data > known]).size > _IMAGE_MIN_VALUES
        hint = _image_hint(data) if many else ""
        if hint:
            mate = "prediction" if what == "ground truth" else "ground truth"
            raise EvaluationError(f"{path}: {what} has label values {_values_outside(data, known + 1)} outside "
                                  f"0..{known} (no class names were given: the values its {mate} holds or a file "
                                  f"names){hint}; if they are classes, name every class: --classes background NAME ...")


def _named_values(volume: Any) -> Optional[List[Dict[str, Any]]]:
    """A label file's class names as segments: a ``.seg.nrrd``'s own, or the class record of a NIfTI label map
    (``mambahome predict`` writes the model's names there): the same prediction as ``.nii.gz`` was reported with
    ``class_1``... where as ``.seg.nrrd`` it had the model's names."""
    from engine.io import header_class_names

    if volume.segments:
        return volume.segments
    names = header_class_names(volume.header)[1] if volume.header is not None else None
    return [{"value": v, "name": n} for v, n in enumerate(names or []) if v > 0 and n.strip() and n != f"label {v}"]


def evaluate_folders(pred_dir: PathLike, truth_dir: PathLike, class_names: Optional[Sequence[str]] = None,
                     out: Optional[PathLike] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, allow_missing: bool = False,
                     log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
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
            (same name, ``.csv``), both atomically; a folder (see :func:`report_paths`) gets
            :data:`REPORT_FILE` inside it.
        allow_missing: score the matched cases only when some ground truths have no prediction; the
            report's ``unmatched_truth`` lists them and the means are over the matched cases.
        progress: ``progress(cases_done, cases_total, message)`` at each stage of each case: ``<case>: loading``,
            ``<case>: Dice/HD95 of <class> (k/K)`` before each class, ``<case>: scored``; ``evaluation done`` last.
        cancel: checked between cases, files and classes; raises :class:`engine.progress.Cancelled`.
        log: gets one line per case when it is scored (its mean Dice and HD95) or not (why).

    Returns:
        report dict: ``cases`` (per case :func:`evaluate_arrays` result), ``summary`` (per class
        mean/std and ``n_missing``), ``unmatched_pred``, ``unmatched_truth``, ``failed`` (case ->
        error message; such cases are not scored), ``class_names``.

    Raises:
        EvaluationError: a folder or file is missing, one is a file and the other a folder, no file names match, or (unless ``allow_missing``)
            a ground truth has no prediction.
        NoCaseScored: (an EvaluationError) no matched case could be scored; nothing is written.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    preds, truths, names_dir = _pairs(pred_dir, truth_dir)
    preds = _matched_without_tags(preds, truths)
    matched = sorted(set(preds) & set(truths))
    if not matched:
        # names such as case_0000 (nnU-Net's image channel) for labels named case: say which names differ
        examples = (f" (e.g. prediction {sorted(preds)[0]!r}, ground truth {sorted(truths)[0]!r})"
                    if preds and truths else "")
        labels_tr = truth_dir / "labelsTr" if truth_dir.is_dir() else None
        dataset = (f"; {truth_dir} is a dataset folder: give its labels folder, --truth {labels_tr}"
                   if labels_tr is not None and labels_tr.is_dir() else "")
        raise EvaluationError(f"{pred_dir}: no prediction file matches a ground-truth file name in {truth_dir} "
                              f"({len(preds)} predictions, {len(truths)} ground truths){examples}; a prediction "
                              "is matched to the ground truth of the same case name, whatever its format"
                              f"{dataset}")
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
    # Without class names, each case is scored by label value (1..its largest) and named once all are read: the
    # volumes themselves are not kept (every case of a folder in memory at once was 2.3 GB for two clinical CTs).
    by_value: Dict[str, Any] = {}
    seconds: Dict[str, float] = {}
    n = len(matched)
    for i, case in enumerate(matched):
        started = time.perf_counter()
        check(cancel)
        report(progress, i, n, f"{case}: loading")

        def stage(done: int, total: int, label: str, case: str = case, i: int = i) -> None:
            report(progress, i, n, f"{case}: Dice/HD95 of {label} ({done + 1}/{total})")

        try:
            # in a function, so that no case's volumes are still held while the next one loads
            result, by_value[case] = _score_files(preds[case], truths[case], class_names, stage, cancel)
        except (VolumeError, EvaluationError) as exc:
            by_value.pop(case, None)
            failed[case] = str(exc)
            _log(log, f"{case}: not scored: {exc}")
            continue
        report(progress, i + 1, n, f"{case}: scored")
        seconds[case] = time.perf_counter() - started
        if class_names is not None:
            per_case[case] = result
            _log_case(log, case, result, seconds[case])
    if len(failed) == len(matched):
        # nothing to average: a report of NaN means (exit 1) looked like a finished measurement with cases left out.
        # Worded as predict's NoInputSegmented; without a log no line said why, so the reasons are in the message.
        listed = list(failed) if log is not None else [f"{case}: {why}" for case, why in failed.items()]
        shown = ("; " if log is None else ", ").join(listed[:10]) + (" ..." if len(listed) > 10 else "")
        raise NoCaseScored(f"{pred_dir}: {len(failed)} of {len(matched)} matched cases were not scored ({shown}"
                           f"{'; reasons above' if log is not None else ''}); no report was written", failed)
    if class_names is None:
        by_value = {case: scored for case, scored in by_value.items() if scored is not None}
        top = max((max(metrics) for metrics, _, _ in by_value.values()), default=1)
        class_names = _names_from_segments([(case, p, t) for case, (_, p, t) in by_value.items()], top)
        # Only a value some file of the test set holds is a class here. A value no file holds (ids a label set
        # skips, 2..254 of 0/255 masks, the classes of a 117-class label set that these cases lack, whichever file
        # names them) would score "both empty", Dice 1, in every case: an empty prediction of an abdomen CT whose
        # truth names TotalSegmentator's 117 classes had a mean Dice of 0.65. The summary gives such classes n = 0
        # and the terminal table lists them as not scored (format_summary).
        # A value only predictions hold (a stray 7, the 255 of a 0/255 mask beside 0/1 truths) is no class of the test
        # set either: scored in every case, it was "false positive" in one and "both empty", Dice 1, in every other, and
        # lifted the mean. It is scored where it was predicted only (a false positive, Dice 0), and named.
        held = {v for metrics, _, _ in by_value.values() for v, m in metrics.items() if m["truth_voxels"] > 0}
        stray: Dict[int, List[str]] = {}
        for case, (metrics, _, _) in by_value.items():
            for v, m in metrics.items():
                if m["pred_voxels"] > 0 and v not in held:
                    stray.setdefault(v, []).append(case)
        for value, cases in sorted(stray.items()):
            shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
            warnings.warn(f"label {value} is in the predictions of {shown} but in no ground truth: scored as a false "
                          "positive in those cases only (it is no class of this test set); are the prediction's and the "
                          "ground truth's label values the same?", UserWarning, stacklevel=2)
        scored = [v for v in range(1, top + 1) if v in held] or [1]
        for value, (pred_name, truth_name) in sorted(_name_clashes(by_value.values()).items()):
            if value in scored:
                warnings.warn(f"label {value} is named {pred_name!r} in the predictions but {truth_name!r} in the "
                              f"ground truth: scored as {truth_name!r}; are the two label sets the same?",
                              UserWarning, stacklevel=2)
        for case, (metrics, _, _) in by_value.items():
            # a value above this case's largest is empty in both of its files
            here = sorted(set(scored) | {v for v, cases in stray.items() if case in cases})
            per_case[case] = _case_result({class_names[v]: metrics.get(v) or _class_metrics(
                np.zeros(1, bool), np.zeros(1, bool), (1.0,)) for v in here})
            # logged only now (the progress bar shows each case read meanwhile): the line written while reading said
            # 0.99 for that 0/255 mask where the report says 0
            _log_case(log, case, per_case[case], seconds[case])
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


def report_paths(out: PathLike) -> Tuple[Path, Path]:
    """``(report JSON, per-case CSV)`` for ``--out``: a folder (one that exists, or a name ending in a separator, made
    when the report is written) holds :data:`REPORT_FILE` and its ``.csv``, as ``train-eval``'s ``test/`` does;
    any other path is the JSON file, the CSV beside it with the suffix ``.csv``.

    ``evaluate-interactive --out`` takes a folder, and the same folder given to ``evaluate`` was refused as "a report
    exists already" (and with ``--overwrite`` "the path is a folder"); ``evnew/`` wrote a file named ``evnew``.
    """
    text = os.fspath(out)
    folder = Path(text).is_dir() or text.endswith(("/", os.sep))
    report = Path(text) / REPORT_FILE if folder else Path(text)
    return report, report.with_suffix(".csv")


def write_report(result: Dict[str, Any], out: PathLike) -> Path:
    """Write the JSON report and the per-case, per-class CSV beside it (``.csv``), atomically; ``out`` is the JSON
    file or a folder for it (:func:`report_paths`).

    NaN (undefined HD95) is ``null`` in JSON and an empty cell in CSV.

    Returns:
        The JSON file written.
    """
    out, table = report_paths(out)
    write_json_atomic(out, result)
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "class", "dice", "hd95_mm", "status", "pred_voxels", "truth_voxels"])
    for case, res in result["cases"].items():
        for cname, m in res["classes"].items():
            writer.writerow([case, cname, f"{m['dice']:.6f}", f"{m['hd95']:.6f}" if np.isfinite(m["hd95"]) else "",
                             m["status"], m["pred_voxels"], m["truth_voxels"]])
    write_text_atomic(table, buf.getvalue())
    return out


def refuse_report_over_volume(*files: PathLike) -> None:
    """Refuse report files named as volumes (``--out truth/case_019.nii.gz``): with ``--overwrite`` the JSON report
    replaced the ground truth it scored, read-only or not.

    Raises:
        EvaluationError: naming the path and what to give instead.
    """
    from engine.formats import READ_SUFFIXES
    from engine.io import NIFTI_SUFFIXES

    for f in files:
        if str(f).lower().endswith(NIFTI_SUFFIXES + READ_SUFFIXES):
            raise EvaluationError(f"--out {f}: names an image or label file, and the report is JSON (with a CSV "
                                  "beside it); give a .json file or a folder for the report (--out report.json)")


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
    rows = {c: s for c, s in result["summary"].items() if c != "__mean__"}
    # label values no file holds (scored nowhere, n = 0) are left out of the table when other classes were scored
    unscored = [c for c, s in rows.items() if s["n"] == 0] if any(s["n"] for s in rows.values()) else []
    for cname, s in rows.items():
        if cname in unscored:
            continue
        lines.append(f"{cname:<20} {s['n']:>4} {s['dice_mean']:>10.4f} {s['dice_std']:>9.4f} "
                     f"{s['hd95_mean']:>9.2f} {s['hd95_std']:>9.2f} {s['n_missing']:>8}")
    if unscored:
        lines.append(f"not scored: {len(unscored)} label value(s) no file holds ({', '.join(unscored[:5])}"
                     f"{' ...' if len(unscored) > 5 else ''})")
    lines.append(f"mean foreground Dice: {result['summary']['__mean__']['dice_mean']:.4f}")
    return "\n".join(lines)


def _cli_progress() -> Tuple[ProgressCallback, Callable[[str], None]]:
    """``(progress, log)`` for the command line: one bar over the cases on stderr whose text is the stage, and
    the case lines printed above it (stdout stays the summary table)."""
    from tqdm.auto import tqdm

    bar = None
    # into a log file (nohup, a batch job) every redraw is a new line: there the case lines say the progress and
    # the bar is drawn at most every 30 s, as `mambahome train` does
    live = sys.stderr.isatty()

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="case", desc="evaluate", leave=False, file=sys.stderr,
                       mininterval=0.1 if live else 30.0)
        bar.total = total
        bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)
        if live:
            bar.refresh()  # the stage changes within a case: shown at once, not at the next case
        if done >= total and message == "evaluation done":
            bar.close()

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    return progress, log


def _log_case(log: Optional[Callable[[str], None]], case: str, result: Dict[str, Any], seconds: float) -> None:
    """One case's line as its report entry has it (the same mean Dice and HD95)."""
    hd95 = f"{result['mean_hd95']:.2f} mm" if np.isfinite(result["mean_hd95"]) else "undefined"
    _log(log, f"{case}: mean Dice {result['mean_dice']:.4f}, mean HD95 {hd95} "
              f"({len(result['classes'])} classes, {seconds:.1f} s)")


def checkpoint_class_names(checkpoint: PathLike) -> List[str]:
    """The class names (index = label value, background first) of the checkpoint whose predictions are scored:
    ``mambahome predict`` writes NIfTI label maps, which carry no names, so without a ``dataset.json`` near the
    ground truth the report said ``class_1``, ``class_2``... for a model that knows its classes. Only the
    checkpoint's JSON header is read.

    Raises:
        engine.checkpoint.CheckpointError: a missing or unreadable checkpoint.
        EvaluationError: a checkpoint that names no classes.
    """
    from engine.checkpoint import read_checkpoint_metadata

    names = read_checkpoint_metadata(checkpoint).get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise EvaluationError(f"{checkpoint}: the checkpoint names no classes (its metadata has no class_names list); "
                              "name them with --classes background NAME ...")
    return list(names)


def _cli(args: argparse.Namespace) -> int:
    if args.checkpoint is not None and args.classes:
        raise EvaluationError("give --classes or --checkpoint, not both: both name the label values")
    class_names = checkpoint_class_names(args.checkpoint) if args.checkpoint is not None else args.classes
    if args.classes and args.classes[0].strip().lower() not in ("background", "bg", "0"):
        # `mambahome dataset --classes anterior posterior` names values 1, 2; here the first name is value 0, so the
        # same list made every case fail with "label values [2] outside 0..1" and no hint why
        shown = ", ".join(f"{i} = {n!r}" for i, n in enumerate(args.classes[:4]))
        print(f"note: --classes names label values from 0 ({shown}{', ...' if len(args.classes) > 4 else ''}); "
              f"if {args.classes[0]!r} is not the background, put background first: --classes background "
              f"{' '.join(args.classes)}", file=sys.stderr)
    try:
        same = Path(args.pred).resolve() == Path(args.truth).resolve()
    except (OSError, RuntimeError):
        same = False
    if same:  # every case scored against itself: Dice 1.0 for all, said as a result
        raise EvaluationError(f"--pred and --truth are the same folder ({args.pred}): every case would be scored "
                              "against itself; give the folder of the predictions and the folder of the ground truth")
    report_file, table_file = report_paths(args.out)
    refuse_report_over_volume(report_file, table_file)
    if not args.overwrite:
        refuse_existing_report([report_file, table_file])
    # the report is written after every case is scored (minutes for a folder of CTs): a read-only folder or a path
    # through a file is refused now, as predict refuses its output, not after the measurement
    from engine.inference import check_output_writable

    check_output_writable(report_file)
    # A clinical CT takes tens of seconds per case (files, then HD95 class by class): a bar over the cases that
    # names the stage, and a line per scored case, so a long run is neither silent nor lost when it stops.
    progress, log = (None, None) if args.quiet else _cli_progress()
    # every case not scored: NoCaseScored, exit 2 with no report (as predict with every input skipped)
    result = evaluate_folders(args.pred, args.truth, class_names=class_names, out=report_file,
                              progress=progress, allow_missing=args.allow_missing, log=log)
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
    print(f"report: {report_file} (table: {table_file})")
    return 1 if result["failed"] else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Dice and HD95 (mm) of predicted label maps against ground truth",
                              description="Dice and HD95 (mm) per case and class of predicted label maps against "
                                          "ground truth, matched by case name (or two files as one case); the table "
                                          "goes to stdout, progress and a line per case to stderr, the report to "
                                          "--out (JSON, the per-case CSV beside it).")
    p.add_argument("--pred", required=True,
                   help="folder of predicted label maps (NIfTI, NRRD, .seg.nrrd, MHA/MHD, MGZ), or one label file "
                        "when --truth is one file")
    p.add_argument("--truth", required=True,
                   help="folder of ground-truth label maps, matched by case name (the file name without its format "
                        "suffix: a.seg.nrrd is scored against a.nii.gz), or one label file (scored against the one "
                        "--pred file, whatever its name)")
    p.add_argument("--out", required=True,
                   help=f"report JSON path, the per-case CSV written beside it (.csv); or a folder (existing, or a "
                        f"name ending in /, made if missing) to hold {REPORT_FILE} and "
                        f"{Path(REPORT_FILE).with_suffix('.csv')}")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names, index = label value, background first: background anterior posterior "
                        "(default: dataset.json near --truth, else the names in .seg.nrrd files, else class_1, "
                        "class_2, ...)")
    p.add_argument("--checkpoint", default=None, metavar="MODEL.safetensors",
                   help="name the classes as this checkpoint does (the model that wrote --pred with mambahome "
                        "predict: NIfTI predictions carry no class names); instead of --classes")
    p.add_argument("--allow-missing", action="store_true",
                   help="score only the cases that have a prediction (default: a ground truth without one is an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing report at --out (by default it is kept and nothing runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no line per case")
    p.set_defaults(func=_cli)
