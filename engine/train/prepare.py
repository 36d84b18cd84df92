"""What a run derives from its settings before the first step: the dataset, the split, the cached
cases, the network (new, or adapted from a parent), and the metadata its checkpoints carry."""
from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engine.checkpoint import modalities_seen, read_checkpoint_metadata
from engine.datasets import DATASET_JSON, DatasetError, load_dataset, problem_report, split_cases
from engine.io import VolumeError, is_nifti, is_reoriented, read_grid, write_json_atomic
from engine.networks import (build_network, dynunet_kernels_strides, encoder_parameters, in_channels_of,
                             network_spec, size_divisor)
from engine.preprocess import (Preprocessing, default_target_spacing, format_intensity_rule, normalize_modality,
                               oriented_spacing, parse_intensity_rule)
from engine.progress import CancelToken, ProgressCallback, check_before_result
from engine.train.config import CONFIG_FILE, RECIPES, RESUMABLE_CHANGES, SPLIT_FILE, TrainConfig, \
    TrainingDataError, train_defaults
from engine.train.distributed import DistInfo
from engine.train.parent import LoadedCheckpoint, load_parent, prepare_from_parent
from engine.train.patches import (CachedCase, case_problems, check_cases, constant_images_note, default_patch_size,
                                  preprocess_cases)
from engine.train.task import DEFAULT_TASK, TrainingTask, get_task


@dataclass
class RunSetup:
    """Everything a run derives from its config before the first step.

    ``class_names`` are the dataset's classes (label values); ``output_names`` name the network's
    outputs (the same for segmentation; e.g. background/foreground for a binary promptable task).
    ``modalities_seen``: every modality of the training (and replay) cases, plus the parent's
    (:func:`training_modalities`); written into the checkpoints.
    """

    model: nn.Module
    task: TrainingTask
    class_names: List[str]
    output_names: List[str]
    modality: str
    pp: Any
    patch_size: List[int]
    train_cases: List[CachedCase]
    val_cases: List[CachedCase]
    replay_cases: List[CachedCase]
    parent: Optional[Dict[str, Any]]
    trainable: List[nn.Parameter]
    modalities_seen: List[str] = field(default_factory=list)
    channel_names: List[str] = field(default_factory=list)


def training_modalities(cases: Sequence[Any], default: str, parent_meta: Optional[Dict[str, Any]] = None,
                        replay: Sequence[Any] = ()) -> List[str]:
    """The modalities a run's weights learn from, sorted: each training and replay case's own (a mixed
    dataset's entries or a case store's cases carry theirs; else ``default``, the dataset's), plus
    everything the parent checkpoint saw (:func:`engine.checkpoint.modalities_seen`: a fine-tune adds its
    data's modalities to its base's). Validation cases are not trained on and do not count."""
    seen = set(modalities_seen(parent_meta)) if parent_meta is not None else set()
    seen.update(normalize_modality(getattr(c, "modality", None) or default) for c in list(cases) + list(replay))
    return sorted(seen)


def output_names_for(class_names: Sequence[str], out_channels: int) -> List[str]:
    """Names of a task's network outputs: the classes when there is one output per class, else
    background/foreground for a binary output."""
    if out_channels == len(class_names):
        return list(class_names)
    if out_channels == 2:
        return ["background", "foreground"]
    raise ValueError(f"a task with {out_channels} outputs for classes {list(class_names)}: name its outputs "
                     "by having one per class or two (background, foreground)")


def split(cfg: TrainConfig, dataset: Any, run_dir: Path) -> Tuple[List[Any], List[Any]]:
    """The fixed train/validation split; read back from ``split.json`` when resuming (a fresh run's is written
    by :func:`write_run_files`, after preprocessing)."""
    by_id = {str(c.case_id): c for c in dataset.cases}
    split_path = run_dir / SPLIT_FILE
    if cfg.resume and split_path.exists():
        saved = json.loads(split_path.read_text())
        missing = [i for i in saved["train"] + saved["val"] if i not in by_id]
        if missing:
            raise TrainingDataError(f"{cfg.dataset}: cases {missing[:5]} of the run's split are gone; "
                                    "cannot resume on a changed dataset")
        return [by_id[i] for i in saved["train"]], [by_id[i] for i in saved["val"]]
    return split_cases(list(dataset.cases), cfg.val_fraction, cfg.seed)


def write_run_files(cfg: TrainConfig, run_dir: Path, train_ids: Sequence[str], val_ids: Sequence[str]) -> None:
    """Create the run folder with ``train_config.json`` and ``split.json`` (a fresh run; a resumed one keeps
    its own). Called once the data has been read and preprocessed and the network built, so a run refused
    for its data or settings leaves ``run_dir`` as it was."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        _record_new_places(cfg, run_dir)
        return
    write_json_atomic(run_dir / CONFIG_FILE, recorded_settings(cfg))
    write_json_atomic(run_dir / SPLIT_FILE, {"train": [str(i) for i in train_ids], "val": [str(i) for i in val_ids],
                                             "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                                             "dataset": _resolved(cfg.dataset)})


# The settings that name a file or folder. train_config.json records them absolute: recorded as typed ("store",
# "../parent.safetensors"), a resume started in another directory looked for them there and stopped at "not found".
PLACE_SETTINGS = ("dataset", "init_checkpoint", "replay")


def recorded_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """``cfg.to_dict()`` as ``train_config.json`` records it: the places (:data:`PLACE_SETTINGS`) made absolute."""
    settings = cfg.to_dict()
    for name in PLACE_SETTINGS:
        if settings.get(name):
            settings[name] = _resolved(settings[name])
    return settings


def start_directory(recorded_out: Any, run_dir: Any) -> Optional[Path]:
    """The directory a run was started in, from the ``out`` its ``train_config.json`` recorded as typed: a relative
    ``ft3`` (or ``runs/ft3``) recorded by the run folder ``/tmp/x/ft3`` (``/tmp/x/runs/ft3``) was typed in ``/tmp/x``,
    and so were the run's other relative paths. None when that cannot be told: an absolute ``out``, one that climbs
    (``../ft3``), or a run folder whose path does not end with it (the folder was moved or renamed)."""
    if not recorded_out:
        return None
    typed = Path(os.path.normpath(str(recorded_out)))
    if typed.is_absolute() or (typed.parts[:1] == ("..",)):
        return None
    parts = () if str(typed) == "." else typed.parts
    candidates = [Path(os.path.abspath(str(run_dir)))]
    try:
        candidates.append(Path(str(run_dir)).resolve())
    except (OSError, RuntimeError):  # pragma: no cover - a symlink loop
        pass
    for here in candidates:
        if not parts:
            return here
        if len(here.parts) > len(parts) and here.parts[-len(parts):] == parts:
            return Path(*here.parts[:-len(parts)])
    return None


def absolute_places(saved: Dict[str, Any], run_dir: Any) -> Tuple[Dict[str, Any], List[str]]:
    """A ``train_config.json``'s settings with its relative places made absolute. A run folder written before places
    were recorded absolute holds them as typed: they are resolved against the directory the run was started in
    (:func:`start_directory`).

    Returns:
        ``(settings, names)``: ``names`` are the places left relative because that directory cannot be told (a path
        relative to it, not to the current directory, which is all a caller can try).
    """
    out, unplaced = dict(saved), []
    relative = [name for name in PLACE_SETTINGS if saved.get(name) and not Path(str(saved[name])).is_absolute()]
    if not relative:
        return out, unplaced
    start = start_directory(saved.get("out"), run_dir)
    for name in relative:
        if start is None:
            unplaced.append(name)
        else:
            out[name] = _resolved(str(start / str(saved[name])))
    return out, unplaced


def _record_new_places(cfg: TrainConfig, run_dir: Path) -> None:
    """A resume accepted with a moved data folder or parent (:func:`check_resumable`) records the new places, so the
    next ``--resume --out R`` alone finds them (it read the old ones and stopped at "not found" again); a run that
    recorded its places relative (as typed, before they were recorded absolute) has them recorded absolute."""
    saved_path = run_dir / CONFIG_FILE
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    # check_resumable accepted each place: the same (perhaps typed otherwise) or the new one of a moved original
    now = recorded_settings(cfg)
    moved = {k: now[k] for k in PLACE_SETTINGS if now.get(k) and saved.get(k) != now[k]}
    if not moved:
        return
    write_json_atomic(saved_path, {**saved, **moved})
    split_path = run_dir / SPLIT_FILE
    if "dataset" in moved:
        try:
            split_saved = json.loads(split_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(split_saved, dict):
            write_json_atomic(split_path, {**split_saved, "dataset": moved["dataset"]})


def dataset_spacing(cases: Sequence[Any], orientation: str) -> Tuple[float, float, float]:
    """Median voxel spacing along the network axes, from file headers (no voxel data read)."""
    spacings = [oriented_spacing(read_grid(case.image_files[0])[1], orientation) for case in cases]
    return default_target_spacing(spacings, orientation)


def label_shape_problems(cases: Sequence[Any], where: str) -> List[str]:
    """One message per case whose label or image channels have another voxel shape than its first image (or whose
    header cannot be read), from the NIfTI headers alone (about 0.3 ms a file), so a wrong case fails before
    minutes of preprocessing. Other formats, and affines, values and NaN voxels, are checked when the cases are
    preprocessed (still before the run folder is written, :func:`write_run_files`)."""
    problems: List[str] = []
    for case in cases:
        files = [Path(p) for p in case.image_files] + [Path(case.label)]
        if not all(isinstance(p, Path) and p.is_file() and is_nifti(p) for p in files):
            continue
        try:
            grids = [read_grid(p) for p in files]
        except VolumeError as exc:
            problems.append(f"{where}: case {case.case_id}: {exc}")
            continue
        shapes = [shape for shape, _ in grids]
        image_grid = SimpleNamespace(shape=tuple(shapes[0]), affine=grids[0][1])
        for p, (shape, affine) in zip(files[1:], grids[1:]):
            is_label = p == files[-1]
            if is_label and is_reoriented(SimpleNamespace(shape=tuple(shape), affine=affine), image_grid):
                continue  # the image's voxels in another axis order: reoriented when the case is read
            if shape != shapes[0]:
                what = "label" if is_label else "image channel"
                problems.append(f"{where}: case {case.case_id}: {what} {p} has shape {shape}, image "
                                f"{files[0]} has {shapes[0]}; they must lie on one voxel grid")
    return problems


class DatasetProblems(TrainingDataError, DatasetError):
    """The problems of a training dataset's cases, in one error: a :class:`DatasetError` (missing files, entries that
    cannot be used, as :func:`load_dataset` refuses them) and a :class:`TrainingDataError` (labels or channels on
    another voxel shape) at once, since its list may hold both kinds and callers catch either."""


def training_dataset(path: str, allow_outside: bool = False) -> Any:
    """The dataset at ``path`` after the checks that need no voxel data: every case's files there, labelled,
    their headers readable and on one voxel shape. Every problem found is named in one error, as
    ``mambahome dataset`` lists them; label values and NaN voxels are checked, all cases in one error too, when
    the cases are preprocessed (:func:`setup_run`).

    Raises:
        DatasetProblems: the problems found (one line each, the first
            :data:`engine.datasets.MAX_PROBLEMS_SHOWN`); a DatasetError and a TrainingDataError.
        DatasetError: a folder that is no dataset, or a ``dataset.json`` that cannot be used as a whole.
    """
    root = str(_dataset_root(path))  # the heading of the list, and the prefix its lines drop
    problems: List[str] = []
    dataset = load_dataset(path, allow_outside=allow_outside, problems=problems)
    problems += case_problems(dataset.cases, root) + label_shape_problems(dataset.cases, root)
    if problems:
        raise DatasetProblems(problem_report(root, problems))
    if not dataset.cases:
        raise TrainingDataError(f"{root}: the dataset has no labelled cases")
    return dataset


def _dataset_root(path: str) -> Path:
    p = Path(path)
    return p.parent if p.name == DATASET_JSON and p.is_file() else p


def load_training_dataset(cfg: TrainConfig, parent_loaded: bool = False) -> Any:
    """The dataset, checked before the run folder is created (a typo must not leave a run behind).

    Args:
        parent_loaded: the parent checkpoint is already in memory (not read again here).
    """
    dataset = training_dataset(cfg.dataset, allow_outside=cfg.allow_outside_dataset)
    if len(dataset.class_names) < 2:
        raise TrainingDataError(f"{cfg.dataset}: needs background and at least one class, "
                                f"got {list(dataset.class_names)}")
    if cfg.init_checkpoint and not parent_loaded:
        read_checkpoint_metadata(cfg.init_checkpoint)
    return dataset


def warm_starts_another_task(cfg: TrainConfig, parent_task: Optional[Dict[str, Any]]) -> bool:
    """True when a segmentation parent starts a run of another task (e.g. an automatic model's weights
    warm-starting an interactive model): the run then takes ``cfg.task`` and its options, not the parent's."""
    parent_name = DEFAULT_TASK if parent_task is None else str(parent_task.get("name", DEFAULT_TASK))
    return parent_name == DEFAULT_TASK and cfg.task != DEFAULT_TASK


def resolve_task(cfg: TrainConfig, parent_task: Optional[Dict[str, Any]]) -> TrainingTask:
    """The run's task: the parent's when fine-tuning a checkpoint that names one, else ``cfg.task``
    (also when a segmentation parent warm-starts another task, :func:`warm_starts_another_task`).

    Raises:
        ValueError: ``cfg.task`` names another task than the parent's (a segmentation parent aside).
    """
    if parent_task is None or warm_starts_another_task(cfg, parent_task):
        # a task that runs validation sessions (the interactive one) opens them at the training patch, with
        # or without other task options: the run's patch size travels to it either way
        options = {"patch_size": list(cfg.patch_size)} if cfg.patch_size else {}
        if not cfg.task_options and (not options or cfg.task == DEFAULT_TASK):
            return get_task(cfg.task)
        return get_task({**options, **cfg.task_options, "name": cfg.task})
    if cfg.task_options:
        raise ValueError(f"{cfg.init_checkpoint}: fine-tuning keeps the parent's task settings; task options "
                         f"{sorted(cfg.task_options)} apply to a fresh run")
    name = str(parent_task.get("name", DEFAULT_TASK))
    if cfg.task not in (DEFAULT_TASK, name):
        raise ValueError(f"{cfg.init_checkpoint} was trained for task {name!r}; fine-tuning keeps it "
                         f"(asked for {cfg.task!r})")
    return get_task(parent_task)


NOTHING_TRAINED = ("stopped before the first training step finished: nothing was trained, so there is no model to "
                   "keep")
"""The :class:`engine.progress.NothingToKeep` of a run asked to stop before its first step (preparing its cases, or
at that step's boundary): the starting weights saved as the run's model would pass the parent (or the resumed
checkpoint) off as a new version."""


def check_run_start(cancel: Optional[CancelToken]) -> None:
    """Between the phases before a run's first step (dataset scan, parent, cases, network): a cancel or a stop ends
    the run here, nothing written (:func:`engine.progress.check_before_result`)."""
    check_before_result(cancel, NOTHING_TRAINED)


def _preprocess(refs: Sequence[Any], kind: str, pp: Any, class_ids: Sequence[int], label_map: Any,
                progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
                problems: Optional[List[str]] = None, constant: Optional[List[str]] = None) -> List[CachedCase]:
    """:func:`preprocess_cases` of one kind of case (``training``, ``validation``, ``replay``), each message naming
    its case.

    None of a kind (fewer than 6 cases hold none out for validation) says nothing: "preprocessing validation case"
    told the annotator of validation that did not happen. preprocess_cases ends with its bare ``what`` once all are
    done, which read as a case message that forgot the case; it becomes a count of what was done. That message still
    starts with "preprocessing" and counts ``n/n``: the server reads such a message at its end as "before training
    started", the Fine-tune section shows a counted message as it is.

    A cancel or a stop is taken before each case (:func:`check_run_start`): a stop asked while 50 large cases were
    prepared was seen only at the first step, minutes later, to end with nothing all the same. ``constant`` collects
    the blank images' case ids for the run's one message (:func:`engine.train.patches.constant_images_note`).
    """
    if not refs:
        return []
    what = f"preprocessing {kind} case"

    def named(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress(done, total, f"preprocessing {kind} cases: {total}/{total} done" if message == what else message)

    return preprocess_cases(refs, pp, class_ids, label_map, named if progress is not None else None, cancel, what,
                            problems, stop_message=NOTHING_TRAINED, constant=constant)


def setup_run(cfg: TrainConfig, dataset: Any, run_dir: Path, dinfo: DistInfo, device: torch.device,
              progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
              parent_checkpoint: Optional[LoadedCheckpoint] = None) -> RunSetup:
    """Split, preprocess and build (or adapt) the network on ``device``.

    Args:
        parent_checkpoint: the loaded ``(model, metadata)`` of ``cfg.init_checkpoint``, if the caller
            has it (else the file is read here, once).
    """
    class_names = list(dataset.class_names)
    image_channels = max(len(dataset.channel_names or ()), 1)
    # the input channels' names, in the network's order (checkpoint metadata: info and predict name them)
    channel_names = [str(n) for n in dataset.channel_names or ()]
    parent: Optional[Dict[str, Any]] = None
    parent_meta: Optional[Dict[str, Any]] = None
    replay_cases: List[CachedCase] = []
    replay_refs: List[Any] = []
    blank: List[str] = []  # the cases with a blank image, said once for the run (constant_images_note)

    train_refs, val_refs = split(cfg, dataset, run_dir)
    if cfg.val_fraction > 0 and not val_refs and not cfg.resume and dinfo.main:
        # a 1-case dataset at --val-fraction 0.2 trained without validation and said nothing: best = last
        warnings.warn(f"{cfg.dataset}: {len(train_refs)} case(s), all kept for training (at least one must train), so "
                      f"--val-fraction {cfg.val_fraction:g} leaves none for validation: the run is not validated "
                      "and best.safetensors is the last step's model", stacklevel=2)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every rerun
    if cfg.init_checkpoint:
        loaded = parent_checkpoint or load_parent(cfg.init_checkpoint)
        check_run_start(cancel)
        if cfg.resume:
            check_parent_unchanged(cfg, run_dir, loaded[1])
        task = resolve_task(cfg, loaded[1].get("task"))
        in_channels, out_channels = task.network_channels(image_channels, class_names)
        output_names = output_names_for(class_names, out_channels)
        parent_setup = prepare_from_parent(loaded, dataset, modality=cfg.modality, patch_size=cfg.patch_size,
                                           in_channels=in_channels, output_names=output_names,
                                           widen_inputs=warm_starts_another_task(cfg, loaded[1].get("task")))
        model, pp, patch_size = parent_setup.model, parent_setup.preprocessing, parent_setup.patch_size
        modality, parent = parent_setup.modality, parent_setup.parent
        if cfg.intensity is not None and cfg.intensity != format_intensity_rule(pp.intensity_for(modality)):
            # the parent's weights learnt its rule's scale: another rule would feed them other values
            raise ValueError(f"intensity rule {cfg.intensity} differs from the one {cfg.init_checkpoint} was "
                             f"trained with for {modality} ({format_intensity_rule(pp.intensity_for(modality))}); "
                             "fine-tuning keeps the parent's rule: leave the intensity setting out")
        channel_names = parent_setup.channel_names  # the parent's order (inherited_channel_names)
        parent_meta = loaded[1]
        if cfg.replay:
            replay_ds = load_dataset(cfg.replay, allow_outside=cfg.allow_outside_dataset)
            check_cases(replay_ds.cases, cfg.replay)
            replay_refs = list(replay_ds.cases)  # load_dataset gives every case its modality
            label_map = parent_setup.label_map_for(list(replay_ds.class_names), cfg.replay)
            replay_cases = _preprocess(replay_ds.cases, "replay", pp, range(len(replay_ds.class_names)), label_map,
                                       progress, cancel, constant=blank)
    else:
        task = resolve_task(cfg, None)
        in_channels, out_channels = task.network_channels(image_channels, class_names)
        output_names = output_names_for(class_names, out_channels)
        modality = normalize_modality(cfg.modality or dataset.modality)
        if (cfg.modality and dataset.modality and modality != normalize_modality(dataset.modality) and dinfo.main
                and not cfg.resume):
            # accepted (the dataset may be mislabelled), never silently: only a later predict said it
            warnings.warn(f"{cfg.dataset}: --modality {modality} differs from the dataset's "
                          f"{normalize_modality(dataset.modality)}: each case keeps its own modality's intensity rule "
                          f"in training, and {modality} becomes the model's default, so an image that names no "
                          f"modality is normalised as {modality} at inference", stacklevel=2)
        spacing = cfg.target_spacing or dataset_spacing(dataset.cases, "RAS")
        pp = Preprocessing.for_modality(modality, target_spacing=spacing)
        if cfg.intensity is not None:
            pp = Preprocessing.from_dict({**pp.to_dict(), "intensity": {**pp.intensity,
                                                                        modality: parse_intensity_rule(cfg.intensity)}})
            others: Dict[str, int] = {}
            for ref in list(train_refs) + list(val_refs):
                kind = normalize_modality(getattr(ref, "modality", None) or modality)
                if kind != modality:
                    others[kind] = others.get(kind, 0) + 1
            if others and dinfo.main and not cfg.resume:
                # one rule per modality: the cases of another modality would keep theirs without a word
                kept = "; ".join(f"{n} {kind} case(s) keep {format_intensity_rule(pp.intensity_for(kind))}"
                                 for kind, n in sorted(others.items()))
                warnings.warn(f"{cfg.dataset}: --intensity {cfg.intensity} is the rule of the model's modality "
                              f"({modality}) only; {kept} (their modality's rule; --modality picks the model's)",
                              stacklevel=2)
        patch_size = list(cfg.patch_size) if cfg.patch_size else None
        model = None
        if patch_size and cfg.network == "mambahome":
            # its divisor needs no network built: said before every case is preprocessed (minutes on a large
            # dataset), not after, as the other networks' is below
            from engine.model import MambaHoME

            divisor = (int(getattr(MambaHoME, "size_divisor", 16)),) * 3
            if any(p % d for p, d in zip(patch_size, divisor)):
                raise ValueError(f"patch size {patch_size} must be a multiple of {divisor} for {cfg.network}")
    class_ids = list(range(len(class_names)))
    # every case is read before a refusal, so one run names every case whose voxels are unusable (NaN voxels in
    # one, label values past the classes in another), as `mambahome dataset` does
    problems: List[str] = []
    train_cases = _preprocess(train_refs, "training", pp, class_ids, None, progress, cancel, problems, blank)
    val_cases = _preprocess(val_refs, "validation", pp, class_ids, None, progress, cancel, problems, blank)
    problems += [f"case {c.case_id} has {c.image.shape[0]} channel(s), the dataset declares {image_channels} "
                 f"({dataset.channel_names})" for c in train_cases + val_cases if c.image.shape[0] != image_channels]
    if problems:
        root = str(_dataset_root(str(cfg.dataset)))
        raise TrainingDataError(problem_report(root, [f"{root}: {m}" for m in problems],
                                               f"problem(s) in {len(train_refs) + len(val_refs)} case(s)"))
    if blank and dinfo.main:
        read = len(train_refs) + len(val_refs) + len(replay_refs)
        warnings.warn(f"{cfg.dataset}: {constant_images_note(blank, read)}", stacklevel=2)
    if train_cases and not cfg.init_checkpoint and not any(bool(c.label.any()) for c in train_cases + replay_cases):
        # `mambahome dataset` refuses such a folder; training on it ran every step and handed on a model that
        # learnt only background (labels exported before annotation, or the wrong label folder). Fine-tuning a
        # parent on cases that are all background (false positives erased) is a correction, and allowed
        raise TrainingDataError(f"{cfg.dataset}: every label map of the {len(train_cases)} training case(s) is "
                                "empty (all 0, background); nothing to learn - check that the label files hold the "
                                "annotations")
    if model is None:
        if patch_size is None:
            # 16 suits every network here (DynUNet derives its strides from the patch afterwards).
            probe = 32 if cfg.network == "swinunetr" else 16
            patch_size = default_patch_size([c.image.shape[1:] for c in train_cases], (probe,) * 3,
                                            minimum=(2 * probe,) * 3 if cfg.network == "swinunetr" else None)
            if all(p <= probe for p in patch_size):
                # one step per axis leaves a single bottleneck voxel, which instance norm refuses
                # ("Expected more than 1 spatial element"); the crops are zero-padded to the patch
                patch_size = [2 * probe] * 3
        extra = {"patch_size": patch_size, "spacing": pp.target_spacing} if cfg.network == "dynunet" else {}
        if cfg.deep_supervision:
            extra.update(deep_supervision_kwargs(cfg, patch_size, pp.target_spacing))
        model = build_network(cfg.network, in_channels, out_channels, cfg.preset,
                              **{**extra, **cfg.network_overrides})
    if in_channels_of(model) != in_channels:
        raise TrainingDataError(f"{cfg.dataset} has {image_channels} channel(s) {dataset.channel_names} but the "
                                f"network {'of ' + str(cfg.init_checkpoint) if cfg.init_checkpoint else ''} takes "
                                f"{in_channels_of(model)}")
    divisor = size_divisor(model)
    bad = [p for p, d in zip(patch_size, divisor) if p % d]
    if bad:
        raise ValueError(f"patch size {patch_size} must be a multiple of {divisor} for {cfg.network}")
    if network_spec(model)["name"] != "segresnet" and all(p <= d for p, d in zip(patch_size, divisor)):
        # a one-voxel bottleneck: instance norm (SegResNet's is group norm) refused it only at the first step,
        # after the preprocessing, with a traceback ("Expected more than 1 spatial element when training")
        raise ValueError(f"patch size {patch_size} leaves {cfg.network}'s bottleneck a single voxel: give at least "
                         f"one axis twice the divisor {divisor} (e.g. --patch-size "
                         f"{' '.join(str(2 * d) for d in divisor)})")
    # Every modality the run saw is written into the checkpoint's preprocessing.
    for m in sorted({normalize_modality(c.modality or modality) for c in list(train_refs) + list(val_refs)}):
        pp.intensity.setdefault(m, pp.intensity_for(m))
    pp.modality = modality
    seen = training_modalities(train_refs, modality, parent_meta, replay_refs)
    model.to(device)
    if cfg.freeze_encoder:
        for p in encoder_parameters(model):
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_run_start(cancel)  # asked while the network was built or adapted: nothing written yet
    return RunSetup(model=model, task=task, class_names=class_names, output_names=output_names, modality=modality,
                    pp=pp, patch_size=list(patch_size), train_cases=train_cases, val_cases=val_cases,
                    replay_cases=replay_cases, parent=parent, trainable=trainable, modalities_seen=seen,
                    channel_names=list(channel_names) if len(channel_names) == image_channels else [])


def deep_supervision_kwargs(cfg: TrainConfig, patch_size: Sequence[int],
                            spacing: Sequence[float]) -> Dict[str, Any]:
    """The network's deep-supervision arguments: DynUNet (MONAI) supervises every decoder level but the
    lowest; Mamba-HoME its 1/2 and 1/4 resolution decoder outputs (the 1/8 one is a few voxels across at
    the patches this runs at; ``ModelConfig.deep_supervision = 3`` through an override takes it too).

    Raises:
        ValueError: another network, or a DynUNet patch with too few levels.
    """
    if cfg.network == "mambahome":
        return {"deep_supervision": 2}
    if cfg.network != "dynunet":
        raise ValueError(f"deep_supervision applies to DynUNet and Mamba-HoME, not {cfg.network}")
    _, strides = dynunet_kernels_strides(patch_size, spacing)
    levels = len(strides) - 2  # MONAI: fewer than the decoder's upsampling layers (len(strides) - 1)
    if levels < 1:
        raise ValueError(f"deep_supervision needs a DynUNet of at least 3 levels; the patch {list(patch_size)} "
                         f"gives {len(strides)}")
    return {"deep_supervision": True, "deep_supr_num": levels}


def check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume with settings that change the data stream or the optimisation. A data folder given in
    another place is accepted when the run's own is gone (moved): the split's cases must then be in it.

    Raises:
        ValueError: no saved config, or changed settings (the message lists them).
    """
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        raise ValueError(f"{run_dir}: no {CONFIG_FILE}; nothing to resume")
    saved, _ = absolute_places(json.loads(saved_path.read_text()), run_dir)
    defaults = train_defaults()  # a setting added since the run was saved had its default then
    if "recipe" not in saved:  # saved before recipes existed: it ran what the paper recipe is now
        defaults.update({**RECIPES["paper"], "recipe": "paper"})
    now = cfg.to_dict()
    # "out" is not compared: the settings are the ones this folder holds, wherever it is now (a relative --out
    # typed in another directory, or a run folder moved, is still this run)
    changed = {k: (saved.get(k, defaults.get(k)), now[k]) for k in now
               if k not in RESUMABLE_CHANGES and k not in ("command", "out") and saved.get(k, defaults.get(k)) != now[k]
               and not (k in PLACE_SETTINGS and _same_path(saved.get(k), now[k]))
               and not (k == "dataset" and _moved(saved.get(k), now[k]))
               and not (k == "init_checkpoint" and _moved(saved.get(k), now[k], is_file=True))}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{run_dir}: cannot resume with different settings ({diff})")


def _moved(saved: Any, now: Any, is_file: bool = False) -> bool:
    """Whether the run's data folder ``saved`` is gone and ``now`` is another existing folder: the folder was moved
    (a case store carried to another disk), so the resume reads it there; :func:`split` then refuses it unless every
    case of the run's split is in it. ``is_file``: the same for the parent checkpoint, which
    :func:`check_parent_unchanged` then refuses unless it is the same file (SHA-256)."""
    try:
        return (saved is not None and now is not None and not Path(str(saved)).exists()
                and (Path(str(now)).is_file() if is_file else Path(str(now)).is_dir()))
    except (OSError, RuntimeError):
        return False


def recorded_parent(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The parent record (``path``, ``sha256``...) of the run in ``run_dir``: its resume state's (runs saved since it
    was recorded there), else its ``last``/``best`` checkpoint's; None when neither says."""
    from engine.train.config import BEST_FILE, LAST_FILE, RESUME_FILE
    from engine.train.resume import read_resume_info

    try:
        parent = read_resume_info(run_dir / RESUME_FILE).get("parent")
    except ValueError:
        parent = None
    if isinstance(parent, dict) and parent.get("sha256"):
        return parent
    for name in (LAST_FILE, BEST_FILE):
        try:
            parent = read_checkpoint_metadata(run_dir / name).get("parent")
        except ValueError:  # CheckpointError: missing or unreadable
            continue
        if isinstance(parent, dict) and parent.get("sha256"):
            return parent
    return None


def check_parent_unchanged(cfg: TrainConfig, run_dir: Path, parent_meta: Dict[str, Any]) -> None:
    """A resumed run must go on from the parent it started from: refuse a parent file of another SHA-256 (a file
    replaced in its place, or another file given for a moved one), and a moved one that cannot be checked.

    Raises:
        ValueError: the message names both files.
    """
    from engine.checkpoint import SOURCE_KEY

    source = parent_meta.get(SOURCE_KEY) or {}
    recorded = recorded_parent(run_dir)
    if recorded is None:
        saved = _saved_init_checkpoint(run_dir)
        if saved is not None and not _same_path(saved, cfg.init_checkpoint):
            raise ValueError(f"{run_dir}: the run records no SHA-256 of its parent {saved}, so "
                             f"{cfg.init_checkpoint} cannot be checked to be the same file; put the parent back "
                             "in its place to resume")
        return
    if source.get("sha256") != recorded["sha256"]:
        raise ValueError(f"{cfg.init_checkpoint} is not the run's parent checkpoint: its SHA-256 is "
                         f"{str(source.get('sha256'))[:16]}..., the run's parent ({recorded.get('path')}) had "
                         f"{str(recorded['sha256'])[:16]}...; resume with the same parent file")


def _saved_init_checkpoint(run_dir: Path) -> Optional[str]:
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return absolute_places(saved, run_dir)[0].get("init_checkpoint") if isinstance(saved, dict) else None


def _same_path(a: Any, b: Any) -> bool:
    """Whether two paths name the same file or folder (``runs/r1`` and ``runs/r1/`` or its absolute path)."""
    try:
        return a is not None and b is not None and Path(str(a)).resolve() == Path(str(b)).resolve()
    except (OSError, RuntimeError):
        return False


def checkpoint_metadata(cfg: TrainConfig, s: RunSetup, step: int, elapsed: float, val_dice: Optional[float],
                        run_name: str) -> Dict[str, Any]:
    """The JSON metadata of the run's checkpoints (classes, preprocessing, task, parent, provenance)."""
    return {
        "class_names": list(s.output_names),
        "modality": s.modality,
        "modalities_seen": list(s.modalities_seen or [s.modality]),
        "preprocessing": s.pp.to_dict(),
        "channel_names": list(s.channel_names),
        "patch_size": list(s.patch_size),
        "version": f"{run_name}-step{step}",
        "parent": s.parent,
        "cases": [c.case_id for c in s.train_cases],
        "network": network_spec(s.model),
        "task": s.task.metadata(),
        "provenance": {
            "command": cfg.command or "engine.train.train",
            # resolved, as the parent's path is: "data/hippo" typed in another folder tells a reader of the
            # checkpoint nothing about where the data was
            "dataset": _resolved(cfg.dataset),
            "replay": _resolved(cfg.replay),
            "steps": step,
            "seconds": round(elapsed, 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "val_dice": val_dice,
            "val_cases": [c.case_id for c in s.val_cases],
            "train_config": cfg.to_dict(),
        },
    }


def _resolved(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute, symlinks followed (None stays None)."""
    if path is None:
        return None
    try:
        return str(Path(str(path)).resolve())
    except (OSError, RuntimeError):  # a symlink loop: absolute is still better than relative
        return str(Path(str(path)).absolute())
