"""The training loop: single process or torchrun DDP, exact resume, logs, plots, checkpoints.

``train(TrainConfig)`` is the only training loop of the product; fine-tuning
(:mod:`engine.train.finetune`) is ``train`` started from a parent checkpoint, and a task
(:mod:`engine.train.task`) decides what each step feeds the network.

What one run does:

1. reads the dataset (:func:`engine.datasets.load_dataset`), splits it into train/validation once
   (recorded in ``split.json``);
2. preprocesses every case once into memory (:func:`engine.preprocess.eval_transforms`: RAS,
   target spacing, per-modality intensity) so small datasets train fast;
3. draws patches with the random tail of :func:`engine.preprocess.train_transforms` (and the task's
   optional per-patch ``sample_transform``, in the data workers); the stream is a pure function of the
   step (:mod:`engine.train.patches`);
4. optimises MONAI ``DiceCELoss`` (``--loss``: as it comes, or nnU-Net's) with the recipe's optimiser,
   learning rate (a pure function of the progress, :mod:`engine.train.schedule`) and gradient clipping,
   optionally under bfloat16 autocast and CUDA graphs (:mod:`engine.train.step`);
5. every ``val_every`` steps: validation (:mod:`engine.train.validation`, or the task's own score),
   ``last``/``best`` checkpoints (:func:`engine.checkpoint.save_checkpoint`, atomic) and the resume
   state (:mod:`engine.train.resume`);
6. logs every step to ``log.jsonl`` and ``log.csv`` and draws ``curves.png``.

The loop never waits for the GPU within a step: a step whose loss or gradients are not finite is skipped on
the device, and so is every later one (:class:`engine.train.guard.StepGuard`), and the losses are read a
batch of steps at a time (at validation, checkpoints, the end, a cancel, and at least every
``READ_EVERY_STEPS`` steps or ``READ_EVERY_SECONDS``), where a non-finite one raises ``FloatingPointError``
naming the first such step, with the weights from before it.

Run folder layout: ``train_config.json``, ``split.json``, ``log.jsonl``, ``log.csv``, ``curves.png``,
``best.safetensors``, ``last.safetensors``, and ``resume.safetensors`` while the run can still be
continued (cancelled, crashed, stopped by its time budget or on request; a run that completed its steps removes it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.checkpoint import read_checkpoint_metadata, save_checkpoint
from engine.model import compile_regions, compiled_regions, decompile_regions
from engine.model.compiled import compile_cache_is_warm, compile_cache_key, mark_compile_cache_warm
from engine.progress import Cancelled, CancelToken, NothingToKeep, ProgressCallback, report, stop_requested
from engine.train.average import WeightAverage
from engine.train.config import (BEST_FILE, CONFIG_FILE, LAST_FILE, PLOT_FILE, RESUME_FILE, TIME_BUDGET_STEPS,
                                 RunResult, TrainConfig, resolve_for_device)
from engine.train.distributed import DistInfo, all_mean, any_rank, any_rank_flags, barrier, init_distributed
from engine.train.guard import StepGuard
from engine.train.parent import LoadedCheckpoint
from engine.train.patches import PatchStream, StepBatches, augmentation_tail, data_workers, derive_seed
from engine.train.prepare import (NOTHING_TRAINED, RunSetup, check_resumable, check_run_start, checkpoint_metadata,
                                  load_training_dataset, setup_run, write_run_files)
from engine.train.resume import (load_resume_state, optimizer_from_flat, read_resume_info, save_resume_state,
                                 set_rng_state)
from engine.train.run_folder import (RunFolderError, append_log, plot_curves, prepare_run_folder, run_finished,
                                     run_folder_lock, write_logs)
from engine.train.schedule import budget_spent, build_optimizer, lr_at, progress_fraction, set_lr
from engine.train.step import OutputsLoss, TrainStep, training_loss, use_compile, use_cuda_graphs
from engine.train.validation import validate_distributed

LogCallback = Callable[[Dict[str, Any]], None]

# The host reads the losses of the steps it queued (which waits for the GPU to finish them) at least this
# often, for the logs, the progress and to stop promptly at a non-finite loss.
READ_EVERY_STEPS = 50
READ_EVERY_SECONDS = 1.0
# Steps after which a compiled run's kernels are in Inductor's cache: the first compiles forward and backward,
# the third is the CUDA graph's capture.
WARM_AFTER_STEPS = 3
VAL_TIME_FACTOR = 2.0
"""Under a time budget, a timed validation comes a tenth of the budget after the previous one ended, and no sooner
than this many times that validation's own duration (its score and checkpoints): timed validations then take at most
a third of a time-budgeted run's time. With the tenth alone, a 2-core CPU whose validation took longer than six
seconds of a one-minute budget validated after every step (steps 2, 3, 4 and 5 of 5, 70 s for the minute)."""


def next_timed_validation(cfg: TrainConfig, end_s: float, took_s: float) -> float:
    """When (seconds trained, all sessions) the next timed validation of a run under ``cfg.max_minutes`` is due:
    a tenth of the budget after the last one ended at ``end_s``, and no sooner than :data:`VAL_TIME_FACTOR` times
    the ``took_s`` seconds it took."""
    return end_s + max((cfg.max_minutes or 0) * 6.0, VAL_TIME_FACTOR * max(took_s, 0.0))


def timed_validation_due(cfg: TrainConfig, now_s: float, due_s: float, last_took_s: float,
                         final_s: float = 0.0) -> bool:
    """Whether a run under a time budget validates now for the time's sake: its time ``due_s`` came
    (:func:`next_timed_validation`), and a validation as long as the last one (``last_took_s``) would end before the
    training does (the budget less ``final_s``, the run's last validation); past that, the validation that ends the
    run comes soon and scores the same model. Never without a budget."""
    if cfg.max_minutes is None:
        return False
    return now_s >= due_s and now_s + max(last_took_s, 0.0) + max(final_s, 0.0) < cfg.max_minutes * 60.0


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def train(cfg: TrainConfig, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
          on_log: Optional[LogCallback] = None, parent: Optional[LoadedCheckpoint] = None) -> RunResult:
    """Train (or fine-tune, or resume) one run.

    Args:
        cfg: the run's settings.
        progress: ``progress(step, steps, message)``; also reports preprocessing.
        cancel: when cancelled the run stops at the next step boundary, writes its resume state (the
            last checkpoints stay as they were) and raises :class:`engine.progress.Cancelled`. A stop asked
            through it (:meth:`engine.progress.CancelToken.request_stop`) ends the run at the next step boundary
            the way a spent time budget does: validation, ``last``/``best`` checkpoints and the resume state are
            written and the :class:`RunResult` is returned (``RunResult.stopped_on_request`` and the checkpoints'
            provenance ``stopped_on_request`` say so). A stop asked while a scheduled validation runs ends the run
            right after it, with that validated model (no further step). A stop asked at the run's last step, or at
            the step where its time budget runs out, ends it as it would have ended anyway: no ``stopped_on_request``.
            A stop asked before this session's first step (the dataset scan, the cases' preprocessing, the network's
            set-up) has trained nothing to keep: the run then ends as a cancel does, before the next case
            (:class:`engine.progress.NothingToKeep`, a :class:`engine.progress.Cancelled`; nothing written). A
            cancel is also taken between those phases and before each case.
        on_log: called with each step's log record (``step``, ``loss``, ``lr``, ``seconds``, and
            ``val_dice``/``val_dice_per_class`` after validation), in step order, several at a time when the
            losses are read (at least every ``READ_EVERY_SECONDS``).
        parent: the already loaded ``(model, metadata)`` of ``cfg.init_checkpoint``
            (:func:`engine.checkpoint.load_checkpoint`), so the file is not read again.

    Returns:
        :class:`RunResult`.

    Raises:
        TrainingDataError: empty dataset, missing labels, channel or class mismatches.
        ValueError: a run folder holding another run (without ``resume``), unresumable changes.
        FloatingPointError: a step's loss or gradients were not finite (the message names the first such
            step; the weights, and the checkpoints and resume state written before, are from the step before).
        Cancelled: the run was cancelled (:class:`engine.progress.NothingToKeep`: stopped before its first step).
    """
    dinfo, device = init_distributed(cfg.device)
    try:
        with run_folder_lock(cfg.out, main=dinfo.main, create=not cfg.resume):
            return _train(cfg, dinfo, device, progress, cancel, on_log, parent)
    finally:
        if dinfo.initialised_here:
            dist.destroy_process_group()


def _open_run_folder(cfg: TrainConfig, dinfo: DistInfo, device: torch.device, parent: Optional[LoadedCheckpoint],
                     cancel: Optional[CancelToken] = None) -> Tuple[TrainConfig, Path, Any]:
    """Fill the recipe's device-dependent settings, decide whether the run resumes
    (:func:`prepare_run_folder`: a folder killed before its first save starts over) and check the dataset.
    Nothing is written here: the folder and its ``train_config.json``/``split.json`` are written by
    :func:`write_run_files` once the cases are preprocessed and the network built, so a run refused for its
    data (a label on another grid, values outside the classes, NaN voxels) or settings leaves the folder as it was.

    A cancel or a stop asked before or during the dataset scan ends the run after it, nothing written
    (:func:`check_run_start`).

    Returns ``(settings with the resume decision, run folder, dataset)``."""
    check_run_start(cancel)
    cfg = resolve_for_device(cfg, device.type)
    run_dir = Path(cfg.out)
    resume = prepare_run_folder(run_dir, cfg.resume, RESUME_FILE, (LAST_FILE, BEST_FILE), remove_temps=dinfo.main,
                                finished=run_finished(run_dir, cfg.steps))
    if resume != cfg.resume:
        cfg = dataclasses.replace(cfg, resume=resume)
    if cfg.resume:
        check_resumable(cfg, run_dir)
        _check_time_budget(cfg, run_dir, dinfo)
    dataset = load_training_dataset(cfg, parent_loaded=parent is not None)
    check_run_start(cancel)  # reading every case's headers takes a while on a large dataset
    return cfg, run_dir, dataset


def _check_time_budget(cfg: TrainConfig, run_dir: Path, dinfo: DistInfo) -> None:
    """Before a resumed run takes a step: refuse a time budget that earlier sessions already spent, and say how
    much of a budget new to the run is left.

    ``--max-minutes`` is the whole run's budget (:func:`engine.train.schedule.progress_fraction`: every
    session's time counts, and the learning rate anneals to 0 by the end of it). Resuming an untimed run that
    trained for 5 minutes with ``--max-minutes 0.3`` took one step at learning rate 0 and rewrote
    ``last.safetensors``; now it is refused here, before the run folder changes.

    Raises:
        RunFolderError: the budget is already spent (the message says how much was trained).
    """
    if cfg.max_minutes is None:
        return
    info = read_resume_info(run_dir / RESUME_FILE)
    used = float(info.get("elapsed", 0.0))
    step = int(info.get("step", 0))
    seconds = [float(r["seconds"]) for r in (info.get("history") or [])[-4:] if "seconds" in r]
    step_s = min((b - a for a, b in zip(seconds, seconds[1:])), default=0.0)  # as the loop judges it
    saved = _saved_setting(run_dir, "max_minutes")
    # the loop stops a validation's length before its budget to end there with its last validation: a run that ended
    # so was not seen as spent, and its --resume trained again past the budget and validated once more
    # (only a run that ended so: an interrupted one still owes its last validation and checkpoints)
    timed = info.get("timed_validation") if isinstance(info.get("timed_validation"), dict) else {}
    try:
        final_s = max(float(timed.get("last_took", 0.0)), 0.0) if info.get("ended_by_budget") else 0.0
    except (TypeError, ValueError):
        final_s = 0.0
    if budget_spent(cfg, used + final_s, step_s):
        again = (f"give --max-minutes above {used / 60:.2f} to train on, or resume without it to train to step "
                 f"{cfg.steps}" if saved is None else f"give a larger --max-minutes (above {used / 60:.2f}) to "
                 "train on")
        # a time-budgeted run has no step count of its own (TIME_BUDGET_STEPS stands for "until the time is up")
        of = f" of {cfg.steps}" if cfg.steps < TIME_BUDGET_STEPS else ""
        raise RunFolderError(f"{run_dir}: the run's {cfg.max_minutes:g}-minute budget was spent in earlier sessions "
                             f"({used / 60:.2f} min trained, step {step}{of}); nothing to resume. The "
                             f"budget counts every session's time: {again}")
    if dinfo.main and saved != cfg.max_minutes:
        print(f"{run_dir}: --max-minutes {cfg.max_minutes:g} is the whole run's budget: {used / 60:.2f} min were "
              f"trained in earlier sessions, so about {cfg.max_minutes - used / 60:.2f} min are left, and the "
              "learning rate anneals to 0 by then", file=sys.stderr)


def _saved_setting(run_dir: Path, name: str) -> Any:
    """``name`` as the run folder's ``train_config.json`` recorded it (None when absent or unreadable)."""
    try:
        return json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoint_score(path: Path) -> Tuple[Optional[int], Optional[float]]:
    """``(step, validation score)`` a run checkpoint recorded; Nones where it is absent or unreadable."""
    try:
        prov = read_checkpoint_metadata(path).get("provenance") or {}
        score = prov.get("val_dice")
        return prov.get("steps"), (float(score) if score is not None else None)
    except Exception:  # noqa: BLE001 - only a note depends on it
        return None, None


def _wrap_model(cfg: TrainConfig, model: nn.Module, dinfo: DistInfo, device: torch.device,
                patch_size: Sequence[int]) -> Tuple[nn.Module, Optional[str]]:
    """Layout, gradient checkpointing, compilation and DDP as the settings ask.

    Returns:
        ``(the module to call, the compile-cache key when the blocks were compiled, else None)``.
    """
    if cfg.channels_last:  # in place, before the optimiser sees the parameters
        model.to(memory_format=torch.channels_last_3d)
    if cfg.gradient_checkpointing:
        if not hasattr(model, "set_gradient_checkpointing"):
            raise ValueError("--gradient-checkpointing applies to Mamba-HoME networks, "
                             f"not {type(model).__name__}")
        model.set_gradient_checkpointing(True)
    def key() -> str:  # only where compilation is decided (a GPU, a long enough run) or done
        return compile_cache_key(model, (int(cfg.batch_size or 1), *patch_size), cfg.bf16, cfg.channels_last)

    compiled, why = use_compile(cfg.compile, device, cfg.network, cfg.task, cfg.max_minutes, cfg.steps, dinfo.world,
                                cfg.gradient_checkpointing, cache_warm=lambda: compile_cache_is_warm(key()))
    if compiled:
        if dinfo.main and cfg.compile is None:
            print(f"compiling the network's blocks ({why}; --no-compile turns it off)", file=sys.stderr)
        compile_regions(model)
    compile_key = key() if compiled else None  # the network's, before DDP wraps it
    if dinfo.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, compile_key


def _first_compiled_step(train_step: TrainStep, net_input: torch.Tensor, target: torch.Tensor,
                         model: nn.Module) -> torch.Tensor:
    """The first step of a run that compiled by itself (auto), where the compilation happens. Where compiling
    fails (no C compiler, no Triton, an Inductor bug) the run goes on uncompiled instead of failing over a speed
    setting the user never asked for; an explicit ``--compile`` raises as usual."""
    try:
        return train_step(net_input, target)
    except Exception as exc:  # noqa: BLE001 - any compilation failure; a real error recurs eagerly and raises
        print(f"compiling the network failed ({type(exc).__name__}: {str(exc)[:300]}); training on without "
              "compilation (--no-compile skips the attempt)", file=sys.stderr)
        decompile_regions(model)
        return train_step(net_input, target)


def _validate(s: RunSetup, cfg: TrainConfig, dinfo: DistInfo, device: torch.device,
              cancel: Optional[CancelToken]) -> Tuple[Optional[float], Optional[List[Optional[float]]]]:
    """``(score, per-class Dice or None)``: the task's own score if it has one, else the mean foreground Dice."""
    score = s.task.validate(s.model, s.val_cases, device)
    if score is not None:
        return _finite_or_none(all_mean(float(score), dinfo, device)), None
    dice, per_class = validate_distributed(s.model, s.val_cases, len(s.output_names), s.patch_size, dinfo, device,
                                           cfg.sw_batch_size, cfg.bf16, cancel)
    return _finite_or_none(dice), [_finite_or_none(v) for v in per_class]


class _Checkpoints:
    """``last`` after every validation, ``best`` when the score improves (until some validation gives a
    finite score, or without validation cases, best = last)."""

    def __init__(self, run_dir: Path, best_score: Optional[float]) -> None:
        self.best_path, self.last_path = run_dir / BEST_FILE, run_dir / LAST_FILE
        self.best_score = best_score

    def save(self, model: nn.Module, meta: Dict[str, Any], score: Optional[float]) -> None:
        save_checkpoint(self.last_path, model, meta)
        improved = score is not None and (self.best_score is None or score > self.best_score)
        if improved or self.best_score is None:
            save_checkpoint(self.best_path, model, meta)
        if improved:
            self.best_score = score


def _restore_or_seed(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                     run_dir: Path, dinfo: DistInfo, average: Optional[WeightAverage] = None
                     ) -> Tuple[int, List[Dict[str, Any]], Optional[float], float, Optional[Dict[str, Any]]]:
    """Load the resume state (weights, optimiser, RNGs) or seed a fresh run; rewrite the logs. The learning
    rate needs no state: it is a function of the step and the elapsed time (:func:`lr_at`).

    Returns:
        ``(start step, history, best score, seconds trained before, timed validations' schedule)``: the last
        (``{"due": s, "last_took": s}``) is None for a fresh run and for a state saved before it was kept.
    """
    if not cfg.resume:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        torch.manual_seed(derive_seed(cfg.seed, 3, dinfo.rank))
        if dinfo.main:
            write_logs(run_dir, [])
        return 0, [], None, 0.0, None
    tensors, state = load_resume_state(run_dir / RESUME_FILE)
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(model_state, strict=True)
    optimizer_from_flat(optimizer, tensors, state["optimizer"])
    if average is not None:
        average.load_state(tensors, str(run_dir / RESUME_FILE))
    set_rng_state(tensors, state["rng"])
    info = state["info"]
    history = list(info["history"])
    if dinfo.main:
        write_logs(run_dir, history)
    timed = info.get("timed_validation")
    if (info.get("train_config") or {}).get("max_minutes") != cfg.max_minutes or not isinstance(timed, dict):
        timed = None  # a budget new to the run (or none now), or a state from before the schedule was kept
    return int(info["step"]), history, info.get("best_dice"), float(info.get("elapsed", 0.0)), timed


def _train(cfg: TrainConfig, dinfo: DistInfo, device: torch.device, progress: Optional[ProgressCallback],
           cancel: Optional[CancelToken], on_log: Optional[LogCallback],
           parent: Optional[LoadedCheckpoint]) -> RunResult:
    cfg, run_dir, dataset = _open_run_folder(cfg, dinfo, device, parent, cancel)
    run_name = run_dir.name
    resume_path = run_dir / RESUME_FILE
    s = setup_run(cfg, dataset, run_dir, dinfo, device, progress, cancel, parent)
    model, compile_key = _wrap_model(cfg, s.model, dinfo, device, s.patch_size)
    optimizer = build_optimizer(cfg, s.trainable)
    graphs = use_cuda_graphs(cfg.cuda_graphs, device, dinfo.world, cfg.gradient_checkpointing,
                             compile_key is not None, warn=dinfo.main)
    train_step = TrainStep(model, OutputsLoss(training_loss(cfg.loss)), bf16=cfg.bf16,
                           cuda_graphs=graphs, channels_last=cfg.channels_last)
    if callable(getattr(s.task, "set_cuda_graphs", None)):  # optional part of the task protocol
        s.task.set_cuda_graphs(graphs)

    check_run_start(cancel)  # the last moment a stop or cancel leaves the run folder as it was
    if dinfo.main:  # the data and settings passed every check: only now does the run folder change
        write_run_files(cfg, run_dir, [c.case_id for c in s.train_cases], [c.case_id for c in s.val_cases])
    barrier(dinfo)
    # --ema: the average is what validation scores and the checkpoints hold; training goes on with the raw weights
    average = WeightAverage(s.model, cfg.ema) if cfg.ema is not None else None
    start_step, history, best_score, elapsed_before, timed_saved = _restore_or_seed(cfg, s.model, optimizer,
                                                                                    run_dir, dinfo, average)

    def averaged() -> Any:
        return average.applied() if average is not None else contextlib.nullcontext()

    tail = augmentation_tail(s.pp, s.patch_size, cfg.pos, cfg.neg, cfg.augmentation, cfg.zoom_out,
                             cfg.zoom_out_prob, cfg.invert_prob, cfg.shift)
    # optional part of the task protocol: per-sample work the data workers do on each patch
    sample_transform = s.task.sample_transform() if callable(getattr(s.task, "sample_transform", None)) else None
    stream = PatchStream(s.train_cases, tail, cfg.seed, s.replay_cases, cfg.replay_fraction,
                         item_transform=sample_transform)
    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=StepBatches(start_step, cfg.steps, cfg.batch_size, dinfo),
        num_workers=data_workers(cfg.num_workers, device), pin_memory=device.type == "cuda",
        persistent_workers=False)

    checkpoints = _Checkpoints(run_dir, best_score)
    # what last.safetensors held when this session began: a resumed session that leaves it scoring lower says so
    found_last = _checkpoint_score(checkpoints.last_path) if cfg.resume and dinfo.main else (None, None)
    guard = StepGuard(optimizer, s.trainable, cfg.grad_clip, dinfo)
    pending: List[Dict[str, Any]] = []  # the records of the steps whose losses are still on the device
    t0 = time.perf_counter()
    step = start_step

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    last_read = elapsed_before

    def read_pending() -> List[Dict[str, Any]]:
        """The pending steps' records with their losses, in one transfer; the first non-finite step raises
        (the device skipped its update and every later one: the weights are those from before it)."""
        nonlocal last_read
        losses, first_skipped = guard.read()
        records, pending[:] = list(pending), []
        last_read = records[-1]["seconds"] if records else last_read
        for record, loss in zip(records, losses):
            record["loss"] = loss
        if first_skipped is not None:
            for record in records[:first_skipped]:
                history.append(record)
                publish(record)
            bad = records[first_skipped]
            what = (f"loss became {bad['loss']}" if not math.isfinite(bad["loss"]) else
                    f"the gradients became non-finite (loss {bad['loss']:.6g})")
            raise FloatingPointError(f"{run_dir}: {what} at step {bad['step']}; lower the learning rate or turn off bf16 (--lr, --bf16)")
        return records

    def publish(record: Dict[str, Any]) -> None:
        """Log a step's record (already in the history) and report it."""
        if dinfo.main:
            append_log(run_dir, record)
        tell(record)

    def tell(record: Dict[str, Any]) -> None:
        if on_log is not None:
            on_log(dict(record))
        if cfg.max_minutes is not None and cfg.steps >= TIME_BUDGET_STEPS:  # the time budget ends it, not a count
            msg = (f"step {record['step']} ({float(record['seconds']) / 60:.1f}/{cfg.max_minutes:g} min) "
                   f"loss {record['loss']:.4f}")
        else:
            msg = f"step {record['step']}/{cfg.steps} loss {record['loss']:.4f}"
        if record.get("val_dice") is not None:
            msg += f" val Dice {record['val_dice']:.3f}"
        report(progress, record["step"], cfg.steps, msg)

    def save_resume(ended_by_budget: bool = False) -> None:
        save_resume_state(resume_path, s.model, optimizer, extra=average.state() if average is not None else None,
                          info={
            "step": step, "history": history, "best_dice": checkpoints.best_score, "elapsed": elapsed(),
            # the run ended where its budget less its last validation ran out (see _check_time_budget)
            "ended_by_budget": bool(ended_by_budget),
            "train_config": cfg.to_dict(), "parent": s.parent,  # parent: its SHA-256 checks a moved parent
            # a resumed run keeps the timed validations' schedule
            "timed_validation": ({"due": next_val_time, "last_took": last_val_s} if cfg.max_minutes is not None
                                 else None)})

    # seconds trained (all sessions) at which the next timed validation is due, and how long the last one took: a
    # tenth of the time budget on, or where the interrupted session's schedule had it (next_timed_validation)
    next_val_time, last_val_s = next_timed_validation(cfg, elapsed_before, 0.0), 0.0
    if timed_saved is not None:
        try:
            next_val_time, last_val_s = float(timed_saved["due"]), float(timed_saved.get("last_took", 0.0))
        except (KeyError, TypeError, ValueError):
            pass
    model.train()
    report(progress, step, cfg.steps, "training")
    stopped_by_time = stopped_on_request = False
    # where the last step's own time began, and the length of the one before it (none yet)
    step_mark, last_step_s = elapsed(), 0.0
    try:
        for batch in loader:
            stop_now = cancel is not None and cancel.cancelled
            # A stop before this session's first step has nothing of its own to keep: saving the starting weights
            # as the run's model would pass the parent (or the resumed checkpoint) off as a new version.
            nothing_to_keep = step == start_step and stop_requested(cancel)
            if any_rank(stop_now or nothing_to_keep, dinfo, device):
                if stop_now or not nothing_to_keep:
                    raise Cancelled("cancelled by the user")
                raise NothingToKeep(NOTHING_TRAINED)
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            # The task's random draws (e.g. simulated prompts) are a pure function of the step and rank,
            # so a resumed run feeds the network the same inputs.
            task_rng = np.random.default_rng(derive_seed(cfg.seed, 4, step, dinfo.rank))
            if sample_transform is None:
                net_input, target = s.task.make_batch(model, image, label, task_rng)
            else:  # the sample transform's extras, as the loader collated them (CPU)
                extra = {k: v for k, v in batch.items() if k not in ("image", "label")}
                net_input, target = s.task.make_batch(model, image, label, task_rng, extra=extra)
            # Under a time budget the schedule follows whichever budget runs out first, so a run cut by
            # time still anneals (a time-budgeted run resumes approximately: time is not reproducible).
            # the run's last validation (and its checkpoints) comes out of the budget too: once one was timed, the
            # training stops that long before the budget and anneals by then, so the run ends near its budget, not a
            # whole validation after it (on a 2-core CPU, 150 s past a 12 s budget)
            final_s = last_val_s if s.val_cases else 0.0
            frac = progress_fraction(cfg, step, elapsed() + final_s)
            if cfg.max_minutes is not None:  # every rank's clock differs a little: one rate for all ranks
                frac = all_mean(frac, dinfo, device)
            lr = lr_at(cfg, step, frac)
            set_lr(optimizer, lr)
            # clipping (eager, after the possibly graphed backward: it scales the graph's .grad tensors in
            # place) and the optimiser step, skipped on the device if the loss or gradients are not finite
            if compile_key is not None and cfg.compile is None and step == start_step:
                loss = _first_compiled_step(train_step, net_input, target, s.model)
                compile_key = compile_key if compiled_regions(s.model) else None
            else:
                loss = train_step(net_input, target)
            guard.step(loss)
            step += 1
            if average is not None:
                average.update(step)
            if compile_key is not None and step == start_step + WARM_AFTER_STEPS and dinfo.main:
                # compiled (and captured): the next run of this network can count on the cached kernels
                mark_compile_cache_warm(compile_key)
            now = elapsed()
            step_s, last_step_s, step_mark = min(now - step_mark, last_step_s), now - step_mark, now
            pending.append({"step": step, "loss": None, "lr": float(lr), "seconds": round(now, 3)})
            last_step = step == cfg.steps
            # A stop on request ends the run here exactly as a spent budget would (this step validated and saved).
            # It is the reason the run ended only where the run would not have ended at this step anyway: its last
            # step, or its budget spent by the same step, ends it as it always would, and the checkpoints' provenance
            # then says nothing of a stop (the napari panel and the server read "stopped_on_request" as "ended
            # early on request"). One reduction for both flags: ranks agree on each.
            budget_up, asked_stop = any_rank_flags((budget_spent(cfg, now + final_s, step_s), stop_requested(cancel)),
                                                   dinfo, device)
            asked_stop = asked_stop and not last_step and not budget_up
            time_up = budget_up or asked_stop
            val_due = step % cfg.val_every == 0
            save_due = step % cfg.save_every == 0
            if cfg.max_minutes is not None:  # also validate up to ten times over a time budget (timed_validation_due)
                timed = any_rank(timed_validation_due(cfg, now, next_val_time, last_val_s, final_s), dinfo, device)
                # and keep a resume state each time: a budget-only run's step intervals are never reached
                val_due, save_due = val_due or timed, save_due or timed
            # The host reads the losses only where it needs them, or every READ_EVERY_STEPS steps or
            # READ_EVERY_SECONDS (one process: ranks must read at the same steps), so the GPU runs ahead.
            read_due = len(pending) >= READ_EVERY_STEPS or (
                dinfo.world == 1 and pending[-1]["seconds"] - last_read >= READ_EVERY_SECONDS)
            if not (val_due or last_step or time_up or save_due or read_due):
                continue
            *earlier, record = read_pending()
            for done in earlier:
                history.append(done)
                publish(done)
            # In the history before validating: a cancel during validation still resumes with every step.
            history.append(record)
            # A cancel asked while the earlier steps were reported (on_log) takes effect here, at this step
            # boundary, as it did when every step was reported at once: no validation, no checkpoint.
            if any_rank(cancel is not None and cancel.cancelled, dinfo, device):
                publish(record)
                raise Cancelled("cancelled by the user")
            if val_due or last_step or time_up:
                score, val_started = None, elapsed()
                if asked_stop:  # validation can take a while: say the stop was taken and what comes
                    report(progress, step, cfg.steps, f"stopping at step {step} as asked: "
                           + ("validating and saving the model" if s.val_cases else "saving the model"))
                if s.val_cases:
                    with averaged():
                        score, per_class = _validate(s, cfg, dinfo, device, cancel)
                    record["val_dice"] = score
                    if per_class is not None:
                        record["val_dice_per_class"] = per_class
                    if not (last_step or time_up) and any_rank(stop_requested(cancel), dinfo, device):
                        # A stop asked while a scheduled validation ran: this validated model is the one to keep.
                        # Taken at the next step, it trained one more step and validated again: the stop cost a
                        # second validation and kept a model other than the one scored when it was pressed.
                        # (Asked after this point, during the checkpoints' writing, it is taken at the next step.)
                        asked_stop = time_up = True
                        report(progress, step, cfg.steps, f"stopping at step {step} as asked: saving the model")
                if dinfo.main:
                    meta = checkpoint_metadata(cfg, s, step, elapsed(), score, run_name)
                    if asked_stop:  # a reader of the model learns it ended early, not by its steps or budget
                        meta["provenance"]["stopped_on_request"] = True
                    with averaged():
                        checkpoints.save(s.model, meta, score)
                barrier(dinfo)
                # the interval counts from the end of this validation and grows with its duration, so a slow
                # validation can neither make every following step validate nor take most of the budget
                val_ended = elapsed()
                last_val_s = val_ended - val_started
                next_val_time = next_timed_validation(cfg, val_ended, last_val_s)
            if dinfo.main:
                append_log(run_dir, record)
                if save_due or last_step or time_up:
                    save_resume(ended_by_budget=time_up and not asked_stop)
                if "val_dice" in record or last_step or time_up:
                    plot_curves(history, run_dir / PLOT_FILE, run_name)
            tell(record)
            if time_up and not last_step:
                stopped_by_time, stopped_on_request = not asked_stop, asked_stop
                break
            # a step's time is its batch, forward and backward: not the validation or logging above
            step_mark = elapsed()
    except Cancelled:
        # The state after the last completed step is consistent: keep it so --resume continues here
        # (reading the pending losses first; a non-finite one raises instead: nothing to continue).
        for done in read_pending():
            history.append(done)
            publish(done)
        if dinfo.main and step > start_step:
            save_resume()
            plot_curves(history, run_dir / PLOT_FILE, run_name)
        raise
    if cfg.resume and step == start_step == cfg.steps:
        # stopped at its last step before the final validation and checkpoint (a cancel is taken at that boundary,
        # or during that validation): the restored weights are the finished model. Without this the resume trained
        # nothing, wrote no checkpoint and then removed the resume state: the model was lost.
        score = None
        with averaged():
            if s.val_cases:
                score, _ = _validate(s, cfg, dinfo, device, cancel)
            if dinfo.main:
                checkpoints.save(s.model, checkpoint_metadata(cfg, s, step, elapsed(), score, run_name), score)
    barrier(dinfo)
    if stopped_by_time and dinfo.main:
        trained = float(history[-1]["seconds"]) / 60 if history and "seconds" in history[-1] else None
        room = (f": training stopped at {trained:.1f} min, leaving its last validation the rest"
                if s.val_cases and trained is not None and trained < 0.95 * cfg.max_minutes else "")
        print(f"time budget of {cfg.max_minutes:g} min reached after {step} steps{room}", file=sys.stderr)
    if stopped_on_request and dinfo.main:
        print(f"stopped as asked after {step} steps; the model of that step is saved", file=sys.stderr)
    session_scores = [r.get("val_dice") for r in history[start_step:] if "val_dice" in r]
    if found_last[1] is not None and session_scores and session_scores[-1] is not None \
            and session_scores[-1] < found_last[1]:
        best = ("" if checkpoints.best_score is None else
                f"; best.safetensors keeps the best ({checkpoints.best_score:.4f})")
        print(f"note: {checkpoints.last_path} (step {step}) now scores {session_scores[-1]:.4f} on validation, below "
              f"the {found_last[1]:.4f} of the last.safetensors this session resumed from (step {found_last[0]})"
              f"{best}", file=sys.stderr)
    if step == cfg.steps and dinfo.main and not cfg.keep_resume:
        # Nothing is left to continue: the folder keeps only what a rollback needs (the checkpoints).
        resume_path.unlink(missing_ok=True)
    best_path = checkpoints.best_path if checkpoints.best_path.exists() else None
    last_path = checkpoints.last_path if checkpoints.last_path.exists() else None
    return RunResult(best_checkpoint=best_path, last_checkpoint=last_path, history=history,
                     best_dice=checkpoints.best_score, run_dir=run_dir, steps_done=step,
                     checkpoint=(last_path or best_path) if cfg.select == "last" or checkpoints.best_score is None
                     else (best_path or last_path),  # no validation score: best is a copy of last
                     no_score_reason=None if checkpoints.best_score is not None else _no_score_reason(cfg, s),
                     stopped_on_request=stopped_on_request)


def _no_score_reason(cfg: TrainConfig, s: RunSetup) -> str:
    """Why a run ends without a validation score, ending with the checkpoint handed on. A store whose validation
    cases were all unlabelled said only "best validation Dice: n/a" and handed on ``last`` without a word."""
    if not s.val_cases:
        if cfg.val_fraction <= 0:
            return "--val-fraction 0: no validation split; the last checkpoint is used"
        cases = len(s.train_cases)
        return f"{cases} case{'' if cases == 1 else 's'}: no validation split; the last checkpoint is used"
    if not any(bool((c.label > 0).any()) for c in s.val_cases):
        return "no validation case holds a labelled voxel; the last checkpoint is used"
    return "validation gave no score; the last checkpoint is used"
