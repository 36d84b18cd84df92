"""The training loop: single process or torchrun DDP, exact resume, logs, plots, checkpoints.

``train(TrainConfig)`` is the only training loop of the product; fine-tuning
(:mod:`engine.finetune`) is ``train`` started from a parent checkpoint.

What one run does:

1. reads the dataset (:func:`engine.datasets.load_dataset`), splits it into train/validation once
   (:func:`engine.datasets.split_cases`, recorded in ``split.json``);
2. preprocesses every case once into memory (:func:`engine.preprocess.eval_transforms`: RAS,
   target spacing, per-modality intensity) so small datasets train fast;
3. draws patches with the random tail of :func:`engine.preprocess.train_transforms` (pos/neg crops and
   the Appendix-B augmentations). Patch ``i`` of the whole run is drawn with a seed derived from
   ``(seed, i)``, so the data stream is a pure function of the step: resuming, changing the number of
   data workers or running under DDP never changes which patches a step sees;
4. optimises MONAI ``DiceCELoss`` with AdamW and a cosine schedule over the step budget, optionally
   under bfloat16 autocast;
5. every ``val_every`` steps: sliding-window validation (mean foreground Dice, MONAI ``DiceMetric``),
   ``last``/``best`` checkpoints (:func:`engine.checkpoint.save_checkpoint`, atomic) and the
   ``resume.safetensors`` state (weights, AdamW and scheduler state, RNG states; tensors in safetensors,
   the rest JSON in its header; no pickle);
6. logs every step to ``log.jsonl`` and ``log.csv`` and draws ``curves.png``.

Run folder layout: ``train_config.json``, ``split.json``, ``log.jsonl``, ``log.csv``, ``curves.png``,
``best.safetensors``, ``last.safetensors``, ``resume.safetensors``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from engine.progress import Cancelled, CancelToken, ProgressCallback, check, report

LogCallback = Callable[[Dict[str, Any]], None]

DEFAULT_PATCH = 96
RESUME_FILE = "resume.safetensors"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
CONFIG_FILE = "train_config.json"
SPLIT_FILE = "split.json"
LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
PLOT_FILE = "curves.png"
_RESUME_FORMAT = "napari-mambahome-resume/1"

# Settings that may differ between a run and its resumption: they change neither the data stream
# nor the optimisation (where and how fast it runs, how long it may take).
_RESUMABLE_CHANGES = {"resume", "device", "num_workers", "max_minutes", "val_every", "save_every", "compile",
                      "cuda_graphs", "gradient_checkpointing"}


class TrainingDataError(ValueError):
    """A dataset the run cannot train on (empty, missing labels, classes/channels not fitting)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``train_config.json`` in the run folder.

    Args:
        dataset: dataset folder (nnU-Net v2 raw, MSD or case store; see :func:`engine.datasets.load_dataset`).
        out: run folder (created; refused if it holds another run unless ``resume``).
        network: ``mambahome`` | ``dynunet`` | ``segresnet`` | ``swinunetr``.
        preset: network size, ``paper`` | ``small`` | ``tiny``.
        patch_size: training patch and sliding-window ROI ``(X, Y, Z)``; default 96 per axis capped to
            the median preprocessed shape rounded up to the network's divisor.
        batch_size: patches per optimiser step (per process under DDP).
        lr, weight_decay: AdamW settings; the learning rate follows a cosine over ``steps``.
        steps: optimiser steps of the whole run.
        max_minutes: stop (cleanly, with checkpoints) after this much training time.
        val_every: steps between validations/checkpoints (default: ``steps // 10``, at least 1).
        save_every: steps between resume states (default ``val_every``).
        val_fraction, seed: the validation split and every random stream of the run.
        target_spacing: mm along RAS axes; default the dataset's median spacing.
        modality: the model's modality; default the dataset's.
        bf16: bfloat16 autocast.
        compile: ``torch.compile`` the network's blocks (:func:`engine.model.compile_regions`): a one-time
            compilation in the first steps, then faster steps at the fixed patch size; validation runs eagerly.
        cuda_graphs: on one CUDA GPU, replay each step's forward and backward as a CUDA graph
            (:class:`TrainStep`) after two eager steps: the host no longer launches thousands of small
            kernels per step. Its memory stays reserved between steps (validation needs its own on top).
        gradient_checkpointing: recompute the Mamba and HoME layers' activations in the backward pass
            instead of keeping them (Mamba-HoME only): the same gradients in less memory and more time
            (paper preset, 96³ fp32 on an H100: 13.5 -> 10.5 GiB peak, 210 -> 253 ms a step;
            BENCHMARKS.md). Not combined with
            ``cuda_graphs`` (the recomputation's random-state bookkeeping is not captured).
        num_workers: data-loading processes (0 = in the training process).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (torchrun: each rank its ``LOCAL_RANK`` GPU).
        init_checkpoint: start from this checkpoint (fine-tuning; architecture, preprocessing and patch
            size come from it, classes are mapped by name).
        freeze_encoder: train only the decoder and head.
        replay, replay_fraction: mix patches of the parent's dataset into fine-tuning.
        resume: continue the run in ``out`` from its ``resume.safetensors``.
        sw_batch_size: windows per forward pass in validation.
        pos, neg: foreground/background ratio of the patch centres.
        command: the command line recorded in checkpoint provenance.
        network_overrides: ModelConfig fields (Mamba-HoME, e.g. ``{"use_home": False}`` or
            ``{"home_variant": "paper"}``) or constructor kwargs (MONAI peers) on top of the preset.
    """

    dataset: str
    out: str
    network: str = "mambahome"
    preset: str = "small"
    patch_size: Optional[List[int]] = None
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    steps: int = 1000
    max_minutes: Optional[float] = None
    val_every: Optional[int] = None
    save_every: Optional[int] = None
    val_fraction: float = 0.2
    seed: int = 0
    target_spacing: Optional[List[float]] = None
    modality: Optional[str] = None
    bf16: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    gradient_checkpointing: bool = False
    num_workers: int = 0
    device: str = "auto"
    init_checkpoint: Optional[str] = None
    freeze_encoder: bool = False
    replay: Optional[str] = None
    replay_fraction: float = 0.25
    resume: bool = False
    sw_batch_size: int = 2
    pos: float = 1.0
    neg: float = 1.0
    command: Optional[str] = None
    network_overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dataset = str(self.dataset)
        self.out = str(self.out)
        if self.patch_size is not None:
            self.patch_size = [int(p) for p in self.patch_size]
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise ValueError(f"patch_size must be 3 positive integers, got {self.patch_size}")
        if self.target_spacing is not None:
            self.target_spacing = [float(s) for s in self.target_spacing]
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if self.val_every is None:
            self.val_every = max(self.steps // 10, 1)
        if self.save_every is None:
            self.save_every = self.val_every

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        from engine.config import unknown_fields

        unknown = unknown_fields(cls, d)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)


@dataclass
class RunResult:
    """What a finished (or time-budgeted) run produced.

    Attributes:
        best_checkpoint: checkpoint with the best validation Dice (the last one without validation).
        last_checkpoint: checkpoint of the final step.
        history: one record per step (``step``, ``loss``, ``lr``, ``seconds``; ``val_dice`` after validation).
        best_dice: best mean foreground Dice on the validation split (None without validation).
        run_dir: the run folder.
        steps_done: optimiser steps completed.
    """

    best_checkpoint: Optional[Path]
    last_checkpoint: Optional[Path]
    history: List[Dict[str, Any]]
    best_dice: Optional[float]
    run_dir: Optional[Path] = None
    steps_done: int = 0


# ============================================================================ small helpers
def _write_json(path: Path, obj: Any) -> None:
    from engine.io import write_json_atomic

    write_json_atomic(path, obj)


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _derive_seed(*parts: int) -> int:
    """A 32-bit seed that is a pure function of ``parts`` (and well mixed: neighbouring indices are
    unrelated streams)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def default_patch_size(shapes: Sequence[Sequence[int]], divisor: Sequence[int],
                       cap: int = DEFAULT_PATCH, minimum: Optional[Sequence[int]] = None) -> List[int]:
    """96 per axis, capped to the median preprocessed shape rounded up to the network's divisor
    (never below ``minimum``, default the divisor)."""
    median = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    minimum = minimum or divisor
    return [int(min(_round_up(cap, d), max(_round_up(m, d), mn))) for m, d, mn in zip(median, divisor, minimum)]


# ============================================================================ distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_setting: str) -> Tuple[_Dist, torch.device]:
    """Join the torchrun process group (env ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), if any.

    NCCL on CUDA, gloo on CPU. Outside torchrun this is a single process.
    """
    import torch.distributed as dist

    from engine.inference import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_setting)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    initialised_here = False
    if not dist.is_initialized():
        # Naming the GPU binds NCCL's communicator to it (no guessing from the rank, no hang when the
        # rank -> GPU mapping is not the identity).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
        initialised_here = True
    return _Dist(rank=rank, world=world, local_rank=local_rank, initialised_here=initialised_here), device


def _all_mean(value: float, dinfo: _Dist, device: torch.device) -> float:
    if dinfo.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dinfo.world


def _any_rank(flag: bool, dinfo: _Dist, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if dinfo.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _barrier(dinfo: _Dist) -> None:
    if dinfo.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ============================================================================ data
@dataclass
class _CachedCase:
    case_id: str
    image: torch.Tensor  # (C, X, Y, Z) float32, network space
    label: torch.Tensor  # (1, X, Y, Z) uint8/int16, network space


def _case_dict(case: Any) -> Dict[str, Any]:
    return {"image": case.image, "label": case.label, "modality": case.modality}


def _check_cases(cases: Sequence[Any], where: str) -> None:
    if not cases:
        raise TrainingDataError(f"{where}: the dataset has no labelled cases")
    for case in cases:
        if case.label is None:
            raise TrainingDataError(f"{where}: case {case.case_id} has no label file")
        label = case.label
        if isinstance(label, (str, os.PathLike)) and not Path(label).exists():
            raise TrainingDataError(f"{where}: case {case.case_id}: label file {label} not found")


def preprocess_cases(cases: Sequence[Any], pp: Any, class_ids: Sequence[int],
                     label_map: Optional[np.ndarray] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, what: str = "preprocessing") -> List[_CachedCase]:
    """Load and preprocess cases into network space (RAS, target spacing, per-modality intensity).

    Args:
        cases: ``CaseRef``s of :mod:`engine.datasets`.
        pp: :class:`engine.preprocess.Preprocessing`.
        class_ids: label values allowed in these cases' label files.
        label_map: optional lookup table applied to label values (replay cases of another label set).

    Returns:
        One :class:`_CachedCase` per case, tensors on the CPU.
    """
    from engine.preprocess import MIN_NETWORK_VOXELS, eval_transforms, find_user_error

    transform = eval_transforms(pp, class_ids=list(class_ids))
    out: List[_CachedCase] = []
    for i, case in enumerate(cases):
        check(cancel)
        report(progress, i, len(cases), f"{what} {case.case_id}")
        try:
            d = transform(_case_dict(case))
        except RuntimeError as exc:  # MONAI wraps a transform's error; surface the one naming the file
            user_error = find_user_error(exc)
            if user_error is None:
                raise
            raise TrainingDataError(f"case {case.case_id}: {user_error}") from exc
        image = torch.as_tensor(d["image"]).float().contiguous()
        if min(image.shape[1:]) < MIN_NETWORK_VOXELS:
            raise TrainingDataError(f"case {case.case_id} ({case.image}): only {tuple(image.shape[1:])} voxels at "
                                    f"the model's {tuple(pp.target_spacing)} mm spacing; at least "
                                    f"{MIN_NETWORK_VOXELS} per axis are needed - check the voxel spacing in its header")
        label = torch.as_tensor(d["label"]).long()
        if label_map is not None:
            label = torch.as_tensor(label_map)[label]
        # Labels are small integers; int64 would cost 8x the memory of a cached CT.
        label = label.to(torch.uint8 if int(label.max()) < 256 else torch.int16).contiguous()
        out.append(_CachedCase(str(case.case_id), image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)))
    report(progress, len(cases), len(cases), what)
    return out


def _augmentation_tail(pp: Any, patch_size: Sequence[int], pos: float, neg: float) -> Any:
    """The random part of :func:`engine.preprocess.train_transforms` (pad, pos/neg crop, augmentations)
    to apply to already-preprocessed cases."""
    from monai.transforms import Compose, SpatialPadd

    full = train_transforms_for(pp, patch_size, pos, neg)
    transforms = list(full.transforms)
    start = next((i for i, t in enumerate(transforms) if isinstance(t, SpatialPadd)), None)
    if start is None:  # pragma: no cover - a changed pipeline must not silently double-preprocess
        raise RuntimeError("engine.preprocess.train_transforms no longer starts its random part with SpatialPadd")
    return Compose(transforms[start:])


def train_transforms_for(pp: Any, patch_size: Sequence[int], pos: float, neg: float) -> Any:
    from engine.preprocess import train_transforms

    return train_transforms(pp, patch_size, num_samples=1, pos=pos, neg=neg, augment=True)


class PatchStream(torch.utils.data.Dataset):
    """Training patches indexed by their position in the run's data stream.

    Item ``i`` picks a case (a replay case with probability ``replay_fraction``) and crops/augments it
    with seeds derived from ``(seed, i)`` only, so item ``i`` is the same patch in every process, worker
    and resumed run.

    Returns per item: ``image`` float32 ``(C, *patch)``, ``label`` int64 ``(1, *patch)``.
    """

    def __init__(self, cases: Sequence[_CachedCase], tail: Any, seed: int,
                 replay: Sequence[_CachedCase] = (), replay_fraction: float = 0.0) -> None:
        self.cases = list(cases)
        self.replay = list(replay)
        self.replay_fraction = float(replay_fraction) if self.replay else 0.0
        self.tail = tail
        self.seed = int(seed)

    def __len__(self) -> int:  # indices are drawn by the sampler, the stream is unbounded
        return 2 ** 62

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng(_derive_seed(self.seed, 1, index))
        if self.replay_fraction > 0 and rng.random() < self.replay_fraction:
            case = self.replay[int(rng.integers(len(self.replay)))]
        else:
            case = self.cases[int(rng.integers(len(self.cases)))]
        self.tail.set_random_state(seed=_derive_seed(self.seed, 2, index))
        out = self.tail({"image": case.image, "label": case.label.long()})
        if isinstance(out, list):
            out = out[0]
        image = torch.as_tensor(out["image"]).float().as_subclass(torch.Tensor).contiguous()
        label = torch.as_tensor(out["label"]).long().as_subclass(torch.Tensor).contiguous()
        return {"image": image, "label": label}


def _step_batches(start_step: int, steps: int, batch_size: int, dinfo: _Dist) -> Iterator[List[int]]:
    """Stream indices of each step's batch for this rank (step ``s`` uses a fixed slice of the stream)."""
    per_step = batch_size * dinfo.world
    for s in range(start_step, steps):
        base = s * per_step + dinfo.rank * batch_size
        yield list(range(base, base + batch_size))


# ============================================================================ training step
class TrainStep:
    """Forward, loss and backward of one training step; the optimiser steps after it, outside.

    Args:
        model: the network in train mode (DDP-wrapped or not).
        loss_fn: ``loss_fn(logits, label) -> scalar`` (MONAI DiceCE or Dice+focal here).
        bf16: bfloat16 autocast for the forward (the loss in float32).
        cuda_graphs: replay the step as a CUDA graph (:class:`engine.model.graphs.CudaGraphed`) once two
            eager steps have run with the batch's shape; CUDA tensors only, the CPU stays eager.

    Shapes: ``step(image (B, C, X, Y, Z), label (B, 1, X, Y, Z)) -> loss ()``, a detached tensor that the
    next call overwrites when graphed. The gradients are *written*, not accumulated, into each
    parameter's ``.grad`` (set to ``None`` before the forward), so callers never zero them: after a
    capture ``.grad`` is memory the graph owns, and ``zero_grad()`` would cut it loose. The loss is not
    checked here (that would synchronise inside the graph): check it before ``optimizer.step()``.

    With ``cuda_graphs`` every batch must have the first batch's shapes and dtypes (the training loop's
    fixed patches do): a batch of another shape would run eagerly, give its parameters new ``.grad``
    tensors, and leave the graph's later gradients unseen by the optimiser, so it raises ``ValueError``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 bf16: bool = False, cuda_graphs: bool = False) -> None:
        from engine.model.graphs import CudaGraphed

        self.model = model
        self.loss_fn = loss_fn
        self.bf16 = bool(bf16)
        self.cuda_graphs = bool(cuda_graphs)
        self._batch_signature: Optional[Tuple[Any, ...]] = None
        self.graphed = CudaGraphed(self._forward_backward, warmup=2, max_graphs=1,
                                   enabled=None if cuda_graphs else False)

    def _forward_backward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        # autocast inside the (captured) function: its weight-cast cache must not outlive one step
        with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        loss.backward()
        return loss.detach()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            signature = (tuple(image.shape), image.dtype, tuple(label.shape), label.dtype)
            if self._batch_signature is None:
                self._batch_signature = signature
            elif signature != self._batch_signature:
                first = self._batch_signature
                raise ValueError(f"--cuda-graphs replays one batch shape: this batch (image {signature[0]} "
                                 f"{signature[1]}, label {signature[2]} {signature[3]}) differs from the first "
                                 f"(image {first[0]} {first[1]}, label {first[2]} {first[3]}); "
                                 "train without --cuda-graphs")
        return self.graphed(image, label)


# ============================================================================ validation
def validate(model: nn.Module, cases: Sequence[_CachedCase], num_classes: int, patch_size: Sequence[int],
             device: torch.device, sw_batch_size: int = 2, bf16: bool = False,
             cancel: Optional[CancelToken] = None) -> List[List[float]]:
    """Sliding-window Dice (MONAI ``DiceMetric``) of each preprocessed validation case (network space).

    Returns:
        One row per case: Dice of each foreground class, NaN where the class is absent from the truth.
        Per-case rows (not MONAI's aggregate, which all-gathers across DDP ranks) so each rank can
        validate its own share of the cases; :func:`summarize_dice` reduces them.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from engine.inference import fit_roi, sliding_window_logits
    from engine.networks import min_input_size, size_divisor, unwrap

    net = unwrap(model)
    divisor, minimum = size_divisor(net), min_input_size(net)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    was_training = net.training
    net.eval()
    rows: List[List[float]] = []
    try:
        for case in cases:
            check(cancel)
            image = case.image[None]
            roi = fit_roi(image.shape[2:], patch_size, divisor, minimum)
            # Eager even when the training network is compiled: validation windows vary in shape per
            # case, and compiling each would cost more than it saves ten times a run.
            with torch.compiler.set_stance("force_eager"):
                logits = sliding_window_logits(net, image, roi, sw_batch_size=sw_batch_size, overlap=0.5,
                                               device=device, bf16=bf16, cancel=cancel)
            pred = logits.argmax(dim=1, keepdim=True).cpu()
            dice = metric(one_hot(pred, num_classes), one_hot(case.label[None].long(), num_classes))
            rows.append([float(v) for v in dice[0].cpu()])
    finally:
        net.train(was_training)
    return rows


def summarize_dice(rows: Sequence[Sequence[float]]) -> Tuple[float, List[float]]:
    """``(mean foreground Dice, per-class Dice)`` over cases; NaN entries (class absent from a case's
    truth) are left out, as MONAI's ``mean_batch`` reduction does."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), []
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(arr).sum(0)
        per_class = np.where(counts > 0, np.nansum(arr, 0) / np.maximum(counts, 1), np.nan)
    mean = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return mean, [float(v) for v in per_class]


def _validate_distributed(s: "_Setup", cfg: TrainConfig, dinfo: _Dist, device: torch.device,
                          cancel: Optional[CancelToken]) -> Tuple[float, List[float]]:
    """Every rank validates its share of the cases; rows are gathered so all ranks see the same Dice."""
    rows = validate(s.model, s.val_cases[dinfo.rank::dinfo.world], len(s.class_names), s.patch_size, device,
                    cfg.sw_batch_size, cfg.bf16, cancel)
    if dinfo.world > 1:
        import torch.distributed as dist

        gathered: List[Any] = [None] * dinfo.world
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return summarize_dice(rows)


# ============================================================================ resume state
def _rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON (everything else)."""
    sd = optimizer.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars,
                     "tuple_keys": sorted({k for g in sd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor],
                        meta: Dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_flat`: load the state into ``optimizer``."""
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim/"):
            continue
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    tuple_keys = set(meta.get("tuple_keys", []))
    groups = [{k: (tuple(v) if k in tuple_keys and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      info: Dict[str, Any]) -> None:
    """Write everything an exact continuation needs, atomically, without pickle.

    Tensors (weights, optimizer moments, RNG states) go to safetensors; ``info`` (step, history, best
    Dice, ...), the scheduler state, optimizer hyper-parameters and Python/NumPy RNG scalars to the
    JSON header.
    """
    from safetensors.torch import save_file

    from engine.io import atomic_write
    from engine.networks import unwrap

    tensors: Dict[str, torch.Tensor] = {f"model/{k}": v for k, v in unwrap(model).state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": _RESUME_FORMAT, "state": json.dumps({
        "info": info, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_resume_state(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a resume file: ``(tensors, state)`` with ``state`` keys ``info``, ``optimizer``,
    ``scheduler``, ``rng``."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable resume state ({exc})") from exc
    if header.get("format") != _RESUME_FORMAT:
        raise ValueError(f"{path}: not a napari-mambahome resume state (format {header.get('format')!r})")
    return tensors, json.loads(header["state"])


# ============================================================================ logs and plot
def _write_logs(run_dir: Path, history: List[Dict[str, Any]]) -> None:
    """Rewrite ``log.jsonl`` and ``log.csv`` from the history (atomic, so a resumed run's logs never
    show steps that the resume state does not contain)."""
    from engine.io import write_text_atomic

    write_text_atomic(run_dir / LOG_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "lr", "seconds", "val_dice"])
    for r in history:
        writer.writerow([r["step"], f"{r['loss']:.6g}", f"{r['lr']:.6g}", f"{r['seconds']:.2f}",
                         "" if r.get("val_dice") is None else f"{r['val_dice']:.6g}"])
    write_text_atomic(run_dir / LOG_CSV, buf.getvalue())


def _append_log(run_dir: Path, record: Dict[str, Any]) -> None:
    with open(run_dir / LOG_JSONL, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    with open(run_dir / LOG_CSV, "a", newline="") as f:
        csv.writer(f).writerow([record["step"], f"{record['loss']:.6g}", f"{record['lr']:.6g}",
                                f"{record['seconds']:.2f}",
                                "" if record.get("val_dice") is None else f"{record['val_dice']:.6g}"])


def plot_curves(history: Sequence[Dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss (left) and validation Dice (right) against the step, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from engine.io import atomic_write

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    ax_loss.plot(steps, [r["loss"] for r in history], lw=0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("DiceCE loss")
    ax_loss.set_yscale("log" if all(r["loss"] > 0 for r in history) and history else "linear")
    val = [(r["step"], r["val_dice"]) for r in history if r.get("val_dice") is not None]
    if val:
        ax_dice.plot([s for s, _ in val], [d for _, d in val], "o-")
    ax_dice.set_xlabel("step")
    ax_dice.set_ylabel("validation Dice (foreground mean)")
    ax_dice.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# ============================================================================ the run
@dataclass
class _Setup:
    """Everything a run derives from its config before the first step."""

    model: nn.Module
    class_names: List[str]
    modality: str
    pp: Any
    patch_size: List[int]
    train_cases: List[_CachedCase]
    val_cases: List[_CachedCase]
    replay_cases: List[_CachedCase]
    parent: Optional[Dict[str, Any]]
    trainable: List[nn.Parameter]


def _split(cfg: TrainConfig, dataset: Any, run_dir: Path, dinfo: _Dist) -> Tuple[List[Any], List[Any]]:
    """The fixed train/validation split; read back from ``split.json`` when resuming."""
    from engine.datasets import split_cases

    by_id = {str(c.case_id): c for c in dataset.cases}
    split_path = run_dir / SPLIT_FILE
    if cfg.resume and split_path.exists():
        split = json.loads(split_path.read_text())
        missing = [i for i in split["train"] + split["val"] if i not in by_id]
        if missing:
            raise TrainingDataError(f"{cfg.dataset}: cases {missing[:5]} of the run's split are gone; "
                                    "cannot resume on a changed dataset")
        return [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]
    train_cases, val_cases = split_cases(list(dataset.cases), cfg.val_fraction, cfg.seed)
    if dinfo.main:
        _write_json(split_path, {"train": [str(c.case_id) for c in train_cases],
                                 "val": [str(c.case_id) for c in val_cases],
                                 "val_fraction": cfg.val_fraction, "seed": cfg.seed, "dataset": cfg.dataset})
    return train_cases, val_cases


def _dataset_spacing(cases: Sequence[Any], orientation: str) -> Tuple[float, float, float]:
    """Median voxel spacing along the network axes, from file headers (no voxel data read)."""
    from engine.io import read_grid
    from engine.preprocess import default_target_spacing, oriented_spacing

    spacings = [oriented_spacing(read_grid(case.image_files[0])[1], orientation) for case in cases]
    return default_target_spacing(spacings, orientation)


def _load_training_dataset(cfg: TrainConfig) -> Any:
    """The dataset, checked before the run folder is created (a typo must not leave a run behind)."""
    from engine.datasets import load_dataset

    dataset = load_dataset(cfg.dataset)
    _check_cases(dataset.cases, cfg.dataset)
    if len(dataset.class_names) < 2:
        raise TrainingDataError(f"{cfg.dataset}: needs background and at least one class, "
                                f"got {list(dataset.class_names)}")
    if cfg.init_checkpoint:
        from engine.checkpoint import read_checkpoint_metadata

        read_checkpoint_metadata(cfg.init_checkpoint)
    return dataset


def _setup(cfg: TrainConfig, dataset: Any, run_dir: Path, dinfo: _Dist, device: torch.device,
           progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> _Setup:
    from engine.datasets import load_dataset
    from engine.networks import build_network, encoder_parameters, in_channels_of, size_divisor
    from engine.preprocess import Preprocessing, normalize_modality

    class_names = list(dataset.class_names)
    in_channels = max(len(dataset.channel_names or ()), 1)
    parent: Optional[Dict[str, Any]] = None
    replay_cases: List[_CachedCase] = []

    train_refs, val_refs = _split(cfg, dataset, run_dir, dinfo)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and in every rerun
    if cfg.init_checkpoint:
        from engine.finetune import prepare_from_parent

        parent_setup = prepare_from_parent(cfg.init_checkpoint, dataset, modality=cfg.modality,
                                           patch_size=cfg.patch_size)
        model, pp, patch_size = parent_setup.model, parent_setup.preprocessing, parent_setup.patch_size
        modality, parent = parent_setup.modality, parent_setup.parent
        if cfg.replay:
            replay_ds = load_dataset(cfg.replay)
            _check_cases(replay_ds.cases, cfg.replay)
            label_map = parent_setup.label_map_for(list(replay_ds.class_names), cfg.replay)
            replay_cases = preprocess_cases(replay_ds.cases, pp, range(len(replay_ds.class_names)), label_map,
                                            progress, cancel, what="preprocessing replay case")
    else:
        modality = normalize_modality(cfg.modality or dataset.modality)
        spacing = cfg.target_spacing or _dataset_spacing(dataset.cases, "RAS")
        pp = Preprocessing.for_modality(modality, target_spacing=spacing)
        patch_size = list(cfg.patch_size) if cfg.patch_size else None
        model = None
    class_ids = list(range(len(class_names)))
    train_cases = preprocess_cases(train_refs, pp, class_ids, None, progress, cancel, "preprocessing training case")
    val_cases = preprocess_cases(val_refs, pp, class_ids, None, progress, cancel, "preprocessing validation case")
    for c in train_cases + val_cases:
        if c.image.shape[0] != in_channels:
            raise TrainingDataError(f"{cfg.dataset}: case {c.case_id} has {c.image.shape[0]} channel(s), "
                                    f"the dataset declares {in_channels} ({dataset.channel_names})")
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
        model = build_network(cfg.network, in_channels, len(class_names), cfg.preset,
                              **{**extra, **cfg.network_overrides})
    if in_channels_of(model) != in_channels:
        raise TrainingDataError(f"{cfg.dataset} has {in_channels} channel(s) {dataset.channel_names} but the network "
                                f"{'of ' + str(cfg.init_checkpoint) if cfg.init_checkpoint else ''} takes "
                                f"{in_channels_of(model)}")
    divisor = size_divisor(model)
    bad = [p for p, d in zip(patch_size, divisor) if p % d]
    if bad:
        raise ValueError(f"patch size {patch_size} must be a multiple of {divisor} for {cfg.network}")
    # Every modality the run saw is written into the checkpoint's preprocessing.
    for m in sorted({normalize_modality(c.modality or modality) for c in list(train_refs) + list(val_refs)}):
        pp.intensity.setdefault(m, pp.intensity_for(m))
    pp.modality = modality
    model.to(device)
    if cfg.freeze_encoder:
        for p in encoder_parameters(model):
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _Setup(model=model, class_names=class_names, modality=modality, pp=pp, patch_size=list(patch_size),
                  train_cases=train_cases, val_cases=val_cases, replay_cases=replay_cases, parent=parent,
                  trainable=trainable)


def _check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.exists():
        raise ValueError(f"{run_dir}: no {CONFIG_FILE}; nothing to resume")
    saved = json.loads(saved_path.read_text())
    now = cfg.to_dict()
    changed = {k: (saved.get(k), now[k]) for k in now
               if k not in _RESUMABLE_CHANGES and k != "command" and saved.get(k) != now[k]}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{run_dir}: cannot resume with different settings ({diff})")


def _metadata(cfg: TrainConfig, s: _Setup, step: int, elapsed: float, val_dice: Optional[float],
              run_name: str) -> Dict[str, Any]:
    from engine.networks import network_spec

    return {
        "class_names": list(s.class_names),
        "modality": s.modality,
        "preprocessing": s.pp.to_dict(),
        "patch_size": list(s.patch_size),
        "version": f"{run_name}-step{step}",
        "parent": s.parent,
        "cases": [c.case_id for c in s.train_cases],
        "network": network_spec(s.model),
        "provenance": {
            "command": cfg.command or "engine.training.train",
            "dataset": cfg.dataset,
            "replay": cfg.replay,
            "steps": step,
            "seconds": round(elapsed, 2),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "val_dice": val_dice,
            "val_cases": [c.case_id for c in s.val_cases],
            "train_config": cfg.to_dict(),
        },
    }


def train(cfg: TrainConfig, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
          on_log: Optional[LogCallback] = None) -> RunResult:
    """Train (or fine-tune, or resume) one run.

    Args:
        cfg: the run's settings.
        progress: ``progress(step, steps, message)``; also reports preprocessing.
        cancel: when cancelled the run stops at the next step boundary, writes its resume state (the
            last checkpoints stay as they were) and raises :class:`engine.progress.Cancelled`.
        on_log: called with each step's log record (``step``, ``loss``, ``lr``, ``seconds``, and
            ``val_dice``/``val_dice_per_class`` after validation).

    Returns:
        :class:`RunResult`.

    Raises:
        TrainingDataError: empty dataset, missing labels, channel or class mismatches.
        ValueError: a run folder holding another run (without ``resume``), unresumable changes.
        Cancelled: the run was cancelled.
    """
    from monai.losses import DiceCELoss

    from engine.checkpoint import save_checkpoint

    dinfo, device = _init_distributed(cfg.device)
    try:
        return _train(cfg, dinfo, device, progress, cancel, on_log, DiceCELoss, save_checkpoint)
    finally:
        if dinfo.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: TrainConfig, dinfo: _Dist, device: torch.device, progress: Optional[ProgressCallback],
           cancel: Optional[CancelToken], on_log: Optional[LogCallback], loss_cls: Any,
           save_checkpoint: Callable[..., Any]) -> RunResult:
    run_dir = Path(cfg.out)
    run_name = run_dir.name
    resume_path = run_dir / RESUME_FILE
    if cfg.resume:
        if not resume_path.exists():
            raise ValueError(f"{run_dir}: no {RESUME_FILE} to resume from")
        _check_resumable(cfg, run_dir)
    elif any((run_dir / n).exists() for n in (RESUME_FILE, LAST_FILE, BEST_FILE, LOG_JSONL)):
        raise ValueError(f"{run_dir} already holds a training run; pass --resume to continue it or choose a new --out")
    dataset = _load_training_dataset(cfg)
    if dinfo.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            _write_json(run_dir / CONFIG_FILE, cfg.to_dict())
    _barrier(dinfo)

    s = _setup(cfg, dataset, run_dir, dinfo, device, progress, cancel)
    model = s.model
    if cfg.gradient_checkpointing:
        if not hasattr(model, "set_gradient_checkpointing"):
            raise ValueError("--gradient-checkpointing applies to Mamba-HoME networks, "
                             f"not {type(model).__name__}")
        model.set_gradient_checkpointing(True)
    if cfg.compile:
        from engine.model import compile_regions

        compile_regions(model)
    if dinfo.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(s.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    loss_fn = loss_cls(to_onehot_y=True, softmax=True)
    # CUDA graphs record one process's kernels; DDP's gradient all-reduce between them stays eager
    graphs = cfg.cuda_graphs and device.type == "cuda" and dinfo.world == 1 and not cfg.gradient_checkpointing
    if cfg.cuda_graphs and not graphs and dinfo.main:
        why = "is not combined with --gradient-checkpointing" if cfg.gradient_checkpointing else \
            "applies to a single CUDA GPU"
        print(f"--cuda-graphs {why}; running eagerly", file=sys.stderr)
    train_step = TrainStep(model, loss_fn, bf16=cfg.bf16, cuda_graphs=graphs)

    start_step, history, best_dice, elapsed_before = 0, [], None, 0.0
    if cfg.resume:
        tensors, state = load_resume_state(resume_path)
        model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
        s.model.load_state_dict(model_state, strict=True)
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(tensors, state["rng"])
        info = state["info"]
        start_step, history = int(info["step"]), list(info["history"])
        best_dice, elapsed_before = info.get("best_dice"), float(info.get("elapsed", 0.0))
        if dinfo.main:
            _write_logs(run_dir, history)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        torch.manual_seed(_derive_seed(cfg.seed, 3, dinfo.rank))
        if dinfo.main:
            _write_logs(run_dir, [])

    tail = _augmentation_tail(s.pp, s.patch_size, cfg.pos, cfg.neg)
    stream = PatchStream(s.train_cases, tail, cfg.seed, s.replay_cases, cfg.replay_fraction)
    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=list(_step_batches(start_step, cfg.steps, cfg.batch_size, dinfo)),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False)

    best_path, last_path = run_dir / BEST_FILE, run_dir / LAST_FILE
    t0 = time.perf_counter()
    step = start_step
    val_dice: Optional[float] = None

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def resume_info() -> Dict[str, Any]:
        return {"step": step, "history": history, "best_dice": best_dice, "elapsed": elapsed(),
                "train_config": cfg.to_dict()}

    def save_checkpoints(dice: Optional[float]) -> None:
        nonlocal best_dice
        meta = _metadata(cfg, s, step, elapsed(), dice, run_name)
        save_checkpoint(last_path, s.model, meta)
        improved = dice is not None and (best_dice is None or dice > best_dice)
        # Until some validation gives a finite Dice (or without validation cases), best = last.
        if improved or best_dice is None:
            save_checkpoint(best_path, s.model, meta)
        if improved:
            best_dice = dice

    next_val_time = elapsed_before + (cfg.max_minutes or 0) * 6  # seconds: a tenth of the time budget
    model.train()
    report(progress, step, cfg.steps, "training")
    stopped_by_time = False
    try:
        for batch in loader:
            stop_now = cancel is not None and cancel.cancelled
            if _any_rank(stop_now, dinfo, device):
                raise Cancelled("cancelled by the user")
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            loss = train_step(image, label)
            if not torch.isfinite(loss):  # before the optimiser: the weights keep their last finite values
                raise FloatingPointError(f"{run_dir}: loss became {float(loss)} at step {step + 1}; "
                                         "lower --lr or disable --bf16")
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            if cfg.max_minutes is not None:
                # Under a time budget the cosine follows whichever budget runs out first, so a run cut
                # by time still anneals (a time-budgeted run resumes approximately, not bit-exactly).
                frac = min(max(step / cfg.steps, elapsed() / (cfg.max_minutes * 60)), 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * frac))
            record: Dict[str, Any] = {"step": step, "loss": _all_mean(float(loss.detach()), dinfo, device),
                                      "lr": float(lr), "seconds": round(elapsed(), 3)}
            # In the history before validating: a cancel during validation still resumes with every step.
            history.append(record)
            last_step = step == cfg.steps
            time_up = cfg.max_minutes is not None and elapsed() >= cfg.max_minutes * 60
            time_up = _any_rank(time_up, dinfo, device)
            val_due = step % cfg.val_every == 0
            if cfg.max_minutes is not None:  # also validate ten times over a time budget
                val_due = val_due or _any_rank(elapsed() >= next_val_time, dinfo, device)
            if val_due or last_step or time_up:
                val_dice = None
                if s.val_cases:
                    val_dice, per_class = _validate_distributed(s, cfg, dinfo, device, cancel)
                    record["val_dice"] = _finite_or_none(val_dice)
                    record["val_dice_per_class"] = [_finite_or_none(v) for v in per_class]
                    val_dice = record["val_dice"]
                if dinfo.main:
                    save_checkpoints(val_dice)
                _barrier(dinfo)
                # the interval counts from the end of this validation, so a slow validation cannot
                # make every following step validate
                next_val_time = elapsed() + (cfg.max_minutes or 0) * 6
            if dinfo.main:
                _append_log(run_dir, record)
                if step % cfg.save_every == 0 or last_step or time_up:
                    save_resume_state(resume_path, s.model, optimizer, scheduler, resume_info())
                if "val_dice" in record or last_step or time_up:
                    plot_curves(history, run_dir / PLOT_FILE, run_name)
            if on_log is not None:
                on_log(dict(record))
            msg = f"step {step}/{cfg.steps} loss {record['loss']:.4f}"
            if record.get("val_dice") is not None:
                msg += f" val Dice {record['val_dice']:.3f}"
            report(progress, step, cfg.steps, msg)
            if time_up and not last_step:
                stopped_by_time = True
                break
    except Cancelled:
        # The state after the last completed step is consistent: keep it so --resume continues here.
        if dinfo.main and step > start_step:
            save_resume_state(resume_path, s.model, optimizer, scheduler, resume_info())
            plot_curves(history, run_dir / PLOT_FILE, run_name)
        raise
    _barrier(dinfo)
    if stopped_by_time and dinfo.main:
        print(f"time budget of {cfg.max_minutes} min reached after {step} steps", file=sys.stderr)
    return RunResult(best_checkpoint=best_path if best_path.exists() else None,
                     last_checkpoint=last_path if last_path.exists() else None,
                     history=history, best_dice=best_dice, run_dir=run_dir, steps_done=step)


# ============================================================================ CLI
def _tqdm_callbacks(total: int) -> Tuple[ProgressCallback, Callable[[], None]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def progress(done: int, total_: int, message: str) -> None:
        if message.startswith("step "):
            if bar.total != total_:
                bar.total = total_
            bar.n = done
            bar.set_postfix_str(message.split(" ", 2)[-1] if " loss" in message else message)
            bar.refresh()
        else:
            bar.set_description_str(message[:40])

    return progress, bar.close


def add_common_arguments(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    """Arguments shared by ``train`` and ``finetune``."""
    from engine import finetune as _finetune  # its defaults are the plugin's too: one place decides them

    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    p.add_argument("--steps", type=int, default=_finetune.DEFAULT_STEPS if finetune else 1000,
                   help="optimiser steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step (per GPU under torchrun)")
    p.add_argument("--lr", type=float, default=_finetune.DEFAULT_LR if finetune else 1e-4,
                   help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--val-every", type=int, default=None, help="steps between validations (default steps/10)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="cases held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", default=None, help="CT, MR, US or other (default: the dataset's)")
    p.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's blocks: minutes of compilation once, then faster steps (GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's forward and backward as a CUDA graph (one GPU): faster steps, "
                        "the step's memory stays reserved")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute Mamba/HoME activations in the backward pass: less memory, slower steps")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and head")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_with_cli_progress(cfg: TrainConfig, quiet: bool, run: Callable[..., RunResult]) -> int:
    """Run ``run(progress=...)`` with a tqdm bar on rank 0 and print the result."""
    rank = int(os.environ.get("RANK", "0"))
    progress, close = (None, lambda: None) if quiet or rank != 0 else _tqdm_callbacks(cfg.steps)
    try:
        result = run(progress=progress)
    finally:
        close()
    if rank == 0:
        dice = "n/a" if result.best_dice is None else f"{result.best_dice:.4f}"
        print(f"steps: {result.steps_done}  best validation Dice: {dice}")
        print(f"best checkpoint: {result.best_checkpoint}")
        print(f"last checkpoint: {result.last_checkpoint}")
    return 0


def _cli_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        dataset=args.dataset, out=args.out, network=args.network, preset=args.preset, patch_size=args.patch_size,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, steps=args.steps,
        max_minutes=args.max_minutes, val_every=args.val_every, val_fraction=args.val_fraction, seed=args.seed,
        target_spacing=args.target_spacing, modality=args.modality, bf16=args.bf16, compile=args.compile,
        cuda_graphs=args.cuda_graphs, gradient_checkpointing=args.gradient_checkpointing,
        num_workers=args.num_workers, device=args.device, init_checkpoint=args.init_checkpoint,
        freeze_encoder=args.freeze_encoder, resume=args.resume, command=" ".join(["mambahome"] + sys.argv[1:]),
        network_overrides=parse_overrides(args.override),
    )
    return run_with_cli_progress(cfg, args.quiet, lambda progress: train(cfg, progress=progress))


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["use_home=false", 'home_variant="paper"']`` -> ``{"use_home": False, "home_variant": "paper"}``
    (values are JSON; a bare word is taken as a string)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome train``."""
    from engine.networks import NETWORK_NAMES

    p = subparsers.add_parser("train", help="train a segmentation network on a dataset",
                              description="Train Mamba-HoME (or a MONAI peer) on a labelled dataset. "
                                          "Multi-GPU: torchrun --nproc_per_node N -m engine.cli train ...")
    p.add_argument("--dataset", required=True, help="nnU-Net v2 / MSD dataset folder or case store")
    p.add_argument("--network", default="mambahome", choices=NETWORK_NAMES)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help='network setting on top of the preset, e.g. use_home=false or home_variant=paper')
    p.add_argument("--preset", default="small", choices=("paper", "small", "tiny"))
    p.add_argument("--target-spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="mm along RAS axes (default: the dataset's median spacing)")
    p.add_argument("--init-checkpoint", default=None, help="start from this checkpoint's weights")
    add_common_arguments(p)
    p.set_defaults(func=_cli_train)
