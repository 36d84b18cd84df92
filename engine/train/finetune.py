"""Fine-tuning: a :class:`~engine.train.config.TrainConfig` started from a parent checkpoint, then the loop.

Everything specific to having a parent (classes mapped by name, the head adapted, provenance) is in
:mod:`engine.train.parent`; this module only turns ``(checkpoint, data, out, settings)`` into a run.
The parent is read once: a path is loaded here and the loaded ``(model, metadata)`` travels on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from engine.progress import CancelToken, ProgressCallback
from engine.train import loop
from engine.train.config import FINETUNE_DEFAULTS, RunResult, TrainConfig, setting_names
from engine.train.parent import LoadedCheckpoint, load_parent
from engine.train.prepare import check_run_start, resolve_task
from engine.train.task import DEFAULT_TASK, check_task_name

PathLike = Union[str, os.PathLike]


def _data_root(data: Any) -> str:
    """A dataset folder, or a case store (an object with ``root``), as the path load_dataset reads."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    return str(data.root)


def finetune_config(parent_path: PathLike, data: Any, out_dir: PathLike, parent_meta: Optional[dict] = None,
                    **settings: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a fine-tuning run: the fine-tuning defaults
    (:data:`engine.train.config.FINETUNE_DEFAULTS`), then ``settings``.

    The task is ``settings["task"]`` when given (not None), else the parent's: an automatic parent with
    ``task="interactive"`` warm-starts a promptable model (:func:`engine.train.prepare.warm_starts_another_task`);
    a promptable parent asked for another task is refused here (and, without ``parent_meta``, when the run is
    set up: :func:`engine.train.prepare.resolve_task`).

    Args:
        parent_path: the parent checkpoint file (recorded as ``init_checkpoint``).
        data: dataset folder, case-store folder, or a :class:`engine.cases.CaseStore`.
        out_dir: the run folder.
        parent_meta: the parent's metadata (its ``task`` is the default task).
        **settings: :class:`TrainConfig` fields.

    Returns:
        The run's :class:`TrainConfig`.

    Raises:
        TypeError: a setting that is not a :class:`TrainConfig` field.
    """
    unknown = sorted(set(settings) - set(setting_names()))
    if unknown:
        raise TypeError(f"finetune() got unknown settings {unknown}; settings are TrainConfig fields")
    # None means "not given" (a recipe setting left to the recipe): it must not hide a fine-tuning default
    defaults = dict(FINETUNE_DEFAULTS)
    if settings.get("max_minutes") is not None:
        defaults.pop("steps")  # a time budget alone: TrainConfig lets it run as long as the budget allows
    values = {**defaults, **{k: v for k, v in settings.items() if v is not None or k not in defaults}}
    if not values.get("replay"):
        values["replay_fraction"] = 0.0
    if values.get("patch_size") is not None:
        values["patch_size"] = list(values["patch_size"])
    # not given (None): the parent's task, so train_config.json says what the run trains. Asked for, it must be
    # one the parent can take: an automatic parent may warm-start another task, a promptable one keeps its own
    parent_task = (str(parent_meta["task"].get("name", DEFAULT_TASK))
                   if parent_meta is not None and isinstance(parent_meta.get("task"), dict) else None)
    asked = values.pop("task", None)
    if asked is not None and parent_task not in (None, DEFAULT_TASK, asked):
        raise ValueError(f"{parent_path} was trained for task {parent_task!r}; fine-tuning keeps it (asked for "
                         f"{asked!r}: fine-tune an automatic checkpoint, or train a new model with mambahome train)")
    if asked is not None or parent_task is not None:
        values["task"] = asked if asked is not None else parent_task
    network = parent_meta.get("network") if parent_meta is not None else None
    if isinstance(network, dict) and network.get("name"):
        # the run builds the parent's network: its settings say so (they said preset "small", the default, for
        # the tiny bundled model's fine-tunes)
        from engine.config import ModelConfig

        values["network"] = str(network["name"])
        size = ModelConfig.preset_of(network.get("config") or {}) if network["name"] == "mambahome" else None
        if size is not None:
            values["preset"] = size
    values["command"] = values.get("command") or "engine.train.finetune.finetune"
    values["replay"] = str(values["replay"]) if values.get("replay") else None
    return TrainConfig(dataset=_data_root(data), out=str(out_dir), init_checkpoint=str(parent_path), **values)


def finetune(checkpoint: Union[PathLike, LoadedCheckpoint], data: Any, out_dir: PathLike, *,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
             on_log: Optional[loop.LogCallback] = None, **settings: Any) -> RunResult:
    """Fine-tune a checkpoint on a dataset folder or case store into a new model version in ``out_dir``.

    Args:
        checkpoint: the parent: a ``.safetensors`` path (read once, never written), or the
            ``(model, metadata)`` that :func:`engine.checkpoint.load_checkpoint` returned for it.
        data: dataset folder, case-store folder, or a :class:`engine.cases.CaseStore`.
        out_dir: new run folder (``best.safetensors`` / ``last.safetensors`` are the new versions).
        progress, cancel, on_log: as :func:`engine.train.loop.train`; a cancelled run leaves the parent
            untouched and only complete files in ``out_dir``. ``cancel.request_stop()``
            (:class:`engine.progress.CancelToken`) ends the run early and keeps it, as a spent ``max_minutes``
            would: the model of the step under way is validated, saved and returned with
            ``RunResult.stopped_on_request`` (asked during a validation: that validated model, no further step). Asked
            before the first step (reading the parent, scanning or preprocessing the cases, before each case):
            :class:`engine.progress.NothingToKeep`, a :class:`engine.progress.Cancelled`; nothing to keep.
        **settings: :class:`TrainConfig` fields (``steps``, ``lr``, ``freeze_encoder``, ``replay``,
            ``max_minutes``, ``cuda_graphs``...); defaults are :func:`engine.train.config.finetune_defaults`.
            ``replay_fraction`` applies only with ``replay``. The task is the parent's, except that
            ``task="interactive"`` on an automatic (segmentation) parent makes a promptable model from it: the
            parent's weights with zero-initialised guidance channels, trained with simulated clicks (the
            interactive task's default options, or ``task_options``). An interactive parent keeps its task.

    Returns:
        :class:`engine.train.config.RunResult`.

    Raises:
        engine.checkpoint.CheckpointError: an unreadable parent (before anything is written).
        ValueError: ``out_dir`` would overwrite the parent; another task (or task options) asked of an
            interactive parent (before anything is written).
    """
    if settings.get("task") is not None:
        check_task_name(settings["task"])  # before the parent is read: "bogus" is no task, whatever the parent's
    check_run_start(cancel)  # a stop or cancel asked before the start: reading a large parent takes seconds
    model, meta = load_parent(checkpoint)
    parent = Path(meta["source"]["path"])
    out = Path(out_dir)
    if parent.parent == out.resolve() and parent.name in ("best.safetensors", "last.safetensors"):
        raise ValueError(f"{out}: the fine-tuning run would overwrite its parent {parent}; choose another --out")
    cfg = finetune_config(parent, data, out, meta, **settings)
    resolve_task(cfg, meta.get("task"))  # a task the parent cannot take is refused before the run folder exists
    return loop.train(cfg, progress=progress, cancel=cancel, on_log=on_log, parent=(model, meta))
