"""Training data: cases preprocessed once into memory, and the run's patch stream (a pure function of the step).

Patch ``i`` of the whole run is drawn with a seed derived from ``(seed, i)``, so the data stream is a
pure function of the step: resuming, changing the number of data workers or running under DDP never
changes which patches a step sees.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.transforms import Compose, SpatialPadd

from engine.preprocess import MIN_NETWORK_VOXELS, eval_transforms, find_user_error, thin_file_words, train_transforms
from engine.progress import CancelToken, ProgressCallback, check, check_before_result, report
from engine.train.config import DEFAULT_PATCH, TrainingDataError
from engine.train.distributed import DistInfo


def _too_small(case: Any, shape: Tuple[int, ...], spacing: Tuple[float, ...]) -> str:
    """Why a case is too small for the network: a file thin in itself (:func:`engine.preprocess.thin_file_words`)
    is no volume at any spacing, else its header's spacing is the likely fault."""
    from engine.io import read_grid

    first = case.image[0] if isinstance(case.image, (list, tuple)) else case.image
    try:
        thin = thin_file_words(read_grid(first)[0])
    except Exception:  # noqa: BLE001 - the size message below stands without the file's own shape
        thin = None
    if thin:
        return f"case {case.case_id} ({first}): the file holds {thin}; give the whole scan, or leave the case out"
    return (f"case {case.case_id} ({first}): only {shape} voxels at the model's {spacing} mm spacing; at least "
            f"{MIN_NETWORK_VOXELS} per axis are needed - check the voxel spacing in its header")


def derive_seed(*parts: int) -> int:
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


@dataclass
@dataclass
class CachedCase:
    """A case preprocessed into network space, kept in memory for the run."""

    case_id: str
    image: torch.Tensor  # (C, X, Y, Z) float32, network space
    label: torch.Tensor  # (1, X, Y, Z) uint8/int16, network space
    weight: float = 1.0  # relative share of the training patches drawn from this case


def _case_dict(case: Any) -> Dict[str, Any]:
    return {"image": case.image, "label": case.label, "modality": case.modality}


def check_cases(cases: Sequence[Any], where: str) -> None:
    """Refuse cases without a label file, all of them named in one error."""
    if not cases:
        raise TrainingDataError(f"{where}: the dataset has no labelled cases")
    problems = case_problems(cases, where)
    if problems:
        from engine.datasets import problem_report

        raise TrainingDataError(problem_report(where, problems))


def case_problems(cases: Sequence[Any], where: str) -> List[str]:
    """One message per case without a label, or whose label file is not there."""
    problems: List[str] = []
    for case in cases:
        label = case.label
        if label is None:
            problems.append(f"{where}: case {case.case_id} has no label file")
        elif isinstance(label, (str, os.PathLike)) and not Path(label).exists():
            problems.append(f"{where}: case {case.case_id}: label file {label} not found")
    return problems


def constant_images_note(case_ids: Sequence[str], total: int, shown: int = 5) -> str:
    """One message for every case whose image is blank or nearly constant (its intensity rule's percentile range
    holds one value): how many of ``total`` and the first ``shown`` of them. Once per read of the cases, not once per
    case: a dataset of many such scans said the same sentence again and again (or, from MONAI, "Divide by zero"
    once), never which cases."""
    ids = [str(i) for i in case_ids]
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return (f"{len(ids)} of {total} case(s) have a blank or nearly constant image (99% or more of the voxels alike: "
            f"little contrast to learn from or score on): {', '.join(ids[:shown])}{more}; check that these are the "
            "scans meant (an image exported empty, or the wrong series)")


def preprocess_cases(cases: Sequence[Any], pp: Any, class_ids: Sequence[int],
                     label_map: Optional[np.ndarray] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, what: str = "preprocessing",
                     problems: Optional[List[str]] = None, stop_message: Optional[str] = None,
                     constant: Optional[List[str]] = None) -> List[CachedCase]:
    """Load and preprocess cases into network space (RAS, target spacing, per-modality intensity).

    Args:
        cases: ``CaseRef``s of :mod:`engine.datasets`.
        pp: :class:`engine.preprocess.Preprocessing`.
        class_ids: label values allowed in these cases' label files.
        label_map: optional lookup table applied to label values (replay cases of another label set).
        cancel: checked before each case: a cancel raises :class:`engine.progress.Cancelled` within one case.
        problems: where given, a case refused for its data (NaN voxels, label values past the classes, a label
            on another grid, too few voxels) is appended to it, one message naming the case, and left out, so
            the caller names every bad case in one error; without it the first one raises.
        stop_message: where given, a stop asked through ``cancel`` (:meth:`engine.progress.CancelToken.request_stop`)
            ends the reading as a cancel does, before the next case, with :class:`engine.progress.NothingToKeep`
            saying this (:func:`engine.progress.check_before_result`): a training run has nothing to keep yet.
            Without it a stop is not this function's to honour.
        constant: where given, the ids of the cases whose image is blank or nearly constant are appended to it
            (the caller says it once for all its reads, :func:`constant_images_note`); without it one warning at
            the end names them.

    Returns:
        One :class:`CachedCase` per case (per usable case with ``problems``), tensors on the CPU.

    Raises:
        TrainingDataError: a case refused for its data (without ``problems``).
    """
    blank_channels: List[str] = []  # the current case's blank-image messages (one per blank channel)
    transform = eval_transforms(pp, class_ids=list(class_ids), on_constant=blank_channels.append)
    out: List[CachedCase] = []
    blank_cases: List[str] = []
    for i, case in enumerate(cases):
        if stop_message is not None:
            check_before_result(cancel, stop_message)
        else:
            check(cancel)
        report(progress, i, len(cases), f"{what} {case.case_id}")
        blank_channels.clear()
        try:
            try:
                d = transform(_case_dict(case))
            except RuntimeError as exc:  # MONAI wraps a transform's error; surface the one naming the file
                user_error = find_user_error(exc)
                if user_error is None:
                    raise
                raise TrainingDataError(f"case {case.case_id}: {user_error}") from exc
            image = torch.as_tensor(d["image"]).float().contiguous()
            if min(image.shape[1:]) < MIN_NETWORK_VOXELS:
                raise TrainingDataError(_too_small(case, tuple(image.shape[1:]), tuple(pp.target_spacing)))
        except TrainingDataError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        label = torch.as_tensor(d["label"]).long()
        if label_map is not None:
            label = torch.as_tensor(label_map)[label]
        # Labels are small integers; int64 would cost 8x the memory of a cached CT.
        label = label.to(torch.uint8 if int(label.max()) < 256 else torch.int16).contiguous()
        out.append(CachedCase(str(case.case_id), image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor),
                              float(getattr(case, "weight", 1.0))))
        if blank_channels:
            blank_cases.append(str(case.case_id))
    if constant is not None:
        constant.extend(blank_cases)
    elif blank_cases:
        warnings.warn(constant_images_note(blank_cases, len(cases)), UserWarning, stacklevel=2)
    report(progress, len(cases), len(cases), what)
    return out


def augmentation_tail(pp: Any, patch_size: Sequence[int], pos: float, neg: float,
                      augmentation: str = "paper", zoom_out: float = 1.0, zoom_out_prob: float = 0.3,
                      invert_prob: float = 0.0, shift: float = 0.0) -> Any:
    """The random part of :func:`engine.preprocess.train_transforms` (pad, pos/neg crop, augmentations)
    to apply to already-preprocessed cases.

    Args:
        pp: the run's :class:`engine.preprocess.Preprocessing`.
        patch_size: ``(X, Y, Z)`` patch.
        pos, neg: foreground / background weights of the patch centres (``pos=1, neg=2`` is nnU-Net's
            33% foreground oversampling; the default 1:1 draws half the patches around foreground).
        augmentation: ``"paper"`` or ``"nnunet"`` (:data:`engine.preprocess.AUGMENTATIONS`).
        zoom_out, zoom_out_prob: zoom-out crops (:class:`engine.zoom_out.RandZoomOutCropd`; 1 = off).
        invert_prob: share of patches with their contrast flipped (0 = off).
        shift: how far a patch may reach past the volume's edge, as a share of the patch (0 = off).
    """
    full = train_transforms(pp, patch_size, num_samples=1, pos=pos, neg=neg, augment=True,
                            augmentation=augmentation, zoom_out=zoom_out, zoom_out_prob=zoom_out_prob,
                            invert_prob=invert_prob, shift=shift)
    transforms = list(full.transforms)
    start = next((i for i, t in enumerate(transforms) if isinstance(t, SpatialPadd)), None)
    if start is None:  # pragma: no cover - a changed pipeline must not silently double-preprocess
        raise RuntimeError("engine.preprocess.train_transforms no longer starts its random part with SpatialPadd")
    return Compose(transforms[start:])



def _cumulative_weights(cases: Sequence[CachedCase]) -> Optional[np.ndarray]:
    """Cumulative case weights, or None when every case has the same weight (a uniform draw)."""
    weights = np.asarray([float(c.weight) for c in cases], dtype=np.float64)
    if weights.size == 0 or np.all(weights == weights[0]):
        return None
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        bad = next(c for c, w in zip(cases, weights) if not (np.isfinite(w) and w > 0))
        raise TrainingDataError(f"case {bad.case_id}: its sampling weight must be a positive number, got {bad.weight}")
    return np.cumsum(weights)


def _draw(rng: np.random.Generator, n: int, cumulative: Optional[np.ndarray]) -> int:
    if cumulative is None:
        return int(rng.integers(n))
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), n - 1)


class PatchStream(torch.utils.data.Dataset):
    """Training patches indexed by their position in the run's data stream.

    Item ``i`` picks a case (a replay case with probability ``replay_fraction``) and crops/augments it
    with seeds derived from ``(seed, i)`` only, so item ``i`` is the same patch in every process, worker
    and resumed run. Cases are drawn in proportion to their :attr:`CachedCase.weight` (uniformly when the
    weights are all equal, with the same draws as before weights existed, so earlier runs resume exactly).

    Args:
        cases: the training cases.
        tail: the random transforms (:func:`augmentation_tail`).
        seed: the run's seed.
        replay, replay_fraction: replay cases and the fraction of patches drawn from them.
        item_transform: optional per-patch work after the tail (a task's ``sample_transform``, e.g. the
            interactive task's simulation draws): ``item_transform({"image", "label"}, rng)`` returns
            extra tensors of fixed shapes (new keys) added to the item; ``rng`` is a generator seeded
            from ``(seed, i)`` only, so the extras of item ``i`` are the same everywhere too.

    Returns per item: ``image`` float32 ``(C, *patch)``, ``label`` int64 ``(1, *patch)``, and the
    ``item_transform``'s extras.
    """

    def __init__(self, cases: Sequence[CachedCase], tail: Any, seed: int,
                 replay: Sequence[CachedCase] = (), replay_fraction: float = 0.0,
                 item_transform: Optional[Callable[[Dict[str, torch.Tensor], np.random.Generator],
                                                   Dict[str, torch.Tensor]]] = None) -> None:
        self.cases = list(cases)
        self.replay = list(replay)
        self._cases_cumulative = _cumulative_weights(self.cases)
        self._replay_cumulative = _cumulative_weights(self.replay)
        self.replay_fraction = float(replay_fraction) if self.replay else 0.0
        self.tail = tail
        self.seed = int(seed)
        self.item_transform = item_transform

    def __len__(self) -> int:  # indices are drawn by the sampler, the stream is unbounded
        return 2 ** 62

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng(derive_seed(self.seed, 1, index))
        if self.replay_fraction > 0 and rng.random() < self.replay_fraction:
            case = self.replay[_draw(rng, len(self.replay), self._replay_cumulative)]
        else:
            case = self.cases[_draw(rng, len(self.cases), self._cases_cumulative)]
        self.tail.set_random_state(seed=derive_seed(self.seed, 2, index))
        out = self.tail({"image": case.image, "label": case.label.long()})
        if isinstance(out, list):
            out = out[0]
        image = torch.as_tensor(out["image"]).float().as_subclass(torch.Tensor).contiguous()
        label = torch.as_tensor(out["label"]).long().as_subclass(torch.Tensor).contiguous()
        item = {"image": image, "label": label}
        if self.item_transform is not None:
            extra = self.item_transform(item, np.random.default_rng(derive_seed(self.seed, 5, index)))
            clash = sorted(set(extra) & set(item))
            if clash:
                raise ValueError(f"the item transform may only add keys, not replace {clash}")
            item.update(extra)
        return item


def data_workers(requested: Optional[int], device: torch.device, cap: int = 8) -> int:
    """Data-loading processes for a run: ``requested`` if given, else (auto) on CUDA one per CPU core
    beyond the training processes' own (torchrun's ``LOCAL_WORLD_SIZE`` of them share the host), up to
    ``cap``; 0 on the CPU.

    Patch cropping and augmentation cost tens of milliseconds a patch on one core, as long as a graphed
    training step of a batch at small patches, so in the training process they would halve the GPU's
    throughput; on the CPU the network itself needs the cores."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"num_workers must be >= 0, got {requested}")
        return int(requested)
    if device.type != "cuda":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(cap, cores // processes - 1))


class StepBatches:
    """Stream indices of each step's batch for this rank (step ``s`` uses a fixed slice of the stream), as a
    DataLoader ``batch_sampler``: made one batch at a time, so a run given only a time budget (millions of
    steps, :data:`engine.train.config.TIME_BUDGET_STEPS`) holds none of them in memory.

    Args:
        start_step: the first step (a resumed run's next).
        steps: the run's step budget (the last batch is step ``steps - 1``'s).
        batch_size: patches per step and rank.
        dinfo: the process's rank and world size.
    """

    def __init__(self, start_step: int, steps: int, batch_size: int, dinfo: DistInfo) -> None:
        self.start_step, self.steps, self.batch_size, self.dinfo = start_step, steps, batch_size, dinfo

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def __iter__(self) -> Iterator[List[int]]:
        per_step = self.batch_size * self.dinfo.world
        for s in range(self.start_step, self.steps):
            base = s * per_step + self.dinfo.rank * self.batch_size
            yield list(range(base, base + self.batch_size))

