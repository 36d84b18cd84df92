"""The robot user: interactive segmentation evaluated without a person, and NoC metrics.

For every object (each class present in a case's label map) the robot gives a first prompt (a click
at the object's deepest voxel, its 3D bounding box, or a scribble along it on one slice), then
corrective clicks at the deepest voxel of the largest error region (positive on missed object,
negative on false object), and records the Dice after each interaction. NoC@80 / 85 / 90 are the
number of interactions needed to reach Dice 0.80 / 0.85 / 0.90, capped at the maximum when never reached.
Every placement is deterministic, so two runs of one checkpoint give the same numbers, and it does not depend on
how the file stores the scan: the robot places its prompts in the network's axis order (RAS for our models; the
session's :class:`~engine.interactive.frame.AxisFrame`) and measures depth in mm, so a copy stored flipped (LAS),
with its axes in another order or with thick slices gets the same clicks on the same anatomy (it measured depth in
voxels of the file's own order: a 1x1x2 mm copy stored LAS scored 0.63 after the first click where the RAS one
scored 0.37).

Starting from an automatic model (``start_from``, ``--start-from AUTO_CHECKPOINT``): the annotators' own
loop, where an automatic (non-interactive) segmentation model labels the case and the interactive model
then corrects its masks. Each case is predicted once (:func:`auto_labels`, the
:class:`engine.inference.Predictor` labels on the volume's own grid, the grid the session's mask lies
on); each object starts from the automatic mask of the class of the same name (names matched as
:func:`engine.train.parent.class_mapping` matches them: case, spaces and underscores aside), set with
:meth:`InteractiveSession.set_initial_mask` (no network runs), and every interaction is a corrective
click. An object whose class the automatic model does not know starts from an empty mask; the report
counts those (``started_empty``). ``initial_dice`` is the Dice of the starting mask, before any
interaction; NoC@80 / 85 / 90 are 0 when the starting mask already reaches the threshold.

``mambahome evaluate-interactive`` runs it over a dataset and writes ``interactive_report.json``,
``interactive_objects.csv`` and ``dice_vs_interactions.png`` into the output folder.
"""
from __future__ import annotations

import argparse
import csv
import io as _io
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from engine.interactive.prompts import InteractionError, Prompt
from engine.interactive.session import InteractiveSession
from engine.interactive.simulate import INITIAL_KINDS, corrective_prompt, initial_prompt
from engine.progress import CancelToken, ProgressCallback, check, report

REPORT_FORMAT = "mambahome-interactive-evaluation"
NOC_THRESHOLDS = (0.80, 0.85, 0.90)
"""Dice thresholds of the NoC@k numbers (interactions to reach Dice k, capped): 0.85 and 0.90 as in the
interactive-segmentation literature; 0.80 too, which a small CPU model reaches where it rarely reaches 0.90."""
NOC_KEYS = tuple(f"noc{int(round(t * 100))}" for t in NOC_THRESHOLDS)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    p, t = prediction.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def number_of_clicks(dices: Sequence[float], threshold: float, cap: int, initial: Optional[float] = None) -> int:
    """Interactions (1-based) until Dice first reaches ``threshold``; ``cap`` when it never does.

    Args:
        dices: Dice after each interaction.
        threshold: the Dice to reach (0.85 for NoC@85).
        cap: the count when ``dices`` never reach it (the maximum number of interactions).
        initial: Dice of the mask the object started from (an automatic model's), None when it started
            empty with a first prompt; a starting mask that already reaches ``threshold`` needs no
            interaction: 0.

    Returns:
        The number of interactions, 0 to ``cap``.
    """
    if initial is not None and initial >= threshold:
        return 0
    for i, d in enumerate(dices, 1):
        if d >= threshold:
            return i
    return int(cap)


def run_object(session: InteractiveSession, obj: np.ndarray, prompt: str = "point",
               max_interactions: int = 10, initial_mask: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Segment one object with the robot user, from an empty mask or from a given starting mask.

    Args:
        session: a session on the object's volume (it is reset first).
        obj: boolean ``(I, J, K)`` ground truth of the object.
        prompt: first prompt, ``point``, ``box`` or ``scribble``; corrections are points. Not used with
            ``initial_mask``.
        max_interactions: interactions in all, the first prompt included.
        initial_mask: ``(I, J, K)`` mask to start from (nonzero = object; e.g. an automatic model's mask of
            the object's class, or all zeros): set with :meth:`InteractiveSession.set_initial_mask`, which
            runs no network, and then every interaction is a corrective click.

    Returns:
        ``{"initial_dice": Dice of initial_mask (None without one), "dice": [per interaction], "noc80",
        "noc85", "noc90", "latency_s": [per interaction]}``; NoC is 0 when ``initial_mask`` already reaches the
        threshold (:func:`number_of_clicks`).
    """
    if prompt not in INITIAL_KINDS:
        raise InteractionError(f"unknown prompt kind {prompt!r}; choose one of {INITIAL_KINDS}")
    if max_interactions < 1:
        raise InteractionError(f"max_interactions must be >= 1, got {max_interactions}")
    obj = obj.astype(bool)
    session.reset()
    frame = session.frame
    spacing = None if session.spacing is None else frame.spacing_to_network(session.spacing)
    net_obj = frame.to_network(obj)

    def placed(found: Optional[Prompt]) -> Optional[Prompt]:
        # found on the network's axis order, given on the volume's (a box's corners sorted again per axis)
        if found is None:
            return None
        voxels = frame.voxels_to_volume(found.voxels)
        return Prompt(found.kind, found.positive, np.sort(voxels, axis=0) if found.kind == "box" else voxels)

    def correction(mask: np.ndarray) -> Optional[Prompt]:
        return placed(corrective_prompt(frame.to_network(mask), net_obj, rng=None, spacing=spacing))

    dices: List[float] = []
    latency: List[float] = []
    initial_dice: Optional[float] = None
    if initial_mask is None:
        next_prompt = placed(initial_prompt(net_obj, prompt, rng=None, spacing=spacing))
    else:
        session.set_initial_mask(initial_mask)
        start = session.mask.astype(bool)  # as the session holds it (nonzero = object)
        initial_dice = dice(start, obj)
        next_prompt = correction(start)
    for _ in range(max_interactions):
        if next_prompt is None:  # already perfect: further clicks change nothing
            dices.append(dices[-1] if dices else float(initial_dice))  # type: ignore[arg-type]
            latency.append(0.0)
            continue
        update = session.add_prompt(next_prompt)
        latency.append(update.latency_s)
        mask = session.mask.astype(bool)
        dices.append(dice(mask, obj))
        next_prompt = correction(mask)
    result: Dict[str, Any] = {"initial_dice": initial_dice, "dice": dices, "latency_s": latency}
    for t, key in zip(NOC_THRESHOLDS, NOC_KEYS):
        result[key] = number_of_clicks(dices, t, max_interactions, initial=initial_dice)
    return result


def robot_session(checkpoint_or_model: Any, image: Any, label: np.ndarray, prompt: str = "point",
                  max_interactions: int = 10, device: Any = "auto", normalize: bool = True,
                  modality: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                  cancel: Optional[CancelToken] = None, start_label: Optional[np.ndarray] = None,
                  start_classes: Optional[Mapping[int, int]] = None,
                  local_corrections: bool = True) -> List[Dict[str, Any]]:
    """The robot user on every object (class present) of one volume.

    Args:
        checkpoint_or_model: as :class:`InteractiveSession`.
        image: :class:`engine.io.Volume` or 3D array.
        label: ``(I, J, K)`` class ids on the image's grid.
        class_names: names of the label values, for the report.
        start_label: an automatic model's ``(I, J, K)`` label map on the image's grid; each object then
            starts from its mask of the mapped class and is corrected with clicks only
            (:func:`run_object` with ``initial_mask``).
        start_classes: ``{label value: start_label value}`` (see :func:`engine.train.parent.class_mapping`);
            an object whose class is not in it starts from an empty mask. Required with ``start_label``.
        local_corrections: as :class:`InteractiveSession` (the annotator's default: True).

    Returns:
        One dict per object: ``class_id``, ``class_name``, ``voxels`` and :func:`run_object`'s keys; with
        ``start_label`` also ``start``: ``"automatic"`` or ``"empty"`` (class unknown to the automatic model).

    Raises:
        InteractionError: a label map or ``start_label`` not on the image's grid.
    """
    session = InteractiveSession(checkpoint_or_model, image, device=device, normalize=normalize, modality=modality,
                                 local_corrections=local_corrections)
    label = np.asarray(label)
    if label.shape != session.shape:
        raise InteractionError(f"label shape {label.shape} differs from the image shape {session.shape}")
    if start_label is not None:
        start_label = np.asarray(start_label)
        if start_label.shape != session.shape:
            raise InteractionError(f"the automatic model's label map has shape {start_label.shape} but the image "
                                   f"{session.volume_name} is {session.shape}: it must lie on the image's grid")
        if start_classes is None:
            raise InteractionError("start_label needs start_classes (label value -> automatic model class)")
    results = []
    for class_id in (int(c) for c in np.unique(label) if c != 0):
        check(cancel)
        obj = label == class_id
        start: Dict[str, Any] = {}
        initial_mask = None
        if start_label is not None:
            mapped = start_classes.get(class_id)  # type: ignore[union-attr]
            # a class the automatic model does not know: the annotator starts from nothing
            initial_mask = start_label == mapped if mapped is not None else np.zeros(label.shape, dtype=bool)
            start = {"start": "automatic" if mapped is not None else "empty"}
        out = run_object(session, obj, prompt=prompt, max_interactions=max_interactions, initial_mask=initial_mask)
        name = class_names[class_id] if class_names is not None and class_id < len(class_names) else str(class_id)
        results.append({"class_id": class_id, "class_name": name, "voxels": int(obj.sum()), **start, **out})
    return results


def auto_labels(model_meta: Tuple[Any, Dict[str, Any]], volume: Any, device: str = "auto", *,
                modality: Optional[str] = None, cancel: Optional[CancelToken] = None) -> np.ndarray:
    """An automatic (non-interactive) model's label map of ``volume``, on the volume's own voxel grid.

    The robot's seam to :class:`engine.inference.Predictor` (as ``mambahome predict`` and
    :func:`engine.experiments.evaluate_checkpoint` predict): the grid the labels come back on is the
    volume as loaded, which is the grid an :class:`InteractiveSession`'s mask lies on.

    Args:
        model_meta: ``(model, metadata)`` of a segmentation checkpoint (from
            :func:`engine.checkpoint.load_checkpoint`).
        volume: :class:`engine.io.Volume`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        modality: intensity rule (default: the checkpoint's).
        cancel: checked between batches of windows.

    Returns:
        ``(I, J, K)`` integer label map (values: the model's class indices).

    Raises:
        InteractionError: the labels do not lie on the volume's grid.
        engine.inference.PredictionError: a volume the model cannot segment (channels).
    """
    from engine.inference import Predictor

    predictor = Predictor(model_meta, device=device)
    labels = np.asarray(predictor.predict(volume, modality=modality, cancel=cancel).labels)
    shape = tuple(int(s) for s in np.shape(volume.data))
    if labels.shape != shape:  # the Predictor promises the input's grid; the session's mask is on it
        raise InteractionError(f"{_source_of(model_meta[1])} labelled {volume.path or '<in-memory volume>'} on a "
                               f"grid of shape {labels.shape}, not on the volume's own grid {shape}")
    return labels


def _source_of(metadata: Mapping[str, Any], default: str = "<in-memory model>") -> str:
    """The file a loaded checkpoint's metadata says it came from."""
    from engine.checkpoint import SOURCE_KEY

    source = metadata.get(SOURCE_KEY)
    return str((source or {}).get("path") or metadata.get("path") or default)


def _task_name(metadata: Mapping[str, Any]) -> Optional[str]:
    task = metadata.get("task")
    return task.get("name") if isinstance(task, dict) else task


def load_automatic_model(start_from: Any) -> Tuple[Tuple[Any, Dict[str, Any]], str]:
    """The automatic segmentation model of ``--start-from``, refused when it is an interactive one.

    Args:
        start_from: a checkpoint path, or ``(model, metadata)`` already loaded.

    Returns:
        ``((model, metadata), source)``, ``source`` the file (for the report and messages).

    Raises:
        InteractionError: an interactive checkpoint (checked from the header, before the weights load).
        engine.checkpoint.CheckpointError: an unreadable file.
    """
    from engine.checkpoint import load_checkpoint, read_checkpoint_metadata

    if isinstance(start_from, tuple):
        model, metadata = start_from
        source = _source_of(metadata)
    else:
        source = str(start_from)
        metadata = read_checkpoint_metadata(start_from)
    if _task_name(metadata) == "interactive":
        raise InteractionError(f"{source} is an interactive (promptable) model; --start-from takes an automatic "
                               "segmentation checkpoint, whose masks the interactive model then corrects (the "
                               "interactive model goes to --checkpoint)")
    if not isinstance(start_from, tuple):
        model, metadata = load_checkpoint(start_from, device="cpu")
    if not metadata.get("class_names"):
        raise InteractionError(f"{source}: the checkpoint names no classes, so its masks cannot be matched to the "
                               "dataset's classes by name")
    return (model, metadata), source


def robot_scores_on_cases(checkpoint: Any, cases: Any, device: str = "auto", max_interactions: int = 3,
                          prompt: str = "point", progress: Optional[ProgressCallback] = None,
                          cancel: Optional[CancelToken] = None) -> Dict[str, Dict[str, float]]:
    """The robot user's Dice after ``max_interactions`` interactions on every object of saved cases.

    The interactive counterpart of :func:`engine.evaluation.score_on_cases` (same result shape, so a
    before/after table reads both): an object is each class present in a case's labels.

    Args:
        checkpoint: an interactive checkpoint path (loaded once), or ``(model, metadata)``.
        cases: an :class:`engine.cases.CaseStore` or a sequence of :class:`engine.cases.CaseRecord`.
        device: ``auto`` | ``cpu`` | ``cuda``...
        max_interactions: interactions per object, the first prompt included.
        prompt: the first prompt (``point``, ``box``, ``scribble``); corrections are points.
        progress: ``progress(done, total, message)`` after each case.
        cancel: checked before each case and each object.

    Returns:
        ``{case_id: {class_name: final dice}}``.

    Raises:
        InteractionError: a non-interactive checkpoint. engine.cases.CaseStoreError /
        engine.io.VolumeError: a case that cannot be read (names it). engine.progress.Cancelled.
    """
    from engine.checkpoint import load_checkpoint
    from engine.evaluation import case_records, load_case

    if not isinstance(checkpoint, tuple):
        from engine.checkpoint import read_checkpoint_metadata
        from engine.interactive.session import interactive_encoding

        interactive_encoding(read_checkpoint_metadata(checkpoint), str(checkpoint))  # refuse before loading
        checkpoint = load_checkpoint(checkpoint, device="cpu")
    records = case_records(cases)
    scores: Dict[str, Dict[str, float]] = {}
    for done, record in enumerate(records):
        check(cancel)
        image, label = load_case(record)
        objects = robot_session(checkpoint, image, label, prompt=prompt, max_interactions=max_interactions,
                                device=device, modality=record.modality, class_names=record.class_names,
                                cancel=cancel)
        scores[record.case_id] = {str(o["class_name"]): float(o["dice"][-1]) for o in objects}
        report(progress, done + 1, len(records), f"robot Dice: case {done + 1}/{len(records)}")
    return scores


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def summarize(objects: Sequence[Dict[str, Any]], max_interactions: int) -> Dict[str, Any]:
    """Mean Dice per interaction, mean NoC@80/85/90, mean final Dice and mean initial Dice over ``objects``.

    ``mean_initial_dice`` is the mean Dice of the starting masks (an object started empty counts with its
    Dice 0), None when no object started from a mask."""
    # a case whose label map holds no object (all background) has no curve: its means are None, not a numpy error
    curves = np.asarray([o["dice"] for o in objects], dtype=np.float64).reshape(len(objects), -1 if objects else 0)
    initial = [o["initial_dice"] for o in objects if o.get("initial_dice") is not None]
    return {
        "objects": len(objects),
        "mean_initial_dice": _mean(initial),
        "mean_dice_per_interaction": curves.mean(axis=0).tolist() if len(objects) else [],
        "mean_final_dice": _mean([o["dice"][-1] for o in objects]),
        **{f"mean_{k}": _mean([o[k] for o in objects]) for k in NOC_KEYS},
        "max_interactions": int(max_interactions),
    }


def evaluate_interactive(checkpoint: Any, dataset: Union[str, Path], out_dir: Union[str, Path],
                         prompt: str = "point", max_interactions: int = 10, device: str = "auto",
                         max_cases: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None, start_from: Any = None,
                         local_corrections: bool = True) -> Dict[str, Any]:
    """The robot user over a dataset's labelled cases; writes the JSON report, CSV and PNG.

    Args:
        checkpoint: an interactive checkpoint path, or ``(model, metadata)``.
        dataset: a folder :func:`engine.datasets.load_dataset` reads.
        out_dir: output folder (created).
        prompt: first prompt kind (``point``, ``box``, ``scribble``); with ``start_from`` every interaction
            is a corrective click, so only ``point`` is accepted there.
        max_interactions: interactions per object, the first prompt included (with ``start_from``: the
            corrective clicks after the automatic mask).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; the automatic model runs there too.
        max_cases: evaluate only the first cases (sorted by id); None: every case, else at least 1.
        progress: ``progress(cases_done, cases_total, message)``.
        cancel: checked between objects.
        start_from: an automatic (non-interactive) segmentation checkpoint path, or its ``(model,
            metadata)``: each case is predicted with it once and each object starts from its mask of the
            class of the same name (empty when it has no such class), then gets corrective clicks (see
            the module's docstring).
        local_corrections: clicks on an existing mask act near the click only, in their direction (the
            session's default, :class:`InteractiveSession`); False measures the network's whole-window answer.

    Returns:
        The report (also written to ``interactive_report.json``). With ``start_from`` it also holds
        ``start_from_classes`` (dataset class -> the automatic model's class, None when unknown) and
        ``started_empty`` (``objects``: how many objects started from an empty mask, ``classes``: theirs).

    Raises:
        InteractionError: a checkpoint that is not interactive, a ``start_from`` that is, an automatic label
            map not on the volume's grid, a dataset without labelled objects.
    """
    from engine.checkpoint import load_checkpoint
    from engine.datasets import load_dataset
    from engine.interactive.session import interactive_encoding

    if prompt not in INITIAL_KINDS:
        raise InteractionError(f"unknown prompt kind {prompt!r}; choose one of {INITIAL_KINDS}")
    if int(max_interactions) < 1:
        raise InteractionError(f"max_interactions must be >= 1, got {max_interactions}")
    if max_cases is not None and int(max_cases) < 1:  # 0 read as "all", -1 as "all but the last"
        raise InteractionError(f"--cases must be >= 1 (or left out for every case), got {max_cases}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # was "report.json: File exists", after the checks
        raise InteractionError(f"{out_dir} is a file; --out takes a folder for the report (interactive_report.json, "
                               "the CSV and the plot are written into it): give a new or existing folder")
    if start_from is not None and prompt != "point":
        raise InteractionError(f"--prompts {prompt} is not used with --start-from: every interaction corrects the "
                               "automatic mask with a click")
    if isinstance(checkpoint, tuple):
        model, metadata = checkpoint
        source = str(metadata.get("path") or "<in-memory model>")
        header = metadata
    else:
        from engine.checkpoint import read_checkpoint_metadata

        source = str(checkpoint)
        header = read_checkpoint_metadata(checkpoint)
    try:
        interactive_encoding(header, source)  # refuse before loading anything
    except InteractionError as exc:
        if start_from is None:
            raise
        raise InteractionError(f"{exc} (--checkpoint is the interactive model that makes the corrections; the "
                               "automatic segmentation model goes to --start-from)") from exc
    auto: Optional[Tuple[Any, Dict[str, Any]]] = None
    auto_source: Optional[str] = None
    if start_from is not None:
        auto, auto_source = load_automatic_model(start_from)
    if not isinstance(checkpoint, tuple):
        model, metadata = load_checkpoint(checkpoint, device="cpu")
    ds = load_dataset(dataset)
    start_classes: Optional[Dict[int, int]] = None
    if auto is not None:
        from engine.train.parent import class_mapping

        # {dataset value: automatic model value}, by name; background is not an object
        start_classes = {k: v for k, v in class_mapping(auto[1]["class_names"], ds.class_names).items() if k > 0}
        if not start_classes:
            # every object would start from an empty mask, the run no different from one without --start-from; it
            # said so only in a note after evaluating every case
            raise InteractionError(
                f"--start-from {auto_source}: the automatic model's classes {list(auto[1]['class_names'][1:])} share "
                f"no name with the dataset's {list(ds.class_names[1:])}, so no object would start from its mask; "
                "give a model trained on these classes (names are matched case-insensitively), or leave out "
                "--start-from")
    cases = [c for c in ds.cases if c.label is not None][: max_cases or None]
    if not cases:
        raise InteractionError(f"{ds.root}: no labelled cases to evaluate")
    from engine.inference import resolve_device

    resolve_device(device)  # a device that does not exist is refused before the report folder is made
    out = Path(out_dir)
    made = _folder_made_by(out)  # removed again when the run stops without a report (an error, Ctrl-C)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate_cases(model, metadata, source, ds, cases, out, prompt, max_interactions, device, progress,
                               cancel, auto, auto_source, start_classes, local_corrections)
    except BaseException:
        _remove_if_empty(made)
        raise


def _folder_made_by(out: Path) -> Optional[Path]:
    """The outermost folder of ``out`` (itself or a parent) that does not exist yet; None when ``out`` exists."""
    made = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        made = folder
    return made


def _remove_if_empty(folder: Optional[Path]) -> None:
    """Remove ``folder`` and the empty folders under it, only when it holds no file (never a user's files)."""
    if folder is None or not folder.is_dir():
        return
    try:
        if any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            return
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        folder.rmdir()
    except OSError:
        pass  # the error being reported matters more than an empty folder


def _case_problem(case_id: str, exc: Exception) -> InteractionError:
    """A case that cannot be read (NaN voxels, a label off the image's grid...) named, with the way out."""
    message = str(exc)
    return InteractionError(f"case {case_id}: {message}; fix the case's files or remove the case from the dataset, "
                            "then run again")


def _evaluate_cases(model: Any, metadata: Dict[str, Any], source: str, ds: Any, cases: Sequence[Any], out: Path,
                    prompt: str, max_interactions: int, device: str, progress: Optional[ProgressCallback],
                    cancel: Optional[CancelToken], auto: Optional[Tuple[Any, Dict[str, Any]]],
                    auto_source: Optional[str], start_classes: Optional[Dict[int, int]],
                    local_corrections: bool) -> Dict[str, Any]:
    """:func:`evaluate_interactive` once its inputs are checked and ``out`` exists: every case, then the files."""
    from engine.io import (VolumeError, check_finite_voxels, load_label, load_volume, write_json_atomic,
                           write_text_atomic)

    objects: List[Dict[str, Any]] = []
    per_case: Dict[str, Any] = {}
    without_objects: List[str] = []
    for i, case in enumerate(cases):
        check(cancel)
        report(progress, i, len(cases), f"case {case.case_id}")
        if len(case.image_files) != 1:
            raise InteractionError(f"case {case.case_id}: {len(case.image_files)} image channels; the interactive "
                                   "session takes one")
        try:
            image = load_volume(case.image_files[0])
            label = load_label(case.label, reference=image, class_ids=range(len(ds.class_names)))
            # a NaN voxel stopped the session with the file's name only, after the earlier cases had run
            check_finite_voxels(image.data, str(case.image_files[0]))
        except VolumeError as exc:
            raise _case_problem(case.case_id, exc) from None
        start_label = None
        if auto is not None:
            start_label = auto_labels(auto, image, device, modality=case.modality, cancel=cancel)
            if np.shape(start_label) != tuple(image.data.shape):
                raise InteractionError(f"case {case.case_id}: the automatic model {auto_source} gave a label map of "
                                       f"shape {np.shape(start_label)}, but {case.image_files[0]} is "
                                       f"{tuple(image.data.shape)}: the masks must lie on the volume's own grid")
        results = robot_session((model, metadata), image, label.data, prompt=prompt,
                                max_interactions=max_interactions, device=device, modality=case.modality,
                                class_names=ds.class_names, cancel=cancel, start_label=start_label,
                                start_classes=start_classes, local_corrections=local_corrections)
        for r in results:
            r["case"] = case.case_id
        if not results:
            without_objects.append(case.case_id)
        objects.extend(results)
        per_case[case.case_id] = summarize(results, max_interactions)
    report(progress, len(cases), len(cases), "done")
    if not objects:
        raise InteractionError(f"{ds.root}: the evaluated cases' label maps hold no object (all background)")
    result: Dict[str, Any] = {
        "format": REPORT_FORMAT,
        "checkpoint": source,
        "start_from": auto_source,
        "dataset": str(ds.root),
        "prompt": prompt,
        "local_corrections": bool(local_corrections),
        "max_interactions": int(max_interactions),
    }
    if auto is not None and start_classes is not None:
        auto_names = list(auto[1]["class_names"])
        result["start_from_classes"] = {name: auto_names[start_classes[i]] if i in start_classes else None
                                        for i, name in enumerate(ds.class_names) if i > 0}
        empty = [o for o in objects if o.get("start") == "empty"]
        result["started_empty"] = {"objects": len(empty),
                                   "classes": sorted({str(o["class_name"]) for o in empty})}
    result.update({"mean": summarize(objects, max_interactions), "cases": per_case,
                   "cases_without_objects": without_objects, "objects": objects})
    # the JSON last: its presence is what marks a report complete (the CLI keeps an existing one), so a run
    # stopped while writing the CSV or the plot leaves no report that looks finished beside stale or missing ones
    # (an earlier report being replaced goes first, for the same reason)
    (out / "interactive_report.json").unlink(missing_ok=True)
    write_text_atomic(out / "interactive_objects.csv", objects_csv(objects, max_interactions))
    plot_dice_curves(out / "dice_vs_interactions.png", objects, per_case, prompt,
                     start_from=Path(auto_source).name if auto_source else None)
    write_json_atomic(out / "interactive_report.json", result)
    return result


def objects_csv(objects: Sequence[Dict[str, Any]], max_interactions: int) -> str:
    """One row per object: case, class, voxels, NoC@80, NoC@85, NoC@90, initial Dice (of the mask it started
    from; empty when it started from nothing), Dice after each interaction."""
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "class_id", "class_name", "voxels", *NOC_KEYS, "initial_dice"]
                    + [f"dice_{k}" for k in range(1, max_interactions + 1)])
    for o in objects:
        initial = o.get("initial_dice")
        writer.writerow([o.get("case", ""), o["class_id"], o["class_name"], o["voxels"], *(o[k] for k in NOC_KEYS),
                         "" if initial is None else f"{initial:.4f}"]
                        + [f"{d:.4f}" for d in o["dice"]])
    return buf.getvalue()


def _curve(initial: Optional[float], dices: Sequence[float]) -> Tuple[List[int], List[float]]:
    """``(x, y)`` of a Dice curve: from interaction 0 (the starting mask) when there is an initial Dice."""
    if initial is None:
        return list(range(1, len(dices) + 1)), list(dices)
    return list(range(len(dices) + 1)), [float(initial)] + list(dices)


def plot_dice_curves(path: Path, objects: Sequence[Dict[str, Any]], per_case: Dict[str, Any], prompt: str,
                     start_from: Optional[str] = None) -> Path:
    """PNG of Dice vs interactions: each case's mean (thin) and the mean over all objects (thick).

    Objects that started from a mask (``initial_dice``) are drawn from interaction 0, the starting mask;
    ``start_from`` (the automatic model's name) titles the plot instead of ``prompt``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from engine.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for case_id, summary in per_case.items():
            ax.plot(*_curve(summary.get("mean_initial_dice"), summary["mean_dice_per_interaction"]),
                    color="0.7", linewidth=0.8)
        if objects:
            mean = np.mean([o["dice"] for o in objects], axis=0)
            initial = [o["initial_dice"] for o in objects if o.get("initial_dice") is not None]
            # from 0 only when every object has a starting Dice (mixing would shift half the curve)
            start = float(np.mean(initial)) if len(initial) == len(objects) else None
            ax.plot(*_curve(start, mean.tolist()), color="C0", linewidth=2.5, marker="o", label="mean over objects")
        for t in NOC_THRESHOLDS:
            ax.axhline(t, color="C3", linestyle=":", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # interactions are whole numbers
        ax.set_xlabel("interactions" if start_from is None else "corrective clicks (0: automatic mask)")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.set_title(f"robot user, first prompt: {prompt}" if start_from is None
                     else f"robot user correcting {start_from}")
        ax.legend(loc="lower right")
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def _print_progress(done: int, total: int, message: str) -> None:
    """One line per case on stderr: a CPU run takes about a minute for two hippocampus cases."""
    import sys

    if done < total:
        print(f"[{done + 1}/{total}] {message}", file=sys.stderr, flush=True)


def _cli(args: argparse.Namespace) -> int:
    if not args.overwrite:
        from engine.evaluation import refuse_existing_report

        refuse_existing_report([Path(args.out) / "interactive_report.json"])
    result = evaluate_interactive(args.checkpoint, args.dataset, args.out, prompt=args.prompts,
                                  max_interactions=args.max_interactions, device=args.device, max_cases=args.cases,
                                  start_from=args.start_from, local_corrections=args.local_corrections,
                                  progress=None if args.quiet else _print_progress)
    mean = result["mean"]
    initial = mean["mean_initial_dice"]
    start = "" if initial is None else f"Dice of the starting masks {initial:.3f}, "
    nocs = ", ".join(f"NoC@{k[3:]} {mean[f'mean_{k}']:.2f}" for k in NOC_KEYS)
    print(f"{mean['objects']} objects: {start}{nocs}, "
          f"Dice after {args.max_interactions} interactions {mean['mean_final_dice']:.3f}; report in {args.out}")
    blank = result.get("cases_without_objects") or []
    if blank:
        print(f"note: {len(blank)} case(s) have no object in their label map (all background), so the robot had "
              f"nothing to segment there: {', '.join(blank)}")
    empty = result.get("started_empty")
    if empty and empty["objects"]:
        print(f"note: {empty['objects']} object(s) of classes {empty['classes']} started from an empty mask: "
              f"{result['start_from']} has no class of that name")
    return 0


def _case_count(value: str) -> int:
    """``--cases N``; ``finetune --cases`` takes a case store folder, so a folder given here is sent to --dataset."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number: here --cases N evaluates only the first N cases; give a case store or "
            "dataset folder as --dataset (finetune's --cases takes the folder)") from None


def _interaction_count(value: str) -> int:
    """``--max-interactions N``: a whole number >= 1, refused by the parser under the option's own name."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give the interactions per object as a whole number >= 1 "
                                         "(e.g. 10)")
    return count


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome evaluate-interactive``."""
    p = subparsers.add_parser("evaluate-interactive", help="evaluate an interactive model with a robot user (NoC)",
                              description="For every object of every labelled case: a first prompt (or, with "
                                          "--start-from, an automatic model's mask), then corrective clicks at the "
                                          "largest error; Dice per interaction, NoC@80, NoC@85 and NoC@90.")
    p.add_argument("--checkpoint", required=True, help="interactive model .safetensors checkpoint")
    p.add_argument("--dataset", required=True, help="dataset folder (nnU-Net v2 raw, MSD or case store)")
    p.add_argument("--out", required=True, help="report folder (JSON, CSV, PNG)")
    p.add_argument("--prompts", default="point", choices=INITIAL_KINDS, help="first prompt kind (default point)")
    p.add_argument("--max-interactions", type=_interaction_count, default=10,
                   help="interactions per object (default 10)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--cases", type=_case_count, default=None, metavar="N", help="evaluate only the first N cases")
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (by default it is kept and nothing runs)")
    p.add_argument("--no-local-corrections", dest="local_corrections", action="store_false",
                   help="take the network's whole-window answer to every click (default: a click on an existing mask "
                        "only adds, or only removes, near the click, as in the session)")
    p.add_argument("--start-from", metavar="AUTO_CHECKPOINT", default=None,
                   help="an automatic (non-interactive) segmentation checkpoint: each case is segmented with it "
                        "first and each object starts from its mask of the class of the same name (empty when it "
                        "has none), then every interaction is a corrective click; reports the Dice of that start")
    p.set_defaults(func=_cli)
